"""`Store` over SQLite (stdlib `sqlite3`) and PostgreSQL (`psycopg` 3) with a thin dialect layer.

Why it is safe across processes:
- SQLite: every write transaction starts with `BEGIN IMMEDIATE` (one writer at a time,
  database-wide), WAL mode so readers never block, `busy_timeout` so writers queue up.
- PostgreSQL (READ COMMITTED): the account row is locked with `SELECT … FOR UPDATE` before any
  credit/concurrency decision; counters move with single `UPDATE … SET n = n + 1` statements;
  queues (jobs, webhook outbox) are claimed with `FOR UPDATE SKIP LOCKED`; uniqueness (likes,
  idempotency keys, rate-limit windows) comes from primary keys + `ON CONFLICT`.
- State transitions are conditional updates (`WHERE status = 'processing' AND lease_token = ?`)
  so a repeated or stale call changes nothing.
Transient conflicts (SQLite busy, PG deadlock/serialization) are retried with backoff.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import os
import random
import re
import secrets
import sqlite3
import string
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from . import migrations
from .api import (
    ACTIVE_STATUSES,
    DEFAULT_MAX_ATTEMPTS,
    EVENT_TYPES,
    IDEMPOTENCY_STALE_S,
    IDEMPOTENCY_TTL_S,
    JOB_KINDS,
    JOB_STATUSES,
    SORT_FIELDS,
    TIERS,
    UNSET,
    VISIBILITIES,
    WORKER_LOST_CODE,
    Account,
    AccountNotFound,
    ApiKey,
    Avatar,
    AvatarNotFound,
    Comment,
    ConcurrencyLimitExceeded,
    Delivery,
    EndpointNotFound,
    IdempotencyResult,
    IdempotencyState,
    InsufficientCredits,
    InvalidArgument,
    InvalidCursor,
    InvalidState,
    LedgerEntry,
    LikeResult,
    Page,
    PermissionDenied,
    RateLimitDecision,
    Store,
    StoredResponse,
    WebhookEndpoint,
)

_ALPHABET = string.ascii_letters + string.digits
_KEY_ENV_RE = re.compile(r"^[a-z]{2,10}$")
_PREFIX_RANDOM_LEN = 8
_SECRET_LEN = 32
_MAX_COMMENT_LEN = 2000
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()


def _rand(n: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def new_id(prefix: str, n: int = 20) -> str:
    """Random, unguessable id (`av_` + 20 base62 chars ≈ 119 bits)."""
    return f"{prefix}_{_rand(n)}"


def _hash_key(plaintext: str) -> str:
    # Keys carry ~190 random bits, so an unsalted SHA-256 cannot be brute-forced.
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


# --------------------------------------------------------------------------------------------
# Dialects and connections
# --------------------------------------------------------------------------------------------
class _Cursor:
    """Tiny facade over a DB-API cursor: `?` placeholders everywhere, rows as dicts."""

    def __init__(self, conn: Any, dialect: str) -> None:
        self._conn = conn
        self.dialect = dialect
        self._pg = dialect == "postgresql"

    def _execute(self, sql: str, params: Sequence[Any]):
        if self._pg:
            sql = sql.replace("?", "%s")
        return self._conn.execute(sql, tuple(params))

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cur = self._execute(sql, params)
        if cur.description is None:
            return []
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    def one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = self.all(sql, params)
        return rows[0] if rows else None

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._execute(sql, params).rowcount

    @property
    def for_update(self) -> str:
        return " FOR UPDATE" if self._pg else ""

    @property
    def skip_locked(self) -> str:
        return " FOR UPDATE SKIP LOCKED" if self._pg else ""


class _StaleConnection(Exception):
    """A pooled connection failed before the transaction began: safe to retry on a new one."""


class _Pool:
    """At most `size` connections open per store (callers wait for one); idle ones are reused.

    The bound keeps N replicas x threads from exhausting PostgreSQL's max_connections.
    """

    def __init__(self, factory: Callable[[], Any], size: int, wait_s: float = 60.0) -> None:
        self._factory = factory
        self._size = max(1, size)
        self._slots = threading.BoundedSemaphore(self._size)
        self._wait_s = wait_s
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False

    def get(self) -> Any:
        if not self._slots.acquire(timeout=self._wait_s):
            raise TimeoutError(f"no database connection free within {self._wait_s:g} s "
                               f"(pool_size={self._size})")
        try:
            with self._lock:
                if self._closed:
                    raise RuntimeError("store is closed")
                while self._idle:
                    conn = self._idle.pop()
                    if not getattr(conn, "closed", False) and not getattr(conn, "broken", False):
                        return conn
            return self._factory()
        except BaseException:
            self._slots.release()
            raise

    def put(self, conn: Any, broken: bool = False) -> None:
        try:
            with self._lock:
                if not broken and not self._closed:
                    self._idle.append(conn)
                    return
            try:
                conn.close()
            except Exception:
                pass
        finally:
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            try:
                conn.close()
            except Exception:
                pass


def _parse_url(url: str, schema: str | None) -> tuple[str, str, str | None]:
    """-> (dialect, sqlite path or libpq conninfo URL, pg schema)."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if not path or path == ":memory:" or path.startswith("file::memory:"):
            raise InvalidArgument("url", "in-memory SQLite is not shareable between connections")
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        return "sqlite", path, None
    if url.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        rest = []
        for k, v in query:
            if k == "schema":
                schema = schema or v
            else:
                rest.append((k, v))
        conninfo = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(rest), ""))
        if schema is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", schema):
            raise InvalidArgument("schema", f"not a plain SQL identifier: {schema!r}")
        return "postgresql", conninfo, schema
    raise InvalidArgument("url", f"expected sqlite:///… or postgresql://…, got {url!r}")


def _cursor_encode(tag: str, value: Any, last_id: str) -> str:
    raw = _dumps({"t": tag, "v": value, "id": last_id}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _cursor_decode(tag: str, cursor: str) -> tuple[Any, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("t") != tag or not isinstance(data.get("id"), str):
            raise ValueError
        value = data["v"]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError
        return value, data["id"]
    except InvalidCursor:
        raise
    except Exception:
        raise InvalidCursor() from None


def _check_limit(limit: int, param: str = "limit", hi: int = 100) -> None:
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= hi:
        raise InvalidArgument(param, f"must be an integer in 1..{hi}, got {limit!r}")


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------
class SQLStore(Store):
    """One implementation for both dialects; see the module docstring for the locking model."""

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], float] = time.time,
        event_renderer: Callable[[str, Avatar, dict], dict] | None = None,
        pool_size: int = 16,
        schema: str | None = None,
        busy_timeout_ms: int = 30_000,
    ) -> None:
        self.url = url
        self.dialect, self._target, self.schema = _parse_url(url, schema)
        self._clock = clock
        self._render = event_renderer or self._default_payload
        self._busy_timeout_ms = busy_timeout_ms
        if self.dialect == "postgresql":
            import psycopg  # imported lazily: SQLite-only deployments need no driver

            self._psycopg = psycopg
            self._transient: tuple[type[BaseException], ...] = (
                psycopg.errors.DeadlockDetected,
                psycopg.errors.SerializationFailure,
                psycopg.errors.LockNotAvailable,
            )
            if self.schema:
                self._create_schema()
        else:
            if sqlite3.sqlite_version_info < (3, 35, 0):
                raise RuntimeError(f"SQLite >= 3.35 is required (RETURNING); this Python has "
                                   f"{sqlite3.sqlite_version}")
            self._transient = (sqlite3.OperationalError,)
        self._pool = _Pool(self._connect, pool_size)
        self.migrate()

    # ---- plumbing -------------------------------------------------------------------------
    def _connect(self) -> Any:
        if self.dialect == "sqlite":
            conn = sqlite3.connect(self._target, timeout=self._busy_timeout_ms / 1000,
                                   isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            return conn
        conn = self._psycopg.connect(self._target, autocommit=True)
        if self.schema:
            conn.execute(f'SET search_path TO "{self.schema}"')
        return conn

    def _create_schema(self) -> None:
        psycopg = self._psycopg
        with psycopg.connect(self._target, autocommit=True) as conn:
            try:
                conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            except psycopg.errors.UniqueViolation:
                pass  # created concurrently by another process

    def _now(self) -> float:
        return float(self._clock())

    @contextmanager
    def _tx(self, write: bool) -> Iterator[_Cursor]:
        conn = self._pool.get()
        broken = False
        pg = self.dialect == "postgresql"
        try:
            try:
                conn.execute("BEGIN IMMEDIATE" if write and not pg else "BEGIN")
            except Exception as exc:
                if pg and isinstance(exc, self._psycopg.OperationalError):
                    broken = True  # idle pooled connection died (server restart, timeout)
                    raise _StaleConnection(str(exc)) from exc
                raise
            try:
                yield _Cursor(conn, self.dialect)
                conn.execute("COMMIT")
            except BaseException:
                try:
                    conn.execute("ROLLBACK")
                except Exception:
                    pass
                raise
        except BaseException:
            broken = broken or (pg and (conn.closed or conn.broken))
            raise
        finally:
            self._pool.put(conn, broken=broken)

    def _is_transient(self, exc: BaseException) -> bool:
        if isinstance(exc, _StaleConnection):
            return True
        if not isinstance(exc, self._transient):
            return False
        if self.dialect == "sqlite":
            msg = str(exc).lower()
            return "locked" in msg or "busy" in msg
        return True

    def _run(self, fn: Callable[[_Cursor], Any], write: bool = True) -> Any:
        """Run `fn` in one transaction, retrying transient conflicts with jittered backoff."""
        delay = 0.01
        for attempt in range(10):
            try:
                with self._tx(write) as cur:
                    return fn(cur)
            except Exception as exc:
                if attempt == 9 or not self._is_transient(exc):
                    raise
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.5)
        raise AssertionError("unreachable")

    # ---- row mapping ----------------------------------------------------------------------
    @staticmethod
    def _account(r: Mapping[str, Any]) -> Account:
        return Account(id=r["id"], tier=r["tier"], credits=int(r["credits"]), created_at=r["created_at"])

    @staticmethod
    def _api_key(r: Mapping[str, Any]) -> ApiKey:
        return ApiKey(id=r["id"], account_id=r["account_id"], prefix=r["prefix"],
                      revoked=bool(r["revoked"]), created_at=r["created_at"],
                      revoked_at=r["revoked_at"])

    @staticmethod
    def _avatar(r: Mapping[str, Any]) -> Avatar:
        return Avatar(
            id=r["id"], account_id=r["account_id"], kind=r["kind"], status=r["status"],
            model=r["model"], prompt=r["prompt"], params=_loads(r["params"]) or {},
            result=_loads(r["result"]), title=r["title"], description=r["description"],
            tags=_loads(r["tags"]) or [], metadata=_loads(r["metadata"]) or {},
            visibility=r["visibility"], published=bool(r["published"]),
            published_at=r["published_at"], likes=int(r["likes"]), comments=int(r["comments"]),
            remixes=int(r["remixes"]), remixed_from=r["remixed_from"],
            credit_cost=int(r["credit_cost"]), error_code=r["error_code"],
            error_message=r["error_message"], created_at=r["created_at"],
            updated_at=r["updated_at"], started_at=r["started_at"],
            completed_at=r["completed_at"], lease_owner=r["lease_owner"],
            lease_token=r["lease_token"], lease_expires_at=r["lease_expires_at"],
            attempts=int(r["attempts"]),
        )

    @staticmethod
    def _ledger(r: Mapping[str, Any]) -> LedgerEntry:
        return LedgerEntry(id=int(r["id"]), account_id=r["account_id"], kind=r["kind"],
                           amount=int(r["amount"]), delta=int(r["delta"]),
                           avatar_id=r["avatar_id"], created_at=r["created_at"], note=r["note"])

    @staticmethod
    def _comment(r: Mapping[str, Any]) -> Comment:
        return Comment(id=r["id"], avatar_id=r["avatar_id"], account_id=r["account_id"],
                       text=r["text"], created_at=r["created_at"])

    @staticmethod
    def _endpoint(r: Mapping[str, Any]) -> WebhookEndpoint:
        return WebhookEndpoint(
            id=r["id"], account_id=r["account_id"], url=r["url"], events=_loads(r["events"]),
            secret=r["secret"], disabled=bool(r["disabled"]), disabled_reason=r["disabled_reason"],
            consecutive_failures=int(r["consecutive_failures"]), created_at=r["created_at"],
            description=r["description"],
        )

    @staticmethod
    def _delivery(r: Mapping[str, Any]) -> Delivery:
        return Delivery(
            id=r["id"], event_id=r["event_id"], endpoint_id=r["endpoint_id"],
            account_id=r["account_id"], event_type=r["event_type"], payload=_loads(r["payload"]),
            status=r["status"], attempts=int(r["attempts"]), next_attempt_at=r["next_attempt_at"],
            created_at=r["created_at"], last_error=r["last_error"], lease_token=r["lease_token"],
            url=r["url"], secret=r["secret"],
            endpoint_consecutive_failures=int(r["consecutive_failures"]),
        )

    # ---- migrations -----------------------------------------------------------------------
    def migrate(self) -> int:
        def work(c: _Cursor) -> int:
            if c.dialect == "postgresql":
                # Serialise concurrent migrators (several replicas starting at once).
                c.one("SELECT pg_advisory_xact_lock(hashtext(current_schema()))")
            c.run("CREATE TABLE IF NOT EXISTS schema_version ("
                  "version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)")
            row = c.one("SELECT MAX(version) AS v FROM schema_version")
            current = int(row["v"]) if row and row["v"] is not None else 0
            for version, statements in migrations.MIGRATIONS:
                if version <= current:
                    continue
                for statement in statements:
                    c.run(migrations.render(statement, c.dialect))
                c.run("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                      (version, self._now()))
                current = version
            return current

        return self._run(work)

    def schema_version(self) -> int:
        row = self._run(lambda c: c.one("SELECT MAX(version) AS v FROM schema_version"), write=False)
        return int(row["v"] or 0)

    def close(self) -> None:
        self._pool.close()

    def drop_all(self) -> None:
        """Drop every table (or the whole PG schema): test and operator teardown only."""
        if self.dialect == "postgresql" and self.schema:
            self._pool.close()
            with self._psycopg.connect(self._target, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
            return

        def work(c: _Cursor) -> None:
            for table in ("webhook_outbox", "webhook_endpoints", "rate_limits", "idempotency_keys",
                          "comments", "likes", "credit_ledger", "avatars", "api_keys", "accounts",
                          "schema_version"):
                c.run(f"DROP TABLE IF EXISTS {table}")

        self._run(work)
        self._pool.close()

    # ---- accounts & keys ------------------------------------------------------------------
    def _add_ledger(self, c: _Cursor, account_id: str, kind: str, amount: int, delta: int,
                    avatar_id: str | None, note: str | None = None) -> None:
        c.run("INSERT INTO credit_ledger (account_id, kind, amount, delta, avatar_id, note, created_at)"
              " VALUES (?, ?, ?, ?, ?, ?, ?)",
              (account_id, kind, amount, delta, avatar_id, note, self._now()))

    def create_account(self, tier: str = "free", credits: int = 0) -> Account:
        if tier not in TIERS:
            raise InvalidArgument("tier", f"must be one of {', '.join(TIERS)}, got {tier!r}")
        if not isinstance(credits, int) or credits < 0:
            raise InvalidArgument("credits", f"must be a non-negative integer, got {credits!r}")
        account_id = new_id("acct", 16)

        def work(c: _Cursor) -> Account:
            now = self._now()
            c.run("INSERT INTO accounts (id, tier, credits, created_at) VALUES (?, ?, ?, ?)",
                  (account_id, tier, credits, now))
            if credits:
                self._add_ledger(c, account_id, "grant", credits, credits, None, "initial credits")
            return Account(account_id, tier, credits, now)

        return self._run(work)

    def get_account(self, account_id: str) -> Account | None:
        row = self._run(lambda c: c.one("SELECT * FROM accounts WHERE id = ?", (account_id,)),
                        write=False)
        return self._account(row) if row else None

    def set_tier(self, account_id: str, tier: str) -> Account:
        if tier not in TIERS:
            raise InvalidArgument("tier", f"must be one of {', '.join(TIERS)}, got {tier!r}")

        def work(c: _Cursor) -> Account:
            row = c.one("UPDATE accounts SET tier = ? WHERE id = ? RETURNING *", (tier, account_id))
            if row is None:
                raise AccountNotFound(account_id)
            return self._account(row)

        return self._run(work)

    def grant_credits(self, account_id: str, amount: int, note: str | None = None) -> Account:
        if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
            raise InvalidArgument("amount", f"must be a positive integer, got {amount!r}")

        def work(c: _Cursor) -> Account:
            row = c.one("UPDATE accounts SET credits = credits + ? WHERE id = ? RETURNING *",
                        (amount, account_id))
            if row is None:
                raise AccountNotFound(account_id)
            self._add_ledger(c, account_id, "grant", amount, amount, None, note)
            return self._account(row)

        return self._run(work)

    def ledger(self, account_id: str, limit: int = 1000) -> list[LedgerEntry]:
        rows = self._run(lambda c: c.all(
            "SELECT * FROM credit_ledger WHERE account_id = ? ORDER BY id LIMIT ?",
            (account_id, limit)), write=False)
        return [self._ledger(r) for r in rows]

    def ledger_balance(self, account_id: str) -> int:
        row = self._run(lambda c: c.one(
            "SELECT COALESCE(SUM(delta), 0) AS s FROM credit_ledger WHERE account_id = ?",
            (account_id,)), write=False)
        return int(row["s"])

    def create_api_key(self, account_id: str, *, environment: str = "live") -> tuple[ApiKey, str]:
        if not _KEY_ENV_RE.match(environment):
            raise InvalidArgument("environment", f"must be 2..10 lowercase letters, got {environment!r}")
        prefix = f"ak_{environment}_{_rand(_PREFIX_RANDOM_LEN)}"
        plaintext = prefix + _rand(_SECRET_LEN)
        key_id = new_id("key", 16)

        def work(c: _Cursor) -> ApiKey:
            if c.one("SELECT id FROM accounts WHERE id = ?", (account_id,)) is None:
                raise AccountNotFound(account_id)
            now = self._now()
            c.run("INSERT INTO api_keys (id, account_id, prefix, secret_hash, revoked, created_at)"
                  " VALUES (?, ?, ?, ?, FALSE, ?)", (key_id, account_id, prefix, _hash_key(plaintext), now))
            return ApiKey(key_id, account_id, prefix, False, now, None)

        return self._run(work), plaintext

    @staticmethod
    def _key_prefix(plaintext: str) -> str | None:
        parts = plaintext.split("_", 2)
        if len(parts) != 3 or parts[0] != "ak" or not _KEY_ENV_RE.match(parts[1]):
            return None
        if len(parts[2]) != _PREFIX_RANDOM_LEN + _SECRET_LEN:
            return None
        return f"ak_{parts[1]}_{parts[2][:_PREFIX_RANDOM_LEN]}"

    def authenticate(self, plaintext_key: str) -> Account | None:
        if not isinstance(plaintext_key, str) or len(plaintext_key) > 256:
            return None
        prefix = self._key_prefix(plaintext_key)
        row = None
        if prefix is not None:
            row = self._run(lambda c: c.one(
                "SELECT k.secret_hash, k.revoked, a.id, a.tier, a.credits, a.created_at"
                " FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.prefix = ?",
                (prefix,)), write=False)
        expected = row["secret_hash"] if row else _DUMMY_HASH
        # Compare even when the prefix is unknown so timing does not reveal valid prefixes.
        ok = hmac.compare_digest(expected.encode(), _hash_key(plaintext_key).encode())
        if not ok or row is None or bool(row["revoked"]):
            return None
        return self._account(row)

    def list_api_keys(self, account_id: str) -> list[ApiKey]:
        rows = self._run(lambda c: c.all(
            "SELECT * FROM api_keys WHERE account_id = ? ORDER BY created_at, id", (account_id,)),
            write=False)
        return [self._api_key(r) for r in rows]

    def revoke_api_key(self, account_id: str, key_id: str) -> bool:
        return self._run(lambda c: c.run(
            "UPDATE api_keys SET revoked = TRUE, revoked_at = ? WHERE id = ? AND account_id = ?"
            " AND revoked = FALSE", (self._now(), key_id, account_id))) > 0

    # ---- webhook fan-out (inside other transactions) --------------------------------------
    @staticmethod
    def _default_payload(event_type: str, avatar: Avatar, extra: dict) -> dict:
        data = avatar.to_dict()
        for private in ("lease_owner", "lease_token", "lease_expires_at"):  # worker internals
            data.pop(private, None)
        return {"type": event_type, "avatar": data, **extra}

    def _emit(self, c: _Cursor, event_type: str, avatar: Avatar, extra: dict | None = None) -> int:
        """Write one outbox message per enabled endpoint of the owner subscribed to the event."""
        endpoints = c.all("SELECT id, events FROM webhook_endpoints WHERE account_id = ?"
                          " AND disabled = FALSE ORDER BY created_at, id", (avatar.account_id,))
        targets = [e["id"] for e in endpoints
                   if "*" in (ev := _loads(e["events"]) or []) or event_type in ev]
        if not targets:
            return 0
        now = self._now()
        payload = _dumps(self._render(event_type, avatar, dict(extra or {})))
        event_id = new_id("evt")
        for endpoint_id in targets:
            c.run("INSERT INTO webhook_outbox (id, event_id, endpoint_id, account_id, event_type,"
                  " payload, status, attempts, next_attempt_at, created_at, updated_at)"
                  " VALUES (?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?)",
                  (new_id("msg"), event_id, endpoint_id, avatar.account_id, event_type, payload,
                   now, now, now))
        return len(targets)

    # ---- jobs -----------------------------------------------------------------------------
    def submit_job(
        self,
        account_id: str,
        kind: str,
        params: Mapping[str, Any],
        *,
        cost: int,
        max_concurrent: int,
        model: str | None = None,
        prompt: str | None = None,
        remixed_from: str | None = None,
        title: str | None = None,
        description: str | None = None,
        tags: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        visibility: str = "private",
    ) -> Avatar:
        if kind not in JOB_KINDS:
            raise InvalidArgument("kind", f"must be one of {', '.join(JOB_KINDS)}, got {kind!r}")
        if not isinstance(cost, int) or isinstance(cost, bool) or cost < 0:
            raise InvalidArgument("cost", f"must be a non-negative integer, got {cost!r}")
        if not isinstance(max_concurrent, int) or max_concurrent < 0:
            raise InvalidArgument("max_concurrent", f"must be a non-negative integer, got {max_concurrent!r}")
        if visibility not in VISIBILITIES:
            raise InvalidArgument("visibility", f"must be one of {', '.join(VISIBILITIES)}")
        tags_list = self._check_tags(tags if tags is not None else [])
        params_json = _dumps(dict(params))
        metadata_json = _dumps(dict(metadata or {}))
        model = model if model is not None else params.get("model")
        prompt = prompt if prompt is not None else params.get("prompt")
        avatar_id = new_id("av")

        def work(c: _Cursor) -> Avatar:
            acct = c.one("SELECT id, credits FROM accounts WHERE id = ?" + c.for_update, (account_id,))
            if acct is None:
                raise AccountNotFound(account_id)
            active = int(c.one(
                "SELECT COUNT(*) AS n FROM avatars WHERE account_id = ? AND status IN ('queued', 'processing')",
                (account_id,))["n"])
            if active >= max_concurrent:
                raise ConcurrencyLimitExceeded(active, max_concurrent)
            if int(acct["credits"]) < cost:
                raise InsufficientCredits(int(acct["credits"]), cost)
            if remixed_from is not None:
                if c.run("UPDATE avatars SET remixes = remixes + 1 WHERE id = ?", (remixed_from,)) == 0:
                    raise AvatarNotFound(remixed_from)
            now = self._now()
            row = c.one(
                "INSERT INTO avatars (id, account_id, kind, status, model, prompt, params, tags,"
                " metadata, title, description, visibility, published, remixed_from, credit_cost,"
                " created_at, updated_at, attempts)"
                " VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, FALSE, ?, ?, ?, ?, 0) RETURNING *",
                (avatar_id, account_id, kind, model, prompt, params_json, _dumps(tags_list),
                 metadata_json, title, description, visibility, remixed_from, cost, now, now))
            if cost:
                c.run("UPDATE accounts SET credits = credits - ? WHERE id = ?", (cost, account_id))
            self._add_ledger(c, account_id, "reserve", cost, -cost, avatar_id)
            return self._avatar(row)

        return self._run(work)

    def _finish(self, c: _Cursor, avatar_id: str, status: str, *, token: str | None,
                result: Mapping[str, Any] | None = None, code: str | None = None,
                message: str | None = None) -> Avatar | None:
        """Move an active job to a terminal status with its ledger entry and event.

        `token` None = any active job (cancel/reap); else only processing with that token.
        """
        now = self._now()
        guard = ("status IN ('queued', 'processing')" if token is None
                 else "status = 'processing' AND lease_token = ?")
        params: list[Any] = [status, _dumps(dict(result)) if result is not None else None,
                             code, message, now, now, avatar_id]
        if token is not None:
            params.append(token)
        row = c.one(
            "UPDATE avatars SET status = ?, result = COALESCE(?, result), error_code = ?,"
            " error_message = ?, completed_at = ?, updated_at = ?, lease_owner = NULL,"
            " lease_token = NULL, lease_expires_at = NULL"
            f" WHERE id = ? AND {guard} RETURNING *", params)
        if row is None:
            return None
        avatar = self._avatar(row)
        cost = avatar.credit_cost
        if status == "completed":
            self._add_ledger(c, avatar.account_id, "charge", cost, 0, avatar.id)
            self._emit(c, "avatar.completed", avatar)
        else:
            if cost:
                c.run("UPDATE accounts SET credits = credits + ? WHERE id = ?", (cost, avatar.account_id))
            self._add_ledger(c, avatar.account_id, "release", cost, cost, avatar.id)
            if status == "failed":
                self._emit(c, "avatar.failed", avatar)
        return avatar

    def _owned_row(self, c: _Cursor, avatar_id: str, account_id: str) -> dict[str, Any]:
        row = c.one("SELECT * FROM avatars WHERE id = ?" + c.for_update, (avatar_id,))
        if row is None:
            raise AvatarNotFound(avatar_id)
        if row["account_id"] != account_id:
            raise PermissionDenied(avatar_id, account_id)
        return row

    def cancel_job(self, avatar_id: str, account_id: str) -> Avatar:
        def work(c: _Cursor) -> Avatar:
            row = self._owned_row(c, avatar_id, account_id)
            if row["status"] in ACTIVE_STATUSES:
                done = self._finish(c, avatar_id, "cancelled", token=None,
                                    code="cancelled", message="cancelled by the user")
                if done is not None:
                    return done
            return self._avatar(row)

        return self._run(work)

    def _reap(self, c: _Cursor, now: float, max_attempts: int) -> list[str]:
        rows = c.all("SELECT id FROM avatars WHERE status = 'processing' AND lease_expires_at < ?"
                     " AND attempts >= ? ORDER BY created_at, id LIMIT 100" + c.skip_locked,
                     (now, max_attempts))
        reaped = []
        for r in rows:
            done = self._finish(c, r["id"], "failed", token=None, code=WORKER_LOST_CODE,
                                message=f"the job's worker stopped responding {max_attempts} times")
            if done is not None:
                reaped.append(done.id)
        return reaped

    def reap_expired(self, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> list[str]:
        return self._run(lambda c: self._reap(c, self._now(), max_attempts))

    def claim_jobs(
        self,
        worker_id: str,
        limit: int = 1,
        lease_seconds: float = 60.0,
        *,
        kinds: Sequence[str] | None = None,
        models: Sequence[str | None] | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> list[Avatar]:
        _check_limit(limit, "limit", 1000)
        if lease_seconds <= 0:
            raise InvalidArgument("lease_seconds", "must be positive")
        if max_attempts < 1:
            raise InvalidArgument("max_attempts", "must be >= 1")

        def work(c: _Cursor) -> list[Avatar]:
            now = self._now()
            self._reap(c, now, max_attempts)
            where = ["(status = 'queued' OR (status = 'processing' AND lease_expires_at < ?"
                     " AND attempts < ?))"]
            params: list[Any] = [now, max_attempts]
            if kinds is not None:
                if not kinds:
                    return []
                where.append(f"kind IN ({', '.join('?' * len(kinds))})")
                params.extend(kinds)
            if models is not None:
                named = [m for m in models if m is not None]
                alts = []
                if named:
                    alts.append(f"model IN ({', '.join('?' * len(named))})")
                    params.extend(named)
                if len(named) < len(models):
                    alts.append("model IS NULL")
                if not alts:
                    return []
                where.append("(" + " OR ".join(alts) + ")")
            ids = c.all(f"SELECT id FROM avatars WHERE {' AND '.join(where)}"
                        " ORDER BY created_at, id LIMIT ?" + c.skip_locked, (*params, limit))
            claimed = []
            for r in ids:
                row = c.one(
                    "UPDATE avatars SET status = 'processing', lease_owner = ?, lease_token = ?,"
                    " lease_expires_at = ?, attempts = attempts + 1, started_at = ?, updated_at = ?"
                    " WHERE id = ? AND (status = 'queued' OR (status = 'processing'"
                    " AND lease_expires_at < ?)) RETURNING *",
                    (worker_id, secrets.token_urlsafe(16), now + lease_seconds, now, now, r["id"], now))
                if row is not None:
                    claimed.append(self._avatar(row))
            return claimed

        return self._run(work)

    def heartbeat(self, worker_id: str, leases: Mapping[str, str], lease_seconds: float = 60.0) -> set[str]:
        if not leases:
            return set()

        def work(c: _Cursor) -> set[str]:
            expires = self._now() + lease_seconds
            held = set()
            for avatar_id, token in leases.items():
                if c.run("UPDATE avatars SET lease_expires_at = ? WHERE id = ? AND lease_token = ?"
                         " AND lease_owner = ? AND status = 'processing'",
                         (expires, avatar_id, token, worker_id)):
                    held.add(avatar_id)
            return held

        return self._run(work)

    def job_statuses(self, avatar_ids: Sequence[str]) -> dict[str, str]:
        ids = list(avatar_ids)
        if not ids:
            return {}
        rows = self._run(lambda c: c.all(
            f"SELECT id, status FROM avatars WHERE id IN ({', '.join('?' * len(ids))})", ids),
            write=False)
        return {r["id"]: r["status"] for r in rows}

    def active_jobs(self, account_id: str) -> int:
        row = self._run(lambda c: c.one(
            "SELECT COUNT(*) AS n FROM avatars WHERE account_id = ? AND status IN ('queued', 'processing')",
            (account_id,)), write=False)
        return int(row["n"])

    def queue_stats(self) -> dict[str, int]:
        rows = self._run(lambda c: c.all(
            "SELECT status, COUNT(*) AS n FROM avatars WHERE status IN ('queued', 'processing')"
            " GROUP BY status"), write=False)
        stats = {"queued": 0, "processing": 0}
        stats.update({r["status"]: int(r["n"]) for r in rows})
        return stats

    def complete_job(self, avatar_id: str, lease_token: str, result: Mapping[str, Any]) -> bool:
        if not isinstance(result, Mapping):
            raise InvalidArgument("result", "must be a JSON object")
        return self._run(lambda c: self._finish(
            c, avatar_id, "completed", token=lease_token, result=result) is not None)

    def fail_job(self, avatar_id: str, lease_token: str, code: str, message: str) -> bool:
        return self._run(lambda c: self._finish(
            c, avatar_id, "failed", token=lease_token, code=code, message=message) is not None)

    def requeue_job(self, avatar_id: str, lease_token: str) -> bool:
        return self._run(lambda c: c.run(
            "UPDATE avatars SET status = 'queued', lease_owner = NULL, lease_token = NULL,"
            " lease_expires_at = NULL, updated_at = ? WHERE id = ? AND status = 'processing'"
            " AND lease_token = ?", (self._now(), avatar_id, lease_token)) > 0)

    # ---- avatars --------------------------------------------------------------------------
    def get_avatar(self, avatar_id: str) -> Avatar | None:
        row = self._run(lambda c: c.one("SELECT * FROM avatars WHERE id = ?", (avatar_id,)), write=False)
        return self._avatar(row) if row else None

    _SORT_COLUMNS = {"createdAt": "created_at", "likes": "likes", "comments": "comments",
                     "remixes": "remixes"}

    @staticmethod
    def _keyset(column: str, order: str, cursor_value: Any, cursor_id: str) -> tuple[str, list[Any]]:
        op = "<" if order == "desc" else ">"
        return (f"({column} {op} ? OR ({column} = ? AND id {op} ?))",
                [cursor_value, cursor_value, cursor_id])

    def _page(self, c: _Cursor, where: list[str], params: list[Any], column: str, order: str,
              tag: str, limit: int, cursor: str | None) -> Page[Avatar]:
        if cursor:
            value, last_id = _cursor_decode(tag, cursor)
            clause, extra = self._keyset(column, order, value, last_id)
            where = [*where, clause]
            params = [*params, *extra]
        direction = "DESC" if order == "desc" else "ASC"
        rows = c.all(f"SELECT * FROM avatars WHERE {' AND '.join(where) or 'TRUE'}"
                     f" ORDER BY {column} {direction}, id {direction} LIMIT ?", (*params, limit + 1))
        items = [self._avatar(r) for r in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            last = rows[limit - 1]
            next_cursor = _cursor_encode(tag, last[column], last["id"])
        return Page(items, next_cursor)

    def list_avatars(
        self,
        account_id: str,
        *,
        limit: int = 20,
        cursor: str | None = None,
        status: str | None = None,
        model: str | None = None,
        visibility: str | None = None,
        published: bool | None = None,
        kind: str | None = None,
        search: str | None = None,
        sort_by: str = "createdAt",
        sort_order: str = "desc",
    ) -> Page[Avatar]:
        _check_limit(limit)
        if sort_by not in SORT_FIELDS:
            raise InvalidArgument("sortBy", f"must be one of {', '.join(SORT_FIELDS)}, got {sort_by!r}")
        if sort_order not in ("asc", "desc"):
            raise InvalidArgument("sortOrder", f"must be asc or desc, got {sort_order!r}")
        if status is not None and status not in JOB_STATUSES:
            raise InvalidArgument("status", f"must be one of {', '.join(JOB_STATUSES)}, got {status!r}")
        if visibility is not None and visibility not in VISIBILITIES:
            raise InvalidArgument("visibility", f"must be one of {', '.join(VISIBILITIES)}, got {visibility!r}")
        if kind is not None and kind not in JOB_KINDS:
            raise InvalidArgument("kind", f"must be one of {', '.join(JOB_KINDS)}, got {kind!r}")
        where = ["account_id = ?"]
        params: list[Any] = [account_id]
        for column, value in (("status", status), ("model", model), ("visibility", visibility),
                              ("kind", kind)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if published is not None:
            where.append("published = ?")
            params.append(bool(published))
        if search:
            escaped = search.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            pattern = f"%{escaped}%"
            where.append("(LOWER(COALESCE(prompt, '')) LIKE ? ESCAPE '\\'"
                         " OR LOWER(COALESCE(title, '')) LIKE ? ESCAPE '\\')")
            params.extend([pattern, pattern])
        column = self._SORT_COLUMNS[sort_by]
        tag = f"list:{sort_by}:{sort_order}"
        return self._run(lambda c: self._page(c, where, params, column, sort_order, tag, limit, cursor),
                         write=False)

    @staticmethod
    def _check_tags(tags: Any) -> list[str]:
        if isinstance(tags, str) or not isinstance(tags, Sequence):
            raise InvalidArgument("tags", "must be a list of strings")
        out = list(tags)
        if not all(isinstance(t, str) for t in out):
            raise InvalidArgument("tags", "must be a list of strings")
        return out

    def update_avatar(
        self,
        avatar_id: str,
        account_id: str,
        *,
        title: str | None = UNSET,
        description: str | None = UNSET,
        tags: Sequence[str] = UNSET,
        visibility: str = UNSET,
        metadata: Mapping[str, Any] = UNSET,
    ) -> Avatar:
        sets: list[str] = []
        params: list[Any] = []
        if title is not UNSET:
            if title is not None and not isinstance(title, str):
                raise InvalidArgument("title", "must be a string or null")
            sets.append("title = ?")
            params.append(title)
        if description is not UNSET:
            if description is not None and not isinstance(description, str):
                raise InvalidArgument("description", "must be a string or null")
            sets.append("description = ?")
            params.append(description)
        if tags is not UNSET:
            sets.append("tags = ?")
            params.append(_dumps(self._check_tags(tags)))
        if metadata is not UNSET:
            if not isinstance(metadata, Mapping):
                raise InvalidArgument("metadata", "must be a JSON object")
            sets.append("metadata = ?")
            params.append(_dumps(dict(metadata)))
        if visibility is not UNSET:
            if visibility not in VISIBILITIES:
                raise InvalidArgument("visibility", f"must be one of {', '.join(VISIBILITIES)}, got {visibility!r}")
            sets.append("visibility = ?")
            params.append(visibility)
            if visibility != "public":
                sets.append("published = FALSE")
                sets.append("published_at = NULL")

        def work(c: _Cursor) -> Avatar:
            row = self._owned_row(c, avatar_id, account_id)
            if not sets:
                return self._avatar(row)
            updated = c.one(f"UPDATE avatars SET {', '.join(sets)}, updated_at = ? WHERE id = ? RETURNING *",
                            (*params, self._now(), avatar_id))
            return self._avatar(updated)

        return self._run(work)

    def publish_avatar(self, avatar_id: str, account_id: str) -> Avatar:
        def work(c: _Cursor) -> Avatar:
            row = self._owned_row(c, avatar_id, account_id)
            if row["status"] != "completed":
                raise InvalidState(avatar_id, row["status"], "only completed avatars can be published")
            if bool(row["published"]) and row["visibility"] == "public":
                return self._avatar(row)
            now = self._now()
            updated = c.one("UPDATE avatars SET visibility = 'public', published = TRUE,"
                            " published_at = ?, updated_at = ? WHERE id = ? RETURNING *",
                            (now, now, avatar_id))
            avatar = self._avatar(updated)
            self._emit(c, "avatar.published", avatar)
            return avatar

        return self._run(work)

    def delete_avatar(self, avatar_id: str, account_id: str) -> Avatar:
        def work(c: _Cursor) -> Avatar:
            row = self._owned_row(c, avatar_id, account_id)
            avatar = self._avatar(row)
            if avatar.status in ACTIVE_STATUSES:
                avatar = self._finish(c, avatar_id, "cancelled", token=None, code="cancelled",
                                      message="deleted by the user") or avatar
            c.run("DELETE FROM likes WHERE avatar_id = ?", (avatar_id,))
            c.run("DELETE FROM comments WHERE avatar_id = ?", (avatar_id,))
            c.run("DELETE FROM avatars WHERE id = ?", (avatar_id,))
            return avatar

        return self._run(work)

    def feed(self, *, limit: int = 20, cursor: str | None = None, sort: str = "newest") -> Page[Avatar]:
        _check_limit(limit)
        if sort not in ("newest", "most_liked"):
            raise InvalidArgument("sort", f"must be newest or most_liked, got {sort!r}")
        column = "published_at" if sort == "newest" else "likes"
        where = ["published = TRUE", "visibility = 'public'"]
        return self._run(lambda c: self._page(c, where, [], column, "desc", f"feed:{sort}", limit, cursor),
                         write=False)

    # ---- likes & comments -----------------------------------------------------------------
    def like(self, avatar_id: str, account_id: str) -> LikeResult:
        def work(c: _Cursor) -> LikeResult:
            current = c.one("SELECT likes FROM avatars WHERE id = ?", (avatar_id,))
            if current is None:
                raise AvatarNotFound(avatar_id)
            inserted = c.one("INSERT INTO likes (avatar_id, account_id, created_at) VALUES (?, ?, ?)"
                             " ON CONFLICT (avatar_id, account_id) DO NOTHING RETURNING avatar_id",
                             (avatar_id, account_id, self._now()))
            if inserted is None:
                row = c.one("SELECT likes FROM avatars WHERE id = ?", (avatar_id,))
                return LikeResult(False, int(row["likes"]) if row else 0)
            row = c.one("UPDATE avatars SET likes = likes + 1 WHERE id = ? RETURNING *", (avatar_id,))
            if row is None:  # deleted concurrently: roll the like back
                raise AvatarNotFound(avatar_id)
            avatar = self._avatar(row)
            self._emit(c, "avatar.liked", avatar, {"liked_by": account_id})
            return LikeResult(True, avatar.likes)

        return self._run(work)

    def unlike(self, avatar_id: str, account_id: str) -> LikeResult:
        def work(c: _Cursor) -> LikeResult:
            if c.one("SELECT id FROM avatars WHERE id = ?", (avatar_id,)) is None:
                raise AvatarNotFound(avatar_id)
            removed = c.run("DELETE FROM likes WHERE avatar_id = ? AND account_id = ?",
                            (avatar_id, account_id))
            if removed:
                row = c.one("UPDATE avatars SET likes = likes - 1 WHERE id = ? RETURNING likes",
                            (avatar_id,))
            else:
                row = c.one("SELECT likes FROM avatars WHERE id = ?", (avatar_id,))
            if row is None:
                raise AvatarNotFound(avatar_id)
            return LikeResult(bool(removed), int(row["likes"]))

        return self._run(work)

    def has_liked(self, avatar_id: str, account_id: str) -> bool:
        return self._run(lambda c: c.one(
            "SELECT 1 AS x FROM likes WHERE avatar_id = ? AND account_id = ?",
            (avatar_id, account_id)) is not None, write=False)

    def add_comment(self, avatar_id: str, account_id: str, text: str) -> Comment:
        if not isinstance(text, str) or not text.strip() or len(text) > _MAX_COMMENT_LEN:
            raise InvalidArgument("text", f"must be 1..{_MAX_COMMENT_LEN} characters")
        comment_id = new_id("cm")

        def work(c: _Cursor) -> Comment:
            row = c.one("UPDATE avatars SET comments = comments + 1 WHERE id = ? RETURNING *", (avatar_id,))
            if row is None:
                raise AvatarNotFound(avatar_id)
            now = self._now()
            c.run("INSERT INTO comments (id, avatar_id, account_id, text, created_at) VALUES (?, ?, ?, ?, ?)",
                  (comment_id, avatar_id, account_id, text, now))
            comment = Comment(comment_id, avatar_id, account_id, text, now)
            self._emit(c, "avatar.commented", self._avatar(row),
                       {"comment": {"id": comment_id, "account_id": account_id, "text": text,
                                    "created_at": now}})
            return comment

        return self._run(work)

    def list_comments(self, avatar_id: str, *, limit: int = 20, cursor: str | None = None,
                      sort_order: str = "asc") -> Page[Comment]:
        _check_limit(limit)
        if sort_order not in ("asc", "desc"):
            raise InvalidArgument("sortOrder", f"must be asc or desc, got {sort_order!r}")
        tag = f"comments:{sort_order}"
        where = ["avatar_id = ?"]
        params: list[Any] = [avatar_id]
        if cursor:
            value, last_id = _cursor_decode(tag, cursor)
            clause, extra = self._keyset("created_at", sort_order, value, last_id)
            where.append(clause)
            params.extend(extra)
        direction = sort_order.upper()
        rows = self._run(lambda c: c.all(
            f"SELECT * FROM comments WHERE {' AND '.join(where)}"
            f" ORDER BY created_at {direction}, id {direction} LIMIT ?", (*params, limit + 1)),
            write=False)
        items = [self._comment(r) for r in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            last = rows[limit - 1]
            next_cursor = _cursor_encode(tag, last["created_at"], last["id"])
        return Page(items, next_cursor)

    # ---- idempotency ----------------------------------------------------------------------
    def begin_idempotent(self, account_id: str, key: str, request_hash: str, *,
                         stale_after_s: float = IDEMPOTENCY_STALE_S) -> IdempotencyResult:
        if not key or len(key) > 255:
            raise InvalidArgument("Idempotency-Key", "must be 1..255 characters")

        def work(c: _Cursor) -> IdempotencyResult:
            now = self._now()
            for _ in range(3):
                inserted = c.one(
                    "INSERT INTO idempotency_keys (account_id, key, request_hash, status, created_at,"
                    " updated_at, expires_at) VALUES (?, ?, ?, 'in_flight', ?, ?, ?)"
                    " ON CONFLICT (account_id, key) DO NOTHING RETURNING key",
                    (account_id, key, request_hash, now, now, now + IDEMPOTENCY_TTL_S))
                if inserted is not None:
                    return IdempotencyResult(IdempotencyState.NEW)
                row = c.one("SELECT * FROM idempotency_keys WHERE account_id = ? AND key = ?" + c.for_update,
                            (account_id, key))
                if row is None:
                    continue  # abandoned between our insert and select: try again
                expired = row["expires_at"] <= now
                stale = row["status"] == "in_flight" and row["updated_at"] < now - stale_after_s
                if expired or stale:
                    c.run("UPDATE idempotency_keys SET request_hash = ?, status = 'in_flight',"
                          " response_status = NULL, response_body = NULL, response_headers = NULL,"
                          " created_at = ?, updated_at = ?, expires_at = ? WHERE account_id = ? AND key = ?",
                          (request_hash, now, now, now + IDEMPOTENCY_TTL_S, account_id, key))
                    return IdempotencyResult(IdempotencyState.NEW)
                if not hmac.compare_digest(str(row["request_hash"]).encode(), str(request_hash).encode()):
                    return IdempotencyResult(IdempotencyState.MISMATCH)
                if row["status"] == "in_flight":
                    return IdempotencyResult(IdempotencyState.IN_FLIGHT)
                return IdempotencyResult(IdempotencyState.REPLAY, StoredResponse(
                    status=int(row["response_status"]), body=bytes(row["response_body"] or b""),
                    headers=_loads(row["response_headers"]) or {}))
            raise RuntimeError(f"idempotency key {key!r} kept changing under contention")

        return self._run(work)

    def finish_idempotent(self, account_id: str, key: str, status: int, body: bytes,
                          headers: Mapping[str, str] | None = None) -> None:
        self._run(lambda c: c.run(
            "UPDATE idempotency_keys SET status = 'done', response_status = ?, response_body = ?,"
            " response_headers = ?, updated_at = ? WHERE account_id = ? AND key = ?",
            (int(status), bytes(body), _dumps(dict(headers or {})), self._now(), account_id, key)))

    def abandon_idempotent(self, account_id: str, key: str) -> None:
        self._run(lambda c: c.run(
            "DELETE FROM idempotency_keys WHERE account_id = ? AND key = ? AND status = 'in_flight'",
            (account_id, key)))

    def purge_expired(self) -> int:
        def work(c: _Cursor) -> int:
            now = self._now()
            n = c.run("DELETE FROM idempotency_keys WHERE expires_at <= ?", (now,))
            # A window still counts (weighted) during the next one: keep it one window longer.
            # window_end / (window_id + 1) is the window's length.
            n += c.run("DELETE FROM rate_limits WHERE window_end + window_end / (window_id + 1) <= ?", (now,))
            return n

        return self._run(work)

    # ---- rate limiting --------------------------------------------------------------------
    def hit_rate_limit(self, account_id: str, limit: int, *, window_seconds: float = 60.0) -> RateLimitDecision:
        """Sliding-window counter (the approximation Cloudflare and nginx-style limiters use):
        the previous window's count, weighted by how much of it still overlaps the last
        `window_seconds`, plus the current window's count must stay under `limit`. A fixed
        window alone would let 2×limit through around a boundary."""
        if window_seconds <= 0:
            raise InvalidArgument("window_seconds", "must be positive")
        bucket = f"{account_id}:{window_seconds:g}"

        def work(c: _Cursor) -> RateLimitDecision:
            now = self._now()
            window_id = int(math.floor(now / window_seconds))
            elapsed = now - window_id * window_seconds
            window_end = (window_id + 1) * window_seconds
            if limit <= 0:
                return RateLimitDecision(False, 0, window_end - now)
            prev_row = c.one("SELECT count FROM rate_limits WHERE bucket = ? AND window_id = ?",
                             (bucket, window_id - 1))
            prev = int(prev_row["count"]) if prev_row else 0
            carried = prev * (1.0 - elapsed / window_seconds)
            cap = int(math.floor(limit - carried + 1e-9))  # most requests the current window may hold now
            row = None
            if cap >= 1:
                row = c.one(
                    "INSERT INTO rate_limits (bucket, window_id, count, window_end) VALUES (?, ?, 1, ?)"
                    " ON CONFLICT (bucket, window_id) DO UPDATE SET count = rate_limits.count + 1"
                    " WHERE rate_limits.count < ? RETURNING count",
                    (bucket, window_id, window_end, cap))
            if row is None:
                cur_row = c.one("SELECT count FROM rate_limits WHERE bucket = ? AND window_id = ?",
                                (bucket, window_id))
                cur = int(cur_row["count"]) if cur_row else 0
                return RateLimitDecision(False, 0, self._retry_after(limit, prev, cur, elapsed, window_seconds))
            count = int(row["count"])
            if count == 1:  # first hit of a new window: windows before the previous one are dead
                c.run("DELETE FROM rate_limits WHERE bucket = ? AND window_id < ?", (bucket, window_id - 1))
            return RateLimitDecision(True, max(0, cap - count), window_end - now)

        return self._run(work)

    @staticmethod
    def _retry_after(limit: int, prev: int, cur: int, elapsed: float, window: float) -> float:
        """Seconds until one more request fits the sliding window (for Retry-After)."""
        if cur >= limit:  # wait for this window to end and enough of it to slide out
            return (window - elapsed) + window * (1.0 - (limit - 1) / cur)
        # the previous window's weight must fall to limit - 1 - cur
        return max(0.0, window * (1.0 - (limit - 1 - cur) / prev) - elapsed) if prev else 0.0

    # ---- webhooks -------------------------------------------------------------------------
    def create_endpoint(self, account_id: str, url: str, events: Sequence[str] = ("*",), *,
                        secret: str | None = None, description: str | None = None) -> WebhookEndpoint:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")) or len(url) > 2048:
            raise InvalidArgument("url", "must be an http(s) URL of at most 2048 characters")
        if isinstance(events, str) or not events:
            raise InvalidArgument("events", "must be a non-empty list of event types")
        bad = [e for e in events if e != "*" and e not in EVENT_TYPES]
        if bad:
            raise InvalidArgument("events", f"unknown event types {bad}; known: {', '.join(EVENT_TYPES)}")
        secret = secret or "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
        endpoint_id = new_id("wh")
        events_list = sorted(set(events))

        def work(c: _Cursor) -> WebhookEndpoint:
            if c.one("SELECT id FROM accounts WHERE id = ?", (account_id,)) is None:
                raise AccountNotFound(account_id)
            now = self._now()
            row = c.one("INSERT INTO webhook_endpoints (id, account_id, url, events, secret, description,"
                        " disabled, consecutive_failures, created_at, updated_at)"
                        " VALUES (?, ?, ?, ?, ?, ?, FALSE, 0, ?, ?) RETURNING *",
                        (endpoint_id, account_id, url, _dumps(events_list), secret, description, now, now))
            return self._endpoint(row)

        return self._run(work)

    def list_endpoints(self, account_id: str) -> list[WebhookEndpoint]:
        rows = self._run(lambda c: c.all(
            "SELECT * FROM webhook_endpoints WHERE account_id = ? ORDER BY created_at, id", (account_id,)),
            write=False)
        return [self._endpoint(r) for r in rows]

    def get_endpoint(self, account_id: str, endpoint_id: str) -> WebhookEndpoint | None:
        row = self._run(lambda c: c.one(
            "SELECT * FROM webhook_endpoints WHERE id = ? AND account_id = ?", (endpoint_id, account_id)),
            write=False)
        return self._endpoint(row) if row else None

    def delete_endpoint(self, account_id: str, endpoint_id: str) -> bool:
        def work(c: _Cursor) -> bool:
            if c.run("DELETE FROM webhook_endpoints WHERE id = ? AND account_id = ?",
                     (endpoint_id, account_id)) == 0:
                return False
            c.run("DELETE FROM webhook_outbox WHERE endpoint_id = ?", (endpoint_id,))
            return True

        return self._run(work)

    def set_endpoint_disabled(self, account_id: str, endpoint_id: str, disabled: bool,
                              reason: str | None = None) -> WebhookEndpoint:
        def work(c: _Cursor) -> WebhookEndpoint:
            if disabled:
                row = c.one("UPDATE webhook_endpoints SET disabled = TRUE, disabled_reason = ?,"
                            " updated_at = ? WHERE id = ? AND account_id = ? RETURNING *",
                            (reason, self._now(), endpoint_id, account_id))
            else:
                row = c.one("UPDATE webhook_endpoints SET disabled = FALSE, disabled_reason = NULL,"
                            " consecutive_failures = 0, updated_at = ? WHERE id = ? AND account_id = ?"
                            " RETURNING *", (self._now(), endpoint_id, account_id))
            if row is None:
                raise EndpointNotFound(endpoint_id)
            return self._endpoint(row)

        return self._run(work)

    _DELIVERY_SELECT = ("SELECT o.*, e.url, e.secret, e.consecutive_failures FROM webhook_outbox o"
                        " JOIN webhook_endpoints e ON e.id = o.endpoint_id")

    def claim_deliveries(self, worker_id: str, limit: int = 10, lease_seconds: float = 30.0) -> list[Delivery]:
        _check_limit(limit, "limit", 1000)

        def work(c: _Cursor) -> list[Delivery]:
            now = self._now()
            c.run("UPDATE webhook_outbox SET status = 'failed', last_error = 'endpoint disabled',"
                  " updated_at = ? WHERE status = 'pending' AND next_attempt_at <= ? AND endpoint_id IN"
                  " (SELECT id FROM webhook_endpoints WHERE disabled = TRUE)", (now, now))
            rows = c.all("SELECT id FROM webhook_outbox WHERE status = 'pending' AND next_attempt_at <= ?"
                         " AND (lease_expires_at IS NULL OR lease_expires_at < ?)"
                         " ORDER BY next_attempt_at, created_at, id LIMIT ?" + c.skip_locked,
                         (now, now, limit))
            claimed = []
            for r in rows:
                token = secrets.token_urlsafe(16)
                if c.run("UPDATE webhook_outbox SET lease_owner = ?, lease_token = ?, lease_expires_at = ?,"
                         " updated_at = ? WHERE id = ? AND status = 'pending'"
                         " AND (lease_expires_at IS NULL OR lease_expires_at < ?)",
                         (worker_id, token, now + lease_seconds, now, r["id"], now)):
                    row = c.one(self._DELIVERY_SELECT + " WHERE o.id = ?", (r["id"],))
                    if row is not None:
                        claimed.append(self._delivery(row))
            return claimed

        return self._run(work)

    def mark_delivered(self, message_id: str, lease_token: str) -> bool:
        def work(c: _Cursor) -> bool:
            now = self._now()
            row = c.one("UPDATE webhook_outbox SET status = 'delivered', attempts = attempts + 1,"
                        " delivered_at = ?, updated_at = ?, lease_owner = NULL, lease_token = NULL,"
                        " lease_expires_at = NULL, last_error = NULL"
                        " WHERE id = ? AND status = 'pending' AND lease_token = ? RETURNING endpoint_id",
                        (now, now, message_id, lease_token))
            if row is None:
                return False
            c.run("UPDATE webhook_endpoints SET consecutive_failures = 0 WHERE id = ?", (row["endpoint_id"],))
            return True

        return self._run(work)

    def mark_attempt_failed(self, message_id: str, lease_token: str, error: str, *,
                            next_attempt_at: float | None, disable_endpoint: bool = False,
                            disable_reason: str | None = None) -> bool:
        def work(c: _Cursor) -> bool:
            now = self._now()
            status = "pending" if next_attempt_at is not None else "failed"
            row = c.one("UPDATE webhook_outbox SET status = ?, attempts = attempts + 1, last_error = ?,"
                        " next_attempt_at = ?, updated_at = ?, lease_owner = NULL, lease_token = NULL,"
                        " lease_expires_at = NULL WHERE id = ? AND status = 'pending' AND lease_token = ?"
                        " RETURNING endpoint_id",
                        (status, str(error)[:2000],
                         next_attempt_at if next_attempt_at is not None else now, now,
                         message_id, lease_token))
            if row is None:
                return False
            if disable_endpoint:
                c.run("UPDATE webhook_endpoints SET consecutive_failures = consecutive_failures + 1,"
                      " disabled = TRUE, disabled_reason = ?, updated_at = ? WHERE id = ?",
                      (disable_reason or "too many failed deliveries", now, row["endpoint_id"]))
            else:
                c.run("UPDATE webhook_endpoints SET consecutive_failures = consecutive_failures + 1"
                      " WHERE id = ?", (row["endpoint_id"],))
            return True

        return self._run(work)

    def list_deliveries(self, account_id: str, *, endpoint_id: str | None = None,
                        limit: int = 100) -> list[Delivery]:
        _check_limit(limit, "limit", 1000)
        sql = self._DELIVERY_SELECT + " WHERE o.account_id = ?"
        params: list[Any] = [account_id]
        if endpoint_id is not None:
            sql += " AND o.endpoint_id = ?"
            params.append(endpoint_id)
        sql += " ORDER BY o.created_at DESC, o.id DESC LIMIT ?"
        rows = self._run(lambda c: c.all(sql, (*params, limit)), write=False)
        return [self._delivery(r) for r in rows]
