"""Files that must go, recorded in the same transaction as the change that dooms them.

A job's reference photos must not outlive it (`photo_retention: job`), and a deleted avatar's
images must not outlive the avatar. Deleting those files inline, after the transaction, is the
fast path (worker, cancel, delete endpoints); but a process that dies between the commit and the
delete, a job ended by a path that never held the files (a reaped job, a cancel the worker
finished), or an unreachable object store would leave them behind for good. So every terminal
transition of a job with uploads, and every avatar deletion, also writes an `asset_deletions` row
(an outbox for file deletions); the housekeeper (`serve.housekeeping.Housekeeper`) deletes what
those rows name once they are a grace period old and removes the rows. Deleting a prefix twice
is harmless, so the inline path and the sweep never need to agree on who did it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from sqlalchemy import Connection, delete, insert, select, update

from ..vocab import AssetDeletionReason
from .base import StorePart, check_limit, new_id
from .schema import asset_deletions as D


@dataclass(frozen=True)
class AssetDeletion:
    """One prefix of the asset store to delete (`uploads/<id>`, `avatars/<id>`)."""

    id: str
    prefix: str
    reason: str  # AssetDeletionReason: `photos` (a job ended) or `avatar` (the avatar was deleted)
    avatar_id: str | None  # None: photos written for a submission that was never accepted
    created_at: float
    attempts: int
    last_error: str | None


def _to_deletion(r: Mapping[str, Any]) -> AssetDeletion:
    return AssetDeletion(id=r["id"], prefix=r["prefix"], reason=r["reason"], avatar_id=r["avatar_id"],
                         created_at=r["created_at"], attempts=int(r["attempts"]), last_error=r["last_error"])


def upload_prefix(params: Mapping[str, Any] | None) -> str | None:
    """`uploads/<uploadId>` of a job submitted with reference photos or an init image, else None."""
    upload_id = (params or {}).get("uploadId")
    return f"uploads/{upload_id}" if upload_id else None


class AssetCleanupStore(StorePart):
    def queue_asset_deletions(self, conn: Connection, prefixes: Sequence[str], reason: AssetDeletionReason,
                              avatar_id: str | None) -> None:
        """Record prefixes to delete, inside the caller's transaction (so they commit with it)."""
        now = self._now()
        rows = [dict(id=new_id("del"), prefix=p, reason=str(reason), avatar_id=avatar_id, created_at=now, attempts=0)
                for p in dict.fromkeys(prefixes) if p]
        if rows:
            conn.execute(insert(D), rows)

    def expect_upload(self, prefix: str) -> None:
        """Before a submission writes its photos: queue their deletion, to be cancelled by the
        `submit_job` that accepts the job (same prefix). A process killed between the writes and
        the job's commit, or a refused submission, leaves the row, and the sweep deletes the files."""
        self.db.run(lambda c: self.queue_asset_deletions(c, [prefix], AssetDeletionReason.PHOTOS, None))

    def _accept_upload(self, conn: Connection, params: Mapping[str, Any]) -> None:
        """Inside `submit_job`: the job now owns its photos; they go when it ends (`_finish`)."""
        prefix = upload_prefix(params)
        if prefix:
            conn.execute(delete(D).where(D.c.prefix == prefix, D.c.avatar_id.is_(None)))

    def due_asset_deletions(self, older_than_s: float, limit: int = 100) -> list[AssetDeletion]:
        """Rows at least `older_than_s` old (the inline delete had its chance; a worker that was
        still writing the avatar's images when it was deleted has finished): fewest failed
        attempts first, then oldest, so a prefix that keeps failing never holds the others back."""
        check_limit(limit, "limit", 1000)
        before = self._now() - max(0.0, float(older_than_s))
        stmt = select(D).where(D.c.created_at <= before).order_by(D.c.attempts, D.c.created_at, D.c.id).limit(limit)
        return self.db.read(lambda c: [_to_deletion(r) for r in c.execute(stmt).mappings()])

    def finish_asset_deletions(self, ids: Sequence[str]) -> int:
        """The named rows' files are gone (or are deliberately kept): forget them."""
        if not ids:
            return 0
        return self.db.run(lambda c: c.execute(delete(D).where(D.c.id.in_(list(ids)))).rowcount)

    def fail_asset_deletion(self, deletion_id: str, error: str) -> None:
        """The delete raised (object store down): the row stays for the next sweep, with why."""
        self.db.run(lambda c: c.execute(update(D).where(D.c.id == deletion_id)
                                        .values(attempts=D.c.attempts + 1, last_error=error[:500])))
