"""Request-id correlation for the service's logs.

The ingress gives every HTTP request an id (`req_…`, also the `x-request-id` response header and
the `requestId` of error bodies). A submission stores it with the job, the worker runs each job
under it, and the outbox messages a job's events produce carry it to the webhook dispatcher, so
every log line of a job's life (accepted, claimed, completed or failed, each delivery attempt)
names the request that started it: `grep req_…` follows a job across processes.

`logger(name)` returns a logger whose records carry `record.request_id` and whose message starts
with `[req_…]` while a request id is current (`request_context(...)`), whatever formatter the
host (Ray, uvicorn, pytest) installs.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Iterator

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("avatar_request_id", default=None)


def current_request_id() -> str | None:
    return _current.get()


@contextlib.contextmanager
def request_context(request_id: str | None) -> Iterator[None]:
    """Make `request_id` current for the block (None: keep whatever is current)."""
    if request_id is None:
        yield
        return
    token = _current.set(request_id)
    try:
        yield
    finally:
        _current.reset(token)


def set_request_id(request_id: str | None) -> contextvars.Token:
    return _current.set(request_id)


def reset_request_id(token: contextvars.Token) -> None:
    _current.reset(token)


class RequestIdFilter(logging.Filter):
    """Stamps `record.request_id` and prefixes the message with it (once)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = _current.get()
        record.request_id = rid or "-"
        if rid and not getattr(record, "_request_id_prefixed", False):
            record.msg = f"[{rid}] {record.msg}"
            record._request_id_prefixed = True
        return True


_FILTER = RequestIdFilter()


def logger(name: str) -> logging.Logger:
    """`logging.getLogger(name)` with the request-id filter attached."""
    log = logging.getLogger(name)
    if _FILTER not in log.filters:
        log.addFilter(_FILTER)
    return log
