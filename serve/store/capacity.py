"""Read-only queue figures for autoscaling: how much work waits and how much a worker holds.

Kept apart from `jobs` (the queue's write paths) so the scaler's reads stay small and obvious:
one grouped count over the `status` index, one count per worker over its leases.
"""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import bindparam, func, select

from ..vocab import JobStatus
from .schema import avatars as A

_QUEUED = select(func.count()).select_from(A).where(A.c.status == JobStatus.QUEUED)
_HELD_BY = select(func.count()).select_from(A).where(A.c.status == JobStatus.PROCESSING,
                                                     A.c.lease_owner == bindparam("owner"))


@dataclass(frozen=True)
class WorkerLoad:
    """What one model replica reports to the autoscaler."""

    queued: int
    """Jobs waiting in the whole queue (every replica sees the same number)."""
    leases: int
    """Jobs this worker holds a lease on (claimed, not yet finished or released)."""

    def to_metrics(self) -> dict[str, float]:
        return {"queued": float(self.queued), "leases": float(self.leases)}


def worker_load(store, worker_id: str) -> WorkerLoad:
    """The queue depth and `worker_id`'s lease count, read in one transaction."""
    def work(conn) -> WorkerLoad:
        return WorkerLoad(int(conn.execute(_QUEUED).scalar_one()),
                          int(conn.execute(_HELD_BY, {"owner": worker_id}).scalar_one()))

    return store.db.read(work)
