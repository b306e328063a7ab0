"""Job control for people watching their jobs: cancel requests and queue positions.

A queued job is cancelled at once (refunded, the record kept). A processing job is only
*marked* (`cancel_requested_at`): its worker, which holds the lease, polls
`cancel_requested` between denoising steps and ends it with `finish_cancelled` (refunded as
well). The store never kills work it does not run."""
from __future__ import annotations

from typing import Sequence

from sqlalchemy import Connection, and_, bindparam, func, or_, select, update

from ..vocab import TERMINAL_STATUSES, JobErrorCode, JobStatus
from .base import StorePart
from .jobs import to_avatar
from .records import Avatar, InvalidState
from .schema import avatars as A

_MARK_CANCEL = (update(A).where(A.c.id == bindparam("aid"), A.c.status == JobStatus.PROCESSING)
                .values(cancel_requested_at=bindparam("now")).returning(*A.c))


def _position(conn: Connection, created_at: float, avatar_id: str) -> int:
    """1 + the queued jobs submitted before this one (the queue's base order; tier priority
    and per-account fairness can move it, so this is an estimate, never a promise)."""
    ahead = conn.execute(select(func.count()).select_from(A).where(
        A.c.status == JobStatus.QUEUED,
        or_(A.c.created_at < created_at, and_(A.c.created_at == created_at, A.c.id < avatar_id)))).scalar_one()
    return int(ahead) + 1


class JobControlStore(StorePart):
    def request_cancel(self, avatar_id: str, account_id: str) -> Avatar:
        """The owner's cancel: queued → cancelled now (with its `release` refund); processing →
        `cancel_requested_at` set (the worker finishes it; repeated calls keep the first time).
        Raises InvalidState for a terminal job, AvatarNotFound, PermissionDenied."""
        def work(conn: Connection) -> Avatar:
            row = self.owned_row(conn, avatar_id, account_id, "cancel")  # type: ignore[attr-defined]
            status = row["status"]
            if status in TERMINAL_STATUSES:
                raise InvalidState(avatar_id, status, "the job already ended; nothing to cancel")
            if status == JobStatus.QUEUED:
                done = self._finish(conn, avatar_id, JobStatus.CANCELLED, token=None,  # type: ignore[attr-defined]
                                    code=JobErrorCode.CANCELLED, message="cancelled by the user")
                if done is not None:
                    return done
            if row["cancel_requested_at"] is not None:
                return to_avatar(row)
            marked = conn.execute(_MARK_CANCEL, {"aid": avatar_id, "now": self._now()}).mappings().first()
            return to_avatar(marked if marked is not None else row)

        return self.db.run(work)

    def cancel_requested(self, avatar_ids: Sequence[str]) -> set[str]:
        """Of `avatar_ids`, the processing jobs whose owner asked to cancel them: the worker's
        check between denoising steps (one short read)."""
        ids = list(avatar_ids)
        if not ids:
            return set()
        rows = self.db.read(lambda c: c.execute(select(A.c.id).where(
            A.c.id.in_(ids), A.c.status == JobStatus.PROCESSING, A.c.cancel_requested_at.is_not(None))).all())
        return {r.id for r in rows}

    def finish_cancelled(self, avatar_id: str, lease_token: str) -> Avatar | None:
        """The worker holding the lease ends a job it stopped on request: processing → cancelled,
        credits released. None when the lease is no longer this token's (reclaimed, already ended)."""
        return self.db.run(lambda c: self._finish(c, avatar_id, JobStatus.CANCELLED,  # type: ignore[attr-defined]
                                                  token=lease_token, code=JobErrorCode.CANCELLED,
                                                  message="cancelled by the user"))

    def queue_positions(self, avatars: Sequence[Avatar]) -> dict[str, int]:
        """{avatar_id: position (1 = next)} for the queued ones of `avatars` (see `_position`)."""
        queued = [a for a in avatars if a.status == JobStatus.QUEUED]
        if not queued:
            return {}
        return self.db.read(lambda c: {a.id: _position(c, a.created_at, a.id) for a in queued})
