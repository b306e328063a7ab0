"""The tables, as SQLAlchemy Core metadata: what the queries are written against.

Alembic migrations (`serve/store/migrations/versions/`) create and change the real schema; a
test checks that migrating an empty database yields exactly this metadata (autogenerate finds
no difference). Timestamps are DOUBLE PRECISION epoch seconds, JSON is TEXT (`JSONText`),
booleans are BOOLEAN (0/1 in SQLite), credits are BIGINT.
"""
from __future__ import annotations

import json
from typing import Any

from sqlalchemy import (
    BigInteger, Boolean, CheckConstraint, Column, Double, ForeignKey, Identity, Index, Integer, LargeBinary,
    MetaData, Table, Text, TypeDecorator, text,
)

from ..vocab import (
    ASSET_DELETION_REASONS, JOB_STATUSES, LEDGER_KINDS, TIERS, VISIBILITIES, IdempotencyStatus, OutboxStatus,
    values,
)


def in_check(column: str, allowed: tuple[str, ...]) -> str:
    """`column IN ('a', 'b')`: a CHECK constraint's text from a vocabulary."""
    return f"{column} IN ({', '.join(repr(v) for v in allowed)})"


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


class JSONText(TypeDecorator):
    """A JSON document stored as compact, key-sorted TEXT (the same bytes on every backend)."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> str | None:
        return None if value is None else dumps(value)

    def process_result_value(self, value: str | None, dialect: Any) -> Any:
        return None if value is None else json.loads(value)


#: Epoch seconds.
Timestamp = Double
#: BIGINT on PostgreSQL; SQLite's auto-increment key must be spelled INTEGER.
SerialKey = BigInteger().with_variant(Integer(), "sqlite")
Blob = LargeBinary

metadata = MetaData()

accounts = Table(
    "accounts", metadata,
    Column("id", Text, primary_key=True),
    Column("tier", Text, CheckConstraint(in_check("tier", TIERS)), nullable=False),
    Column("credits", BigInteger, CheckConstraint("credits >= 0"), nullable=False),
    Column("created_at", Timestamp, nullable=False),
)

api_keys = Table(
    "api_keys", metadata,
    Column("id", Text, primary_key=True),
    Column("account_id", Text, ForeignKey("accounts.id"), nullable=False),
    Column("prefix", Text, nullable=False, unique=True),
    Column("secret_hash", Text, nullable=False),
    Column("revoked", Boolean, nullable=False, server_default=text("FALSE")),
    Column("created_at", Timestamp, nullable=False),
    Column("revoked_at", Timestamp),
    Index("ix_api_keys_account", "account_id"),
)

avatars = Table(
    "avatars", metadata,
    Column("id", Text, primary_key=True),
    Column("account_id", Text, ForeignKey("accounts.id"), nullable=False),
    Column("kind", Text, nullable=False),
    Column("status", Text, CheckConstraint(in_check("status", JOB_STATUSES)), nullable=False),
    Column("model", Text),
    Column("prompt", Text),
    Column("params", JSONText, nullable=False),
    Column("result", JSONText),
    Column("title", Text),
    Column("description", Text),
    Column("tags", JSONText, nullable=False),
    Column("metadata", JSONText, nullable=False),
    Column("visibility", Text, CheckConstraint(in_check("visibility", VISIBILITIES)), nullable=False),
    Column("published", Boolean, nullable=False, server_default=text("FALSE")),
    Column("published_at", Timestamp),
    Column("likes", BigInteger, CheckConstraint("likes >= 0"), nullable=False, server_default=text("0")),
    Column("comments", BigInteger, CheckConstraint("comments >= 0"), nullable=False, server_default=text("0")),
    Column("remixes", BigInteger, CheckConstraint("remixes >= 0"), nullable=False, server_default=text("0")),
    Column("remixed_from", Text),
    Column("credit_cost", BigInteger, CheckConstraint("credit_cost >= 0"), nullable=False),
    Column("error_code", Text),
    Column("error_message", Text),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    Column("started_at", Timestamp),
    Column("completed_at", Timestamp),
    Column("lease_owner", Text),
    Column("lease_token", Text),
    Column("lease_expires_at", Timestamp),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("request_id", Text),  # the submitting request (log correlation)
    Column("progress", JSONText),  # {"step", "totalSteps"} while processing (throttled worker writes)
    Column("link_epoch", Integer, nullable=False, server_default=text("0")),  # bumped when it stops being public
    Column("cancel_requested_at", Timestamp),  # set by POST .../cancel on a processing job (the worker stops it)
    Index("ix_avatars_account_status", "account_id", "status"),
    Index("ix_avatars_account_created", "account_id", "created_at", "id"),
    Index("ix_avatars_queue", "status", "created_at", "id"),
    Index("ix_avatars_feed_new", "published", "visibility", "published_at", "id"),
    Index("ix_avatars_feed_likes", "published", "visibility", "likes", "id"),
)

credit_ledger = Table(
    "credit_ledger", metadata,
    Column("id", SerialKey, Identity(always=True), primary_key=True),
    Column("account_id", Text, ForeignKey("accounts.id"), nullable=False),
    Column("kind", Text, CheckConstraint(in_check("kind", LEDGER_KINDS)), nullable=False),
    Column("amount", BigInteger, CheckConstraint("amount >= 0"), nullable=False),
    Column("delta", BigInteger, nullable=False),
    Column("avatar_id", Text),
    Column("note", Text),
    Column("created_at", Timestamp, nullable=False),
    Index("ix_ledger_account", "account_id", "id"),
    # At most one reserve, one charge and one release per job: a double charge is impossible
    # even if a status guard were wrong.
    Index("ux_ledger_job", "avatar_id", "kind", unique=True,
          sqlite_where=text("avatar_id IS NOT NULL"), postgresql_where=text("avatar_id IS NOT NULL")),
    sqlite_autoincrement=True,
)

likes = Table(
    "likes", metadata,
    Column("avatar_id", Text, primary_key=True),
    Column("account_id", Text, primary_key=True),
    Column("created_at", Timestamp, nullable=False),
)

comments = Table(
    "comments", metadata,
    Column("id", Text, primary_key=True),
    Column("avatar_id", Text, nullable=False),
    Column("account_id", Text, nullable=False),
    Column("text", Text, nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Index("ix_comments_avatar", "avatar_id", "created_at", "id"),
)

idempotency_keys = Table(
    "idempotency_keys", metadata,
    Column("account_id", Text, primary_key=True),
    Column("key", Text, primary_key=True),
    Column("request_hash", Text, nullable=False),
    Column("status", Text, CheckConstraint(in_check("status", values(IdempotencyStatus))), nullable=False),
    Column("response_status", Integer),
    Column("response_body", Blob),
    Column("response_headers", JSONText),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    Column("expires_at", Timestamp, nullable=False),
    Index("ix_idempotency_expiry", "expires_at"),
)

rate_limits = Table(
    "rate_limits", metadata,
    Column("bucket", Text, primary_key=True),
    Column("window_id", BigInteger, primary_key=True),
    Column("count", Integer, nullable=False),
    Column("window_end", Timestamp, nullable=False),
    Index("ix_rate_limits_end", "window_end"),
)

webhook_endpoints = Table(
    "webhook_endpoints", metadata,
    Column("id", Text, primary_key=True),
    Column("account_id", Text, ForeignKey("accounts.id"), nullable=False),
    Column("url", Text, nullable=False),
    Column("events", JSONText, nullable=False),
    Column("secret", Text, nullable=False),
    Column("description", Text),
    Column("disabled", Boolean, nullable=False, server_default=text("FALSE")),
    Column("disabled_reason", Text),
    Column("consecutive_failures", Integer, nullable=False, server_default=text("0")),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    Index("ix_webhook_endpoints_account", "account_id", "created_at"),
)

webhook_outbox = Table(
    "webhook_outbox", metadata,
    Column("id", Text, primary_key=True),
    Column("event_id", Text, nullable=False),
    Column("endpoint_id", Text, nullable=False),
    Column("account_id", Text, nullable=False),
    Column("event_type", Text, nullable=False),
    Column("payload", JSONText, nullable=False),
    Column("status", Text, CheckConstraint(in_check("status", values(OutboxStatus))), nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", Timestamp, nullable=False),
    Column("lease_owner", Text),
    Column("lease_token", Text),
    Column("lease_expires_at", Timestamp),
    Column("last_error", Text),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    Column("delivered_at", Timestamp),
    Column("request_id", Text),  # the request that started the job whose event this is
    # Per-subject order: messages of one avatar to one endpoint go out in `subject_seq` order
    # (avatar.completed before avatar.published). NULL on rows older than revision 0004.
    Column("subject_id", Text),
    Column("subject_seq", Integer),
    Index("ix_outbox_due", "status", "next_attempt_at"),
    Index("ix_outbox_account", "account_id", "created_at"),
    Index("ix_outbox_endpoint", "endpoint_id"),
    Index("ix_outbox_subject", "subject_id", "endpoint_id", "subject_seq"),
)

# Job workers alive now: each registers and beats every second or so; a worker whose beat is
# stale (or, on the same host, whose process is gone) is dead, and the leases it held are
# expired at once so another worker reclaims its jobs within seconds instead of a lease period.
worker_instances = Table(
    "worker_instances", metadata,
    Column("id", Text, primary_key=True),  # the lease owner name the worker claims with
    Column("host", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("process_start", Text),  # /proc start time: tells a reused pid from the registered process
    Column("started_at", Timestamp, nullable=False),
    Column("heartbeat_at", Timestamp, nullable=False),
    Index("ix_worker_instances_heartbeat", "heartbeat_at"),
)

# Files to delete, written in the transaction that dooms them (a job with uploads ended, an
# avatar deleted); the housekeeper deletes them and the rows (`store.cleanup`).
asset_deletions = Table(
    "asset_deletions", metadata,
    Column("id", Text, primary_key=True),
    Column("prefix", Text, nullable=False),  # `uploads/<id>` or `avatars/<id>` in the asset store
    Column("reason", Text, CheckConstraint(in_check("reason", ASSET_DELETION_REASONS)), nullable=False),
    Column("avatar_id", Text),
    Column("created_at", Timestamp, nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text),
    Index("ix_asset_deletions_created", "created_at", "id"),
)
