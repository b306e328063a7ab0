"""PostgreSQL for the service tests: one DSN, isolated schemas, and no silent skips in CI.

`AVATAR_TEST_POSTGRES_DSN` (default postgresql://postgres@127.0.0.1:5432/test) names the server.
Every caller gets its own schema (`fresh_url`), dropped by `drop_schemas`. When PostgreSQL is
unreachable, `require_postgres()` skips the test — except under `CI=true`, where it fails, so a
CI run can never pass with the PostgreSQL half of the suite silently skipped.
"""
from __future__ import annotations

import os
import secrets
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

PG_DSN = os.environ.get("AVATAR_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
SESSION = secrets.token_hex(3)
_reason: list[str] = []
_counter = iter(range(1_000_000))


def unreachable() -> str | None:
    """Why PostgreSQL cannot be used (probed once per process), or None when it can."""
    if not _reason:
        try:
            import psycopg

            with psycopg.connect(PG_DSN, connect_timeout=3) as conn:
                conn.execute("SELECT 1")
            _reason.append("")
        except Exception as exc:  # noqa: BLE001 - any failure means "PostgreSQL is not usable"
            _reason.append(f"PostgreSQL unreachable at {PG_DSN} ({type(exc).__name__}: {exc})"[:300])
    return _reason[0] or None


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_postgres() -> None:
    """Skip (locally) or fail (CI=true) the calling test when PostgreSQL is unreachable."""
    reason = unreachable()
    if reason is None:
        return
    if in_ci():
        pytest.fail(f"{reason}; CI=true, so PostgreSQL tests must run, not skip", pytrace=False)
    pytest.skip(reason)


def fresh_url(prefix: str = "svc") -> str:
    """The DSN with a new, unused `schema=` (created by open_store on first use)."""
    schema = f"{prefix}_{SESSION}_{next(_counter)}"
    parts = urlsplit(PG_DSN)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "schema"]
    query.append(("schema", schema))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))


def schema_of(url: str) -> str | None:
    return dict(parse_qsl(urlsplit(url).query)).get("schema")


def drop_schemas(urls) -> None:
    """Drop the schemas of the given `fresh_url`s (best effort: teardown must not mask a failure)."""
    names = [s for s in (schema_of(u) for u in urls) if s]
    if not names or unreachable():
        return
    import psycopg

    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute("SET lock_timeout = '20s'")  # a stuck client must not hang the teardown
        for name in names:
            try:
                conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
            except psycopg.errors.LockNotAvailable:
                pass  # left for a later run; names are unique per session


def drop_session_schemas() -> None:
    """Drop every schema this process created (teardown that a crashed test skipped); only when
    PostgreSQL was used at all."""
    if _reason != [""]:
        return
    import psycopg

    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        rows = conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", (f"%\\_{SESSION}\\_%",)).fetchall()
        for (name,) in rows:
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
