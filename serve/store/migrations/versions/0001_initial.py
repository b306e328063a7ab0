"""Initial schema: accounts, keys, avatars (jobs), credit ledger, likes, comments, idempotency
keys, rate-limit windows, webhook endpoints and outbox.

The same tables the store's hand-written migration runner created as its version 1, so a
database made by that runner is stamped with this revision and upgraded from here
(`serve.store.db.Database.migrate`).

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from serve.store.schema import in_check
from serve.vocab import JOB_STATUSES, LEDGER_KINDS, TIERS, VISIBILITIES, IdempotencyStatus, OutboxStatus, values

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.Double  # epoch seconds
FALSE = sa.text("FALSE")
ZERO = sa.text("0")


def _col(name: str, type_: sa.types.TypeEngine | type, *args, null: bool = False, **kw) -> sa.Column:
    return sa.Column(name, type_, *args, nullable=null, **kw)


def upgrade() -> None:
    op.create_table(
        "accounts",
        _col("id", sa.Text, primary_key=True),
        _col("tier", sa.Text, sa.CheckConstraint(in_check("tier", TIERS))),
        _col("credits", sa.BigInteger, sa.CheckConstraint("credits >= 0")),
        _col("created_at", TS),
    )
    op.create_table(
        "api_keys",
        _col("id", sa.Text, primary_key=True),
        _col("account_id", sa.Text, sa.ForeignKey("accounts.id")),
        _col("prefix", sa.Text, unique=True),
        _col("secret_hash", sa.Text),
        _col("revoked", sa.Boolean, server_default=FALSE),
        _col("created_at", TS),
        _col("revoked_at", TS, null=True),
    )
    op.create_index("ix_api_keys_account", "api_keys", ["account_id"])
    op.create_table(
        "avatars",
        _col("id", sa.Text, primary_key=True),
        _col("account_id", sa.Text, sa.ForeignKey("accounts.id")),
        _col("kind", sa.Text),
        _col("status", sa.Text, sa.CheckConstraint(in_check("status", JOB_STATUSES))),
        _col("model", sa.Text, null=True),
        _col("prompt", sa.Text, null=True),
        _col("params", sa.Text),
        _col("result", sa.Text, null=True),
        _col("title", sa.Text, null=True),
        _col("description", sa.Text, null=True),
        _col("tags", sa.Text),
        _col("metadata", sa.Text),
        _col("visibility", sa.Text, sa.CheckConstraint(in_check("visibility", VISIBILITIES))),
        _col("published", sa.Boolean, server_default=FALSE),
        _col("published_at", TS, null=True),
        _col("likes", sa.BigInteger, sa.CheckConstraint("likes >= 0"), server_default=ZERO),
        _col("comments", sa.BigInteger, sa.CheckConstraint("comments >= 0"), server_default=ZERO),
        _col("remixes", sa.BigInteger, sa.CheckConstraint("remixes >= 0"), server_default=ZERO),
        _col("remixed_from", sa.Text, null=True),
        _col("credit_cost", sa.BigInteger, sa.CheckConstraint("credit_cost >= 0")),
        _col("error_code", sa.Text, null=True),
        _col("error_message", sa.Text, null=True),
        _col("created_at", TS),
        _col("updated_at", TS),
        _col("started_at", TS, null=True),
        _col("completed_at", TS, null=True),
        _col("lease_owner", sa.Text, null=True),
        _col("lease_token", sa.Text, null=True),
        _col("lease_expires_at", TS, null=True),
        _col("attempts", sa.Integer, server_default=ZERO),
    )
    op.create_index("ix_avatars_account_status", "avatars", ["account_id", "status"])
    op.create_index("ix_avatars_account_created", "avatars", ["account_id", "created_at", "id"])
    op.create_index("ix_avatars_queue", "avatars", ["status", "created_at", "id"])
    op.create_index("ix_avatars_feed_new", "avatars", ["published", "visibility", "published_at", "id"])
    op.create_index("ix_avatars_feed_likes", "avatars", ["published", "visibility", "likes", "id"])
    op.create_table(
        "credit_ledger",
        _col("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), sa.Identity(always=True), primary_key=True),
        _col("account_id", sa.Text, sa.ForeignKey("accounts.id")),
        _col("kind", sa.Text, sa.CheckConstraint(in_check("kind", LEDGER_KINDS))),
        _col("amount", sa.BigInteger, sa.CheckConstraint("amount >= 0")),
        _col("delta", sa.BigInteger),
        _col("avatar_id", sa.Text, null=True),
        _col("note", sa.Text, null=True),
        _col("created_at", TS),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_ledger_account", "credit_ledger", ["account_id", "id"])
    op.create_index("ux_ledger_job", "credit_ledger", ["avatar_id", "kind"], unique=True,
                    sqlite_where=sa.text("avatar_id IS NOT NULL"), postgresql_where=sa.text("avatar_id IS NOT NULL"))
    op.create_table(
        "likes",
        _col("avatar_id", sa.Text, primary_key=True),
        _col("account_id", sa.Text, primary_key=True),
        _col("created_at", TS),
    )
    op.create_table(
        "comments",
        _col("id", sa.Text, primary_key=True),
        _col("avatar_id", sa.Text),
        _col("account_id", sa.Text),
        _col("text", sa.Text),
        _col("created_at", TS),
    )
    op.create_index("ix_comments_avatar", "comments", ["avatar_id", "created_at", "id"])
    op.create_table(
        "idempotency_keys",
        _col("account_id", sa.Text, primary_key=True),
        _col("key", sa.Text, primary_key=True),
        _col("request_hash", sa.Text),
        _col("status", sa.Text, sa.CheckConstraint(in_check("status", values(IdempotencyStatus)))),
        _col("response_status", sa.Integer, null=True),
        _col("response_body", sa.LargeBinary, null=True),
        _col("response_headers", sa.Text, null=True),
        _col("created_at", TS),
        _col("updated_at", TS),
        _col("expires_at", TS),
    )
    op.create_index("ix_idempotency_expiry", "idempotency_keys", ["expires_at"])
    op.create_table(
        "rate_limits",
        _col("bucket", sa.Text, primary_key=True),
        _col("window_id", sa.BigInteger, primary_key=True),
        _col("count", sa.Integer),
        _col("window_end", TS),
    )
    op.create_index("ix_rate_limits_end", "rate_limits", ["window_end"])
    op.create_table(
        "webhook_endpoints",
        _col("id", sa.Text, primary_key=True),
        _col("account_id", sa.Text, sa.ForeignKey("accounts.id")),
        _col("url", sa.Text),
        _col("events", sa.Text),
        _col("secret", sa.Text),
        _col("description", sa.Text, null=True),
        _col("disabled", sa.Boolean, server_default=FALSE),
        _col("disabled_reason", sa.Text, null=True),
        _col("consecutive_failures", sa.Integer, server_default=ZERO),
        _col("created_at", TS),
        _col("updated_at", TS),
    )
    op.create_index("ix_webhook_endpoints_account", "webhook_endpoints", ["account_id", "created_at"])
    op.create_table(
        "webhook_outbox",
        _col("id", sa.Text, primary_key=True),
        _col("event_id", sa.Text),
        _col("endpoint_id", sa.Text),
        _col("account_id", sa.Text),
        _col("event_type", sa.Text),
        _col("payload", sa.Text),
        _col("status", sa.Text, sa.CheckConstraint(in_check("status", values(OutboxStatus)))),
        _col("attempts", sa.Integer, server_default=ZERO),
        _col("next_attempt_at", TS),
        _col("lease_owner", sa.Text, null=True),
        _col("lease_token", sa.Text, null=True),
        _col("lease_expires_at", TS, null=True),
        _col("last_error", sa.Text, null=True),
        _col("created_at", TS),
        _col("updated_at", TS),
        _col("delivered_at", TS, null=True),
    )
    op.create_index("ix_outbox_due", "webhook_outbox", ["status", "next_attempt_at"])
    op.create_index("ix_outbox_account", "webhook_outbox", ["account_id", "created_at"])
    op.create_index("ix_outbox_endpoint", "webhook_outbox", ["endpoint_id"])


def downgrade() -> None:
    for table in ("webhook_outbox", "webhook_endpoints", "rate_limits", "idempotency_keys", "comments", "likes",
                  "credit_ledger", "avatars", "api_keys", "accounts"):
        op.drop_table(table)
