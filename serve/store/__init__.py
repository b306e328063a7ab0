"""Durable state of the service (accounts, keys, jobs, credits, social, idempotency, webhooks).

`open_store("sqlite:///path/to.db")` (embedded default, WAL) or
`open_store("postgresql://user@host:5432/db?schema=avatar")` (clusters). Alembic migrations run
on open. The store is SQLAlchemy Core over one engine and connection pool (`db.Database`), split
by aggregate, one module each:

    accounts   accounts, hashed API keys, credit ledger
    jobs       job submission, leases, completion (the durable queue)
    control    cancel requests, queue positions
    avatars    reads, lists, feed, metadata updates, publish, delete
    community  likes and comments
    limits     idempotency keys and rate-limit windows
    outbox     webhook endpoints and the outbox
    cleanup    files doomed by a transaction (a job's photos, a deleted avatar's images)

Every invariant (credits, concurrency, likes, leases, idempotency, rate limits) is enforced by
the database inside one transaction per call, never by in-process locks, because ingress and
worker replicas are separate processes (see `db` for the locking model). All methods are
blocking: call them from a thread pool in async code. Records and errors: `records`.
"""
from __future__ import annotations

import time
from typing import Callable

from .accounts import AccountsStore
from .avatars import AvatarsStore
from .cleanup import AssetCleanupStore, AssetDeletion
from .community import CommunityStore
from .control import JobControlStore
from .db import Database
from .jobs import JobsStore, WorkerInstance
from .limits import LimitsStore
from .outbox import WebhooksStore, default_payload
from .records import (
    DEFAULT_MAX_ATTEMPTS, IDEMPOTENCY_STALE_S, IDEMPOTENCY_TTL_S, UNSET, WORKER_LOST_CODE, Account, AccountNotFound,
    ApiKey, Avatar, AvatarNotFound, Comment, ConcurrencyLimitExceeded, Delivery, EndpointNotFound, IdempotencyResult,
    IdempotencyState, InsufficientCredits, InvalidArgument, InvalidCursor, InvalidState, LedgerEntry, LikeResult,
    NotFound, NotPublishable, Page, PermissionDenied, RateLimitDecision, StoreError, StoredResponse, WebhookEndpoint,
)


class Store(AccountsStore, JobsStore, JobControlStore, AvatarsStore, CommunityStore, LimitsStore, WebhooksStore,
            AssetCleanupStore):
    """The whole data layer: one `Database` shared by the aggregate parts it combines."""

    def __init__(self, url: str, *, clock: Callable[[], float] = time.time,
                 event_renderer: Callable[..., dict] | None = None, pool_size: int = 16,
                 schema: str | None = None, busy_timeout_ms: int = 30_000) -> None:
        self._clock = clock
        self._render = event_renderer or default_payload
        self.db = Database(url, schema=schema, pool_size=pool_size, busy_timeout_ms=busy_timeout_ms)
        self.url, self.dialect, self.schema = url, self.db.dialect, self.db.schema

    def migrate(self) -> str:
        """Apply pending migrations (idempotent, also run on open); returns the revision in place."""
        return self.db.migrate()

    def schema_revision(self) -> str:
        """The Alembic revision the database is at (also a cheap liveness probe)."""
        return self.db.revision()

    def close(self) -> None:
        """Close pooled connections (the store must not be used afterwards)."""
        self.db.close()

    def drop_all(self) -> None:
        """Drop every table (or the whole PostgreSQL schema): tests and operator teardown only."""
        self.db.drop_all()


def open_store(url: str, *, clock: Callable[[], float] = time.time, event_renderer: Callable[..., dict] | None = None,
               pool_size: int = 16, schema: str | None = None) -> Store:
    """Open (and migrate) the store at `url`.

    url: `sqlite:///relative.db`, `sqlite:////abs/path.db` (`sqlite:///:memory:` is refused:
    each connection would see its own database), or `postgresql://…` (libpq URL; an extra
    `schema=NAME` query parameter or the `schema` argument selects/creates a schema).
    clock: time source (UTC epoch seconds); tests inject a fake one.
    event_renderer: `(event_type, avatar, extra) -> payload dict` for outbox messages, e.g. to
    store the API's camelCase avatar object; default `{"type", "avatar": avatar.to_dict(), **extra}`.
    pool_size: most connections one store (process) opens at once; callers wait for a free one.
    """
    return Store(url, clock=clock, event_renderer=event_renderer, pool_size=pool_size, schema=schema)


__all__ = [
    "DEFAULT_MAX_ATTEMPTS", "IDEMPOTENCY_STALE_S", "IDEMPOTENCY_TTL_S", "UNSET", "WORKER_LOST_CODE",
    "Account", "AccountNotFound", "ApiKey", "Avatar", "AvatarNotFound", "Comment", "ConcurrencyLimitExceeded",
    "Database", "Delivery", "EndpointNotFound", "IdempotencyResult", "IdempotencyState", "InsufficientCredits",
    "InvalidArgument", "InvalidCursor", "InvalidState", "LedgerEntry", "LikeResult", "NotFound", "NotPublishable", "Page",
    "PermissionDenied", "RateLimitDecision", "Store", "StoreError", "StoredResponse", "WebhookEndpoint", "WorkerInstance",
    "open_store",
]
