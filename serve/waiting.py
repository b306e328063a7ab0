"""Results without polling: `Prefer: wait[=N]` on create requests and the per-avatar event stream.

How a waiter learns about changes: **bounded polling of the store with backoff**. Each poll is
one short read (`Store.watch_rows`: id, status, progress) that takes a pooled connection and
gives it back at once, every `wait_poll_min_s` at first and backing off ×1.5 to
`wait_poll_max_s` while nothing changes (reset on every change). It works the same on SQLite
and PostgreSQL and across any number of ingress replicas and worker processes, because the
store is where every change lands; nothing is held between polls — no database connection, no
engine slot (the engine never serves HTTP requests anyway), only an asyncio task. A Postgres
LISTEN/NOTIFY notifier would cut the latency but pins one connection per listening replica and
needs a SQLite fallback anyway; polling was chosen for one code path.

Bounds (`Waiters`): at most `max_waiters` waiting requests per ingress process, and per account
at most its tier's concurrent-generations number (in each process). A `Prefer: wait` over the
bound is simply not honoured (the 202 comes back at once, without `Preference-Applied`); an
event stream over it is a 429. Keep `max_waiters` below the ingress's `max_ongoing_requests`,
since a waiting request counts as ongoing for Ray Serve.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from contextlib import contextmanager
from typing import Any, AsyncIterator, Iterator

from starlette.concurrency import run_in_threadpool

from .settings import ServiceSettings
from .vocab import TERMINAL_STATUSES


class Waiters:
    """Counts waiting requests per process and per account (thread-safe: TestClient runs
    requests on several event loops)."""

    def __init__(self, settings: ServiceSettings):
        self.max_total = settings.max_waiters
        self._lock = threading.Lock()
        self._total = 0
        self._per_account: dict[str, int] = {}

    def try_acquire(self, account_id: str, account_limit: int) -> bool:
        with self._lock:
            mine = self._per_account.get(account_id, 0)
            if self._total >= self.max_total or mine >= max(1, account_limit):
                return False
            self._total += 1
            self._per_account[account_id] = mine + 1
            return True

    def release(self, account_id: str) -> None:
        with self._lock:
            self._total -= 1
            left = self._per_account.get(account_id, 1) - 1
            if left > 0:
                self._per_account[account_id] = left
            else:
                self._per_account.pop(account_id, None)

    @contextmanager
    def slot(self, account_id: str, account_limit: int) -> Iterator[bool]:
        """`with waiters.slot(acct, limit) as ok:` — ok is False when over a bound."""
        ok = self.try_acquire(account_id, account_limit)
        try:
            yield ok
        finally:
            if ok:
                self.release(account_id)

    @property
    def active(self) -> int:
        with self._lock:
            return self._total


def parse_prefer_wait(header: str | None, max_s: float) -> float | None:
    """Seconds to wait from a `Prefer` header (RFC 7240): `wait` → max_s, `wait=N` → min(N, max_s);
    None when there is no usable `wait` preference (other or malformed preferences are ignored,
    as RFC 7240 asks)."""
    if not header:
        return None
    for pref in header.split(","):
        token = pref.split(";", 1)[0].strip()
        name, eq, value = token.partition("=")
        if name.strip().lower() != "wait":
            continue
        if not eq:
            return float(max_s)
        value = value.strip().strip('"')
        if value.isdigit():
            return float(min(int(value), max_s))
        return None
    return None


State = tuple[str, Any]  # (status, progress) of one avatar; None when it no longer exists


async def watch(store: Any, avatar_id: str, settings: ServiceSettings, deadline: float,
                keepalive_s: float | None = None) -> AsyncIterator[State | None | str]:
    """Yield the avatar's (status, progress) each time it changes (first its current state),
    `None` once if it disappears, and the string "keepalive" after `keepalive_s` of silence; ends
    after a terminal status, its deletion, or at `deadline` (time.monotonic())."""
    delay = settings.wait_poll_min_s
    last: Any = ()
    quiet_since = time.monotonic()
    while True:
        rows = await run_in_threadpool(store.watch_rows, [avatar_id])
        cur = rows.get(avatar_id)
        state = (cur[0], cur[1]) if cur else None
        now = time.monotonic()
        if state != last:
            yield state
            last, delay, quiet_since = state, settings.wait_poll_min_s, now
            if state is None or state[0] in TERMINAL_STATUSES:
                return
        elif keepalive_s is not None and now - quiet_since >= keepalive_s:
            yield "keepalive"
            quiet_since = now
        remaining = deadline - now
        if remaining <= 0:
            return
        await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 1.5, settings.wait_poll_max_s)


async def wait_for_end(store: Any, avatar_id: str, settings: ServiceSettings, seconds: float) -> str | None:
    """Wait up to `seconds` for the avatar to reach a terminal status; returns the last status
    seen (None: deleted)."""
    status = None
    async for state in watch(store, avatar_id, settings, time.monotonic() + seconds):
        if isinstance(state, tuple):
            status = state[0]
        elif state is None:
            return None
    return status


def sse(event: str, data: Any, event_id: int | None = None) -> bytes:
    """One Server-Sent Events message."""
    lines = [f"event: {event}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append("data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False))
    return ("\n".join(lines) + "\n\n").encode("utf-8")
