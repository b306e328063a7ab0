"""Idempotency keys and per-account rate-limit windows: request bookkeeping shared by every
ingress replica through the database."""
from __future__ import annotations

import hmac
import math
from typing import Mapping

import functools

from sqlalchemy import Connection, bindparam, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite

from ..vocab import IdempotencyStatus
from .base import StorePart, dialect_insert
from .records import (
    IDEMPOTENCY_STALE_S, IDEMPOTENCY_TTL_S, IdempotencyResult, IdempotencyState, InvalidArgument, RateLimitDecision,
    StoredResponse,
)
from .schema import idempotency_keys as K, rate_limits as R


_WINDOW_COUNT = select(R.c.count).where(R.c.bucket == bindparam("bucket"), R.c.window_id == bindparam("wid"))
_DROP_OLD_WINDOWS = delete(R).where(R.c.bucket == bindparam("bucket"), R.c.window_id < bindparam("wid"))


@functools.cache
def _count_hit(dialect: str):
    """INSERT the window's first hit, or add one while the count is below `cap` (RETURNING it)."""
    stmt = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(R)
    return stmt.on_conflict_do_update(index_elements=["bucket", "window_id"], set_={"count": R.c.count + 1},
                                      where=R.c.count < bindparam("cap")).returning(R.c.count)


def retry_after(limit: int, prev: int, cur: int, elapsed: float, window: float) -> float:
    """Seconds until one more request fits the sliding window (for Retry-After)."""
    if cur >= limit:  # wait for this window to end and enough of it to slide out
        return (window - elapsed) + window * (1.0 - (limit - 1) / cur)
    # the previous window's weight must fall to limit - 1 - cur
    return max(0.0, window * (1.0 - (limit - 1 - cur) / prev) - elapsed) if prev else 0.0


class LimitsStore(StorePart):
    # ---- idempotency -------------------------------------------------------------------
    def begin_idempotent(self, account_id: str, key: str, request_hash: str, *,
                         stale_after_s: float = IDEMPOTENCY_STALE_S) -> IdempotencyResult:
        """Atomically claim (account_id, key). NEW: an in_flight row was inserted (or an expired
        row / an in_flight row older than `stale_after_s` was taken over): proceed, then call
        `finish_idempotent` or `abandon_idempotent`. REPLAY: finished with the same hash.
        MISMATCH: another hash (422). IN_FLIGHT: first request still running (409)."""
        if not key or len(key) > 255:
            raise InvalidArgument("Idempotency-Key", "must be 1..255 characters")
        this = (K.c.account_id == account_id) & (K.c.key == key)

        def work(conn: Connection) -> IdempotencyResult:
            now = self._now()
            fresh = dict(request_hash=request_hash, status=IdempotencyStatus.IN_FLIGHT, created_at=now, updated_at=now,
                         expires_at=now + IDEMPOTENCY_TTL_S)
            for _ in range(3):
                inserted = conn.execute(dialect_insert(conn, K).values(account_id=account_id, key=key, **fresh)
                                        .on_conflict_do_nothing(index_elements=["account_id", "key"])
                                        .returning(K.c.key)).first()
                if inserted is not None:
                    return IdempotencyResult(IdempotencyState.NEW)
                row = conn.execute(select(K).where(this).with_for_update()).mappings().first()
                if row is None:
                    continue  # abandoned between our insert and select: try again
                expired = row["expires_at"] <= now
                stale = row["status"] == IdempotencyStatus.IN_FLIGHT and row["updated_at"] < now - stale_after_s
                if expired or stale:
                    conn.execute(update(K).where(this).values(**fresh, response_status=None, response_body=None,
                                                              response_headers=None))
                    return IdempotencyResult(IdempotencyState.NEW)
                if not hmac.compare_digest(str(row["request_hash"]).encode(), str(request_hash).encode()):
                    return IdempotencyResult(IdempotencyState.MISMATCH)
                if row["status"] == IdempotencyStatus.IN_FLIGHT:
                    return IdempotencyResult(IdempotencyState.IN_FLIGHT)
                return IdempotencyResult(IdempotencyState.REPLAY, StoredResponse(
                    status=int(row["response_status"]), body=bytes(row["response_body"] or b""),
                    headers=row["response_headers"] or {}))
            raise RuntimeError(f"idempotency key {key!r} kept changing under contention")

        return self.db.run(work)

    def finish_idempotent(self, account_id: str, key: str, status: int, body: bytes,
                          headers: Mapping[str, str] | None = None) -> None:
        """Store the response and mark the record done (replayed for 24 h from creation).
        The caller decides what is final: the service stores 2xx and most 4xx (402 included, as
        Stripe does) but abandons 409/429, whose retry should run again once allowed."""
        self.db.run(lambda c: c.execute(
            update(K).where(K.c.account_id == account_id, K.c.key == key)
            .values(status=IdempotencyStatus.DONE, response_status=int(status), response_body=bytes(body),
                    response_headers=dict(headers or {}), updated_at=self._now())))

    def abandon_idempotent(self, account_id: str, key: str) -> None:
        """Delete an in_flight record so a retry runs afresh. Policy: call it when the request
        failed with a 5xx / unexpected exception before anything was committed."""
        self.db.run(lambda c: c.execute(delete(K).where(K.c.account_id == account_id, K.c.key == key,
                                                        K.c.status == IdempotencyStatus.IN_FLIGHT)))

    def purge_expired(self) -> int:
        """Delete expired idempotency records and old rate-limit windows; returns rows removed."""
        def work(conn: Connection) -> int:
            now = self._now()
            n = conn.execute(delete(K).where(K.c.expires_at <= now)).rowcount
            # A window still counts (weighted) during the next one: keep it one window longer.
            # window_end / (window_id + 1) is the window's length.
            n += conn.execute(delete(R).where(R.c.window_end + R.c.window_end / (R.c.window_id + 1) <= now)).rowcount
            return n

        return self.db.run(work)

    # ---- rate limiting -----------------------------------------------------------------
    def hit_rate_limit(self, account_id: str, limit: int, *, window_seconds: float = 60.0) -> RateLimitDecision:
        """Count one request against a sliding window of `window_seconds` (shared by all
        processes): the previous fixed window's count, weighted by its remaining overlap, plus
        the current one's (the approximation Cloudflare and nginx-style limiters use; a fixed
        window alone would let 2×limit through around a boundary). Refused requests are not
        counted. Returns (allowed, remaining, reset_seconds): time to the current window's end
        when allowed, the wait until one more request fits when refused (for Retry-After)."""
        if window_seconds <= 0:
            raise InvalidArgument("window_seconds", "must be positive")
        bucket = f"{account_id}:{window_seconds:g}"

        def count(conn: Connection, window_id: int) -> int:
            return int(conn.execute(_WINDOW_COUNT, {"bucket": bucket, "wid": window_id}).scalar() or 0)

        def work(conn: Connection) -> RateLimitDecision:
            now = self._now()
            window_id = int(math.floor(now / window_seconds))
            elapsed = now - window_id * window_seconds
            window_end = (window_id + 1) * window_seconds
            if limit <= 0:
                return RateLimitDecision(False, 0, window_end - now)
            prev = count(conn, window_id - 1)
            carried = prev * (1.0 - elapsed / window_seconds)
            cap = int(math.floor(limit - carried + 1e-9))  # most requests the current window may hold now
            hits = None
            if cap >= 1:
                hits = conn.execute(_count_hit(conn.dialect.name), {
                    "bucket": bucket, "window_id": window_id, "count": 1, "window_end": window_end, "cap": cap,
                }).scalar()
            if hits is None:
                return RateLimitDecision(False, 0, retry_after(limit, prev, count(conn, window_id), elapsed,
                                                               window_seconds))
            if hits == 1:  # first hit of a new window: windows before the previous one are dead
                conn.execute(_DROP_OLD_WINDOWS, {"bucket": bucket, "wid": window_id - 1})
            return RateLimitDecision(True, max(0, cap - int(hits)), window_end - now)

        return self.db.run(work)
