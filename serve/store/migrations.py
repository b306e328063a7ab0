"""Versioned schema, one logical schema for SQLite and PostgreSQL.

Append new `(version, statements)` pairs; never edit an applied one. Tokens in braces are the
only dialect differences: {pk_serial} (auto-increment primary key) and {blob} (bytes).
Timestamps are DOUBLE PRECISION epoch seconds, JSON is TEXT, booleans are BOOLEAN (0/1 in
SQLite), credits are BIGINT.
"""
from __future__ import annotations

TOKENS = {
    "sqlite": {"pk_serial": "INTEGER PRIMARY KEY AUTOINCREMENT", "blob": "BLOB"},
    "postgresql": {"pk_serial": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "blob": "BYTEA"},
}

MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, [
        """CREATE TABLE accounts (
            id TEXT PRIMARY KEY,
            tier TEXT NOT NULL CHECK (tier IN ('free', 'pro', 'enterprise')),
            credits BIGINT NOT NULL CHECK (credits >= 0),
            created_at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            account_id TEXT NOT NULL REFERENCES accounts(id),
            prefix TEXT NOT NULL UNIQUE,
            secret_hash TEXT NOT NULL,
            revoked BOOLEAN NOT NULL DEFAULT FALSE,
            created_at DOUBLE PRECISION NOT NULL,
            revoked_at DOUBLE PRECISION
        )""",
        "CREATE INDEX ix_api_keys_account ON api_keys (account_id)",
        """CREATE TABLE avatars (
            id TEXT PRIMARY KEY,
            account_id TEXT NOT NULL REFERENCES accounts(id),
            kind TEXT NOT NULL,
            status TEXT NOT NULL
                CHECK (status IN ('queued', 'processing', 'completed', 'failed', 'cancelled')),
            model TEXT,
            prompt TEXT,
            params TEXT NOT NULL,
            result TEXT,
            title TEXT,
            description TEXT,
            tags TEXT NOT NULL,
            metadata TEXT NOT NULL,
            visibility TEXT NOT NULL CHECK (visibility IN ('private', 'unlisted', 'public')),
            published BOOLEAN NOT NULL DEFAULT FALSE,
            published_at DOUBLE PRECISION,
            likes BIGINT NOT NULL DEFAULT 0 CHECK (likes >= 0),
            comments BIGINT NOT NULL DEFAULT 0 CHECK (comments >= 0),
            remixes BIGINT NOT NULL DEFAULT 0 CHECK (remixes >= 0),
            remixed_from TEXT,
            credit_cost BIGINT NOT NULL CHECK (credit_cost >= 0),
            error_code TEXT,
            error_message TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            started_at DOUBLE PRECISION,
            completed_at DOUBLE PRECISION,
            lease_owner TEXT,
            lease_token TEXT,
            lease_expires_at DOUBLE PRECISION,
            attempts INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX ix_avatars_account_status ON avatars (account_id, status)",
        "CREATE INDEX ix_avatars_account_created ON avatars (account_id, created_at, id)",
        "CREATE INDEX ix_avatars_queue ON avatars (status, created_at, id)",
        "CREATE INDEX ix_avatars_feed_new ON avatars (published, visibility, published_at, id)",
        "CREATE INDEX ix_avatars_feed_likes ON avatars (published, visibility, likes, id)",
        f"""CREATE TABLE credit_ledger (
            id {{pk_serial}},
            account_id TEXT NOT NULL REFERENCES accounts(id),
            kind TEXT NOT NULL CHECK (kind IN ('reserve', 'charge', 'release', 'grant')),
            amount BIGINT NOT NULL CHECK (amount >= 0),
            delta BIGINT NOT NULL,
            avatar_id TEXT,
            note TEXT,
            created_at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX ix_ledger_account ON credit_ledger (account_id, id)",
        # At most one reserve, one charge and one release per job: a double charge is impossible
        # even if a status guard were wrong.
        "CREATE UNIQUE INDEX ux_ledger_job ON credit_ledger (avatar_id, kind) WHERE avatar_id IS NOT NULL",
        """CREATE TABLE likes (
            avatar_id TEXT NOT NULL,
            account_id TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (avatar_id, account_id)
        )""",
        """CREATE TABLE comments (
            id TEXT PRIMARY KEY,
            avatar_id TEXT NOT NULL,
            account_id TEXT NOT NULL,
            text TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX ix_comments_avatar ON comments (avatar_id, created_at, id)",
        """CREATE TABLE idempotency_keys (
            account_id TEXT NOT NULL,
            key TEXT NOT NULL,
            request_hash TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('in_flight', 'done')),
            response_status INTEGER,
            response_body {blob},
            response_headers TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (account_id, key)
        )""",
        "CREATE INDEX ix_idempotency_expiry ON idempotency_keys (expires_at)",
        """CREATE TABLE rate_limits (
            bucket TEXT NOT NULL,
            window_id BIGINT NOT NULL,
            count INTEGER NOT NULL,
            window_end DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (bucket, window_id)
        )""",
        "CREATE INDEX ix_rate_limits_end ON rate_limits (window_end)",
        """CREATE TABLE webhook_endpoints (
            id TEXT PRIMARY KEY,
            account_id TEXT NOT NULL REFERENCES accounts(id),
            url TEXT NOT NULL,
            events TEXT NOT NULL,
            secret TEXT NOT NULL,
            description TEXT,
            disabled BOOLEAN NOT NULL DEFAULT FALSE,
            disabled_reason TEXT,
            consecutive_failures INTEGER NOT NULL DEFAULT 0,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX ix_webhook_endpoints_account ON webhook_endpoints (account_id, created_at)",
        """CREATE TABLE webhook_outbox (
            id TEXT PRIMARY KEY,
            event_id TEXT NOT NULL,
            endpoint_id TEXT NOT NULL,
            account_id TEXT NOT NULL,
            event_type TEXT NOT NULL,
            payload TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at DOUBLE PRECISION NOT NULL,
            lease_owner TEXT,
            lease_token TEXT,
            lease_expires_at DOUBLE PRECISION,
            last_error TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            delivered_at DOUBLE PRECISION
        )""",
        "CREATE INDEX ix_outbox_due ON webhook_outbox (status, next_attempt_at)",
        "CREATE INDEX ix_outbox_account ON webhook_outbox (account_id, created_at)",
        "CREATE INDEX ix_outbox_endpoint ON webhook_outbox (endpoint_id)",
    ]),
]

LATEST_VERSION = MIGRATIONS[-1][0]


def render(statement: str, dialect: str) -> str:
    """Substitute the dialect tokens of one statement."""
    out = statement
    for token, value in TOKENS[dialect].items():
        out = out.replace("{" + token + "}", value)
    return out
