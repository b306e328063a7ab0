"""Worker registry and liveness: which jobs this worker holds (`Leases`), and the heartbeat that
registers it in `worker_instances`, extends those leases every `heartbeat_seconds` and retires
dead workers of the same host so their jobs are reclaimed at once."""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Iterator

from ..logctx import logger
from ..loops import BackgroundLoop
from ..settings import ServiceSettings
from ..store import Avatar, Store

log = logger("serve.worker")


def process_start_time(pid: int) -> str | None:
    """The process's start time (Linux `/proc/<pid>/stat` field 22), which tells a live
    registered process from another one that reused its pid; None where unavailable."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_alive(pid: int, start: str | None) -> bool:
    """Is the process `pid` (started at `start`, if known) still running on this host?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if start is not None:
        now = process_start_time(pid)
        if now is not None and now != start:
            return False  # the pid was reused
    return True


class Leases:
    """The jobs this worker holds (claimed, generating or in post-processing) with their lease
    tokens, and those it has learnt are no longer its own (cancelled, deleted, reclaimed)."""

    def __init__(self) -> None:
        self._held: dict[str, str] = {}
        self._lost: set[str] = set()
        self._lock = threading.Lock()

    def add(self, jobs: list[Avatar]) -> None:
        with self._lock:
            self._held.update({j.id: j.lease_token for j in jobs})

    def release(self, avatar_id: str) -> None:
        with self._lock:
            self._held.pop(avatar_id, None)
            self._lost.discard(avatar_id)

    def snapshot(self) -> set[str]:
        with self._lock:
            return set(self._held)

    def lost_except(self, before: set[str], still_held: set[str]) -> None:
        """Ids held when the heartbeat started that the store no longer lets this worker hold."""
        with self._lock:
            self._lost |= (before - still_held) & set(self._held)

    def is_lost(self, avatar_id: str) -> bool:
        with self._lock:
            return avatar_id in self._lost

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)


class Heartbeat:
    """Registered and beating while at least one user (the worker loop, a `run_once`) needs it;
    unregistered when the last one leaves. A beat is one transaction that also extends the
    leases of every job in `leases`, whatever its stage."""

    def __init__(self, store: Store, settings: ServiceSettings, leases: Leases, *, worker_id: str, host: str,
                 pid: int, process_start: str | None):
        self.store, self.settings, self.leases = store, settings, leases
        self.worker_id, self.host, self.pid, self.process_start = worker_id, host, pid, process_start
        self._loop = BackgroundLoop("job-worker-heartbeat", self._beat_once, settings.resolved_heartbeat_seconds,
                                    wait_first=True)
        self._users = 0
        self._lock = threading.Lock()
        self._beats = 0

    @contextmanager
    def held(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()

    def acquire(self) -> None:
        with self._lock:
            self._users += 1
            if self._users == 1:
                self._register()
                self._loop.start()

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users:
                return
            self._loop.stop(timeout=self.settings.resolved_heartbeat_seconds + 5)
            try:
                self.store.unregister_worker(self.worker_id)
            except Exception:  # noqa: BLE001 - the row goes stale and is retired by others
                log.warning("could not unregister worker %s", self.worker_id, exc_info=True)

    def _register(self) -> None:
        try:
            self.store.register_worker(self.worker_id, self.host, self.pid, self.process_start)
            self.retire_dead_neighbours()
        except Exception:  # noqa: BLE001 - the heartbeat registers again
            log.warning("could not register worker %s", self.worker_id, exc_info=True)

    def retire_dead_neighbours(self) -> list[str]:
        """Workers registered from this host whose process is gone (a crashed replica, the
        previous run of a restarted service) are dead now: release their jobs at once instead
        of waiting for their heartbeat to go stale. Returns the released job ids."""
        dead = [w.id for w in self.store.list_workers()
                if w.host == self.host and w.id != self.worker_id and not process_alive(w.pid, w.process_start)]
        released = self.store.retire_workers(dead) if dead else []
        if dead:
            log.warning("retired dead workers %s; %d job(s) released for reclaiming", dead, len(released))
        return released

    def _beat_once(self) -> bool:
        before = self.leases.snapshot()
        try:
            held = self.store.worker_heartbeat(self.worker_id, self.settings.lease_seconds, sorted(before),
                                               host=self.host, pid=self.pid, process_start=self.process_start)
        except Exception:  # noqa: BLE001 - a DB blip must not kill the batch; the lease has slack
            log.warning("heartbeat failed", exc_info=True)
            return False
        self.leases.lost_except(before, held)
        self._beats += 1
        if self._beats % 5 == 0:
            try:
                self.retire_dead_neighbours()
            except Exception:  # noqa: BLE001
                log.debug("retiring dead workers failed", exc_info=True)
        return False
