"""One SQLAlchemy engine (and its connection pool) per store, transactions with the store's
locking model, and Alembic migrations.

Why it is safe across processes:
- SQLite: every write transaction starts with `BEGIN IMMEDIATE` (one writer at a time,
  database-wide), WAL mode so readers never block, `busy_timeout` so writers queue up.
- PostgreSQL (READ COMMITTED): the account row is locked with `SELECT … FOR UPDATE` before any
  credit/concurrency decision; counters move with single `UPDATE … SET n = n + 1` statements;
  queues (jobs, webhook outbox) are claimed with `FOR UPDATE SKIP LOCKED` (SQLAlchemy renders
  nothing for SQLite, where `BEGIN IMMEDIATE` already serialises writers); uniqueness (likes,
  idempotency keys, rate-limit windows) comes from primary keys + `ON CONFLICT`.
- State transitions are conditional updates (`WHERE status = 'processing' AND lease_token = …`)
  so a repeated or stale call changes nothing.
Transient conflicts (SQLite busy, PG deadlock/serialization) are retried with jittered backoff;
pooled PostgreSQL connections are pinged before use, so one that died while idle is replaced.
"""
from __future__ import annotations

import os
import random
import re
import sqlite3
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from .records import InvalidArgument
from .schema import metadata

T = TypeVar("T")

#: Revision a database made by the former hand-written runner (`schema_version` = 1) is stamped with.
LEGACY_REVISION = "0001"
MIGRATIONS_DIR = os.path.join(os.path.dirname(__file__), "migrations")
_WRITE = "avatar_write"  # connection execution option: this transaction writes (SQLite: BEGIN IMMEDIATE)


def parse_url(url: str, schema: str | None = None) -> tuple[str, str, str | None]:
    """`sqlite:///path` or `postgresql://…[?schema=NAME]` → (dialect, SQLAlchemy URL, PG schema)."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if not path or path == ":memory:" or path.startswith("file::memory:"):
            raise InvalidArgument("url", "in-memory SQLite is not shareable between connections")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return "sqlite", f"sqlite:///{path}", None
    if url.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        parts = urlsplit(url)
        rest = []
        for k, v in parse_qsl(parts.query, keep_blank_values=True):
            if k == "schema":
                schema = schema or v
            else:
                rest.append((k, v))
        if schema is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", schema):
            raise InvalidArgument("schema", f"not a plain SQL identifier: {schema!r}")
        return "postgresql", urlunsplit(("postgresql+psycopg", parts.netloc, parts.path, urlencode(rest), "")), schema
    raise InvalidArgument("url", f"expected sqlite:///… or postgresql://…, got {url!r}")


class Database:
    """The engine, its pool and the transaction runner shared by every part of the store."""

    def __init__(self, url: str, *, schema: str | None = None, pool_size: int = 16,
                 busy_timeout_ms: int = 30_000, migrate: bool = True) -> None:
        self.url = url
        self.dialect, sa_url, self.schema = parse_url(url, schema)
        self.busy_timeout_ms = busy_timeout_ms
        if self.dialect == "sqlite":
            if sqlite3.sqlite_version_info < (3, 35, 0):
                raise RuntimeError(f"SQLite >= 3.35 is required (RETURNING); this Python has {sqlite3.sqlite_version}")
            self.engine = create_engine(sa_url, pool_size=max(1, pool_size), max_overflow=0, pool_timeout=60,
                                        connect_args={"timeout": busy_timeout_ms / 1000, "check_same_thread": False})
            event.listen(self.engine, "connect", self._sqlite_connect)
            event.listen(self.engine, "begin", self._sqlite_begin)
        else:
            self.engine = create_engine(sa_url, pool_size=max(1, pool_size), max_overflow=0, pool_timeout=60,
                                        pool_pre_ping=True)
            if self.schema:
                event.listen(self.engine, "connect", self._pg_connect, insert=True)
                self._create_schema()
        if migrate:
            self.migrate()

    # ---- connections -------------------------------------------------------------------
    def _sqlite_connect(self, dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # the "begin" listener emits BEGIN itself
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    def _pg_connect(self, dbapi_conn: Any, _record: Any) -> None:
        autocommit = dbapi_conn.autocommit
        dbapi_conn.autocommit = True  # outside any transaction, so a rollback cannot undo it
        dbapi_conn.execute(f'SET search_path TO "{self.schema}"')
        dbapi_conn.autocommit = autocommit

    @staticmethod
    def _sqlite_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")

    def _create_schema(self) -> None:
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            try:
                conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            except DBAPIError as exc:  # created concurrently by another process
                if "already exists" not in str(exc.orig) and "duplicate key" not in str(exc.orig):
                    raise

    # ---- transactions ------------------------------------------------------------------
    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[Connection]:
        """One transaction (committed on success, rolled back on error); no retries."""
        with self.engine.connect() as conn:
            conn.execution_options(**{_WRITE: write})
            with conn.begin():
                yield conn

    def run(self, fn: Callable[[Connection], T], write: bool = True) -> T:
        """Run `fn` in one transaction, retrying transient conflicts with jittered backoff."""
        delay = 0.01
        for attempt in range(10):
            try:
                with self.transaction(write) as conn:
                    return fn(conn)
            except Exception as exc:
                if attempt == 9 or not self._is_transient(exc):
                    raise
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.5)
        raise AssertionError("unreachable")

    def read(self, fn: Callable[[Connection], T]) -> T:
        return self.run(fn, write=False)

    def _is_transient(self, exc: BaseException) -> bool:
        if isinstance(exc, PoolTimeout):
            return False
        if not isinstance(exc, DBAPIError):
            return False
        orig = exc.orig
        if self.dialect == "sqlite":
            msg = str(orig).lower()
            return isinstance(orig, sqlite3.OperationalError) and ("locked" in msg or "busy" in msg)
        import psycopg

        return isinstance(orig, (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure,
                                 psycopg.errors.LockNotAvailable))

    # ---- migrations --------------------------------------------------------------------
    def _alembic_config(self, conn: Connection):
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", MIGRATIONS_DIR)
        cfg.attributes["connection"] = conn
        return cfg

    def migrate(self) -> str:
        """Upgrade the schema to the newest Alembic revision (idempotent); returns it. A database
        made by the former migration runner (`schema_version` 1, no `alembic_version`) is stamped
        as revision 0001 first, so it upgrades in place."""
        from alembic import command

        def work(conn: Connection) -> str:
            if self.dialect == "postgresql":
                # Serialise concurrent migrators (several replicas starting at once).
                conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(current_schema()))"))
            cfg = self._alembic_config(conn)
            tables = set(inspect(conn).get_table_names())
            if "schema_version" in tables and "alembic_version" not in tables:
                legacy = conn.execute(text("SELECT MAX(version) FROM schema_version")).scalar()
                if legacy != 1:
                    raise RuntimeError(f"unknown legacy schema_version {legacy!r}; expected 1")
                command.stamp(cfg, LEGACY_REVISION)
            command.upgrade(cfg, "head")
            return self._current_revision(conn)

        return self.run(work)

    @staticmethod
    def _current_revision(conn: Connection) -> str:
        from alembic.migration import MigrationContext

        return MigrationContext.configure(conn).get_current_revision() or ""

    def revision(self) -> str:
        """The Alembic revision the database is at ("" before the first migration)."""
        return self.read(self._current_revision)

    @staticmethod
    def head_revision() -> str:
        from alembic.config import Config
        from alembic.script import ScriptDirectory

        cfg = Config()
        cfg.set_main_option("script_location", MIGRATIONS_DIR)
        return ScriptDirectory.from_config(cfg).get_current_head() or ""

    # ---- teardown ----------------------------------------------------------------------
    def close(self) -> None:
        self.engine.dispose()

    def drop_all(self) -> None:
        """Drop every table (or the whole PG schema): test and operator teardown only."""
        if self.dialect == "postgresql" and self.schema:
            self.engine.dispose()
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
            self.engine.dispose()
            return

        def work(conn: Connection) -> None:
            metadata.drop_all(conn)
            conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")

        self.run(work)
        self.engine.dispose()


__all__ = ["Database", "Engine", "parse_url"]
