"""Durable state of the service (accounts, keys, jobs, credits, social, idempotency, webhooks).

`open_store("sqlite:///path/to.db")` (embedded default, WAL) or
`open_store("postgresql://user@host:5432/db?schema=avatar")` (clusters). Schema migrations run
on open. See `serve.store.api` for the interface and its guarantees.
"""
from __future__ import annotations

import time
from typing import Callable

from .api import *  # noqa: F401,F403  (records, errors, Store)
from .api import Store
from .api import __all__ as _api_all

__all__ = [*_api_all, "open_store"]


def open_store(
    url: str,
    *,
    clock: Callable[[], float] = time.time,
    event_renderer: Callable[..., dict] | None = None,
    pool_size: int = 16,
    schema: str | None = None,
) -> Store:
    """Open (and migrate) the store at `url`.

    url: `sqlite:///relative.db`, `sqlite:////abs/path.db`, `sqlite:///:memory:` is refused
    (each connection would see its own database), or `postgresql://…` (libpq URL; an extra
    `schema=NAME` query parameter or the `schema` argument selects/creates a schema).
    clock: time source (UTC epoch seconds); tests inject a fake one.
    event_renderer: `(event_type, avatar, extra) -> payload dict` for outbox messages, e.g. to
    store the API's camelCase avatar object; default `{"type", "avatar": avatar.to_dict(), **extra}`.
    pool_size: most connections one store (process) opens at once; callers wait for a free one.
    """
    from .sql import SQLStore

    return SQLStore(url, clock=clock, event_renderer=event_renderer, pool_size=pool_size,
                    schema=schema)
