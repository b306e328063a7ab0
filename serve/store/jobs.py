"""Jobs and their leases: the store is the durable queue (submit on the ingress, claim/heartbeat/
complete on the workers), with the credit reservation and its settlement in the same transactions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from sqlalchemy import Connection, bindparam, case, delete, false, func, insert, or_, select, update

from ..vocab import (
    ACTIVE_STATUSES, JOB_KINDS, VISIBILITIES, AssetDeletionReason, EventType, JobErrorCode, JobStatus, LedgerKind,
    Visibility,
)
from .base import StorePart, check_choice, check_limit, new_id, new_token
from .cleanup import upload_prefix
from .records import (
    DEFAULT_MAX_ATTEMPTS, WORKER_LOST_CODE, AccountNotFound, Avatar, AvatarNotFound, ConcurrencyLimitExceeded,
    InsufficientCredits, InvalidArgument, PermissionDenied,
)
from .base import dialect_insert
from .schema import accounts, avatars as A, worker_instances as W

_ACTIVE = A.c.status.in_(ACTIVE_STATUSES)
_EXPIRED = (A.c.status == JobStatus.PROCESSING) & (A.c.lease_expires_at < bindparam("now"))

# The hot paths' statements, built once (SQLAlchemy then only binds parameters).
_ACTIVE_COUNT = select(func.count()).select_from(A).where(A.c.account_id == bindparam("acct"), _ACTIVE)
_LOCK_ACCOUNT = select(accounts.c.id, accounts.c.credits).where(accounts.c.id == bindparam("acct")).with_for_update()
_COUNT_REMIX = update(A).where(A.c.id == bindparam("src")).values(remixes=A.c.remixes + 1)
_INSERT_JOB = insert(A).returning(*A.c)
_FINISH_ANY = update(A).where(A.c.id == bindparam("aid"), _ACTIVE).returning(*A.c)
_FINISH_HELD = update(A).where(A.c.id == bindparam("aid"), A.c.status == JobStatus.PROCESSING,
                               A.c.lease_token == bindparam("token")).returning(*A.c)
_LOCK_AVATAR = select(A).where(A.c.id == bindparam("aid")).with_for_update()
_CLAIM = (update(A).where(A.c.id == bindparam("aid"), (A.c.status == JobStatus.QUEUED) | _EXPIRED)
          .values(status=JobStatus.PROCESSING, attempts=A.c.attempts + 1, progress=None).returning(*A.c))
_HEARTBEAT = update(A).where(A.c.id == bindparam("aid"), A.c.lease_token == bindparam("token"),
                             A.c.lease_owner == bindparam("owner"), A.c.status == JobStatus.PROCESSING)
_REQUEUE = update(A).where(A.c.id == bindparam("aid"), A.c.status == JobStatus.PROCESSING,
                           A.c.lease_token == bindparam("token"))
_QUEUE_STATS = select(A.c.status, func.count()).where(_ACTIVE).group_by(A.c.status)
# Worker instances: one statement extends every lease a live worker holds (whatever stage its
# jobs are in); a dead worker's leases are expired (set to 0, "long ago") so they are claimable.
_EXTEND_OWNED = (update(A).where(A.c.lease_owner == bindparam("owner"), A.c.status == JobStatus.PROCESSING,
                                 A.c.id.in_(bindparam("ids", expanding=True)))
                 .values(lease_expires_at=bindparam("expires")))
_HELD = select(A.c.id).where(A.c.lease_owner == bindparam("owner"), A.c.status == JobStatus.PROCESSING,
                             A.c.id.in_(bindparam("ids", expanding=True)))
_EXPIRE_OWNED = (update(A).where(A.c.lease_owner.in_(bindparam("owners", expanding=True)),
                                 A.c.status == JobStatus.PROCESSING)
                 .values(lease_expires_at=0.0).returning(A.c.id))
_DROP_INSTANCES = delete(W).where(W.c.id.in_(bindparam("owners", expanding=True)))
_STALE_INSTANCES = select(W.c.id).where(W.c.heartbeat_at < bindparam("before"))

#: Claim order between accounts of one round: higher tiers first.
TIER_PRIORITY = {"enterprise": 0, "pro": 1}


@dataclass(frozen=True)
class WorkerInstance:
    """A registered job worker (`worker_instances` row)."""

    id: str
    host: str
    pid: int
    process_start: str | None
    started_at: float
    heartbeat_at: float


def to_avatar(r: Mapping[str, Any]) -> Avatar:
    return Avatar(
        id=r["id"], account_id=r["account_id"], kind=r["kind"], status=r["status"], model=r["model"],
        prompt=r["prompt"], params=r["params"] or {}, result=r["result"], title=r["title"],
        description=r["description"], tags=r["tags"] or [], metadata=r["metadata"] or {},
        visibility=r["visibility"], published=bool(r["published"]), published_at=r["published_at"],
        likes=int(r["likes"]), comments=int(r["comments"]), remixes=int(r["remixes"]),
        remixed_from=r["remixed_from"], credit_cost=int(r["credit_cost"]), error_code=r["error_code"],
        error_message=r["error_message"], created_at=r["created_at"], updated_at=r["updated_at"],
        started_at=r["started_at"], completed_at=r["completed_at"], lease_owner=r["lease_owner"],
        lease_token=r["lease_token"], lease_expires_at=r["lease_expires_at"], attempts=int(r["attempts"]),
        request_id=r["request_id"], progress=r.get("progress"), link_epoch=int(r.get("link_epoch") or 0),
        cancel_requested_at=r.get("cancel_requested_at"),
    )


#: Bounds on the preview frames kept with a job's progress (one row, rewritten at most once per
#: `progress_interval_s`): one frame per image of the batch, each a small data: URL.
MAX_PREVIEW_FRAMES = 4
MAX_PREVIEW_DATA_URL = 48 * 1024


def check_previews(frames: Any) -> list[dict[str, Any]]:
    """Preview frames as stored: `[{"imageIndex": int, "step": int, "dataUrl": "data:image/…"}]`,
    at most MAX_PREVIEW_FRAMES of at most MAX_PREVIEW_DATA_URL characters (InvalidArgument otherwise)."""
    if isinstance(frames, (str, bytes)) or not isinstance(frames, Sequence) or len(frames) > MAX_PREVIEW_FRAMES:
        raise InvalidArgument("previews", f"must be a list of at most {MAX_PREVIEW_FRAMES} frames")
    out = []
    for f in frames:
        url = f.get("dataUrl") if isinstance(f, Mapping) else None
        index, step = (f.get("imageIndex"), f.get("step")) if isinstance(f, Mapping) else (None, None)
        if not isinstance(url, str) or not url.startswith("data:image/") or len(url) > MAX_PREVIEW_DATA_URL \
                or not isinstance(index, int) or not isinstance(step, int):
            raise InvalidArgument("previews", "each frame is {imageIndex: int, step: int, dataUrl: 'data:image/…' "
                                  f"of at most {MAX_PREVIEW_DATA_URL} characters}}")
        out.append({"imageIndex": index, "step": step, "dataUrl": url})
    return out


def check_tags(tags: Any) -> list[str]:
    if isinstance(tags, str) or not isinstance(tags, Sequence) or not all(isinstance(t, str) for t in tags):
        raise InvalidArgument("tags", "must be a list of strings")
    return list(tags)


def _active_count(conn: Connection, account_id: str) -> int:
    return int(conn.execute(_ACTIVE_COUNT, {"acct": account_id}).scalar_one())


class JobsStore(StorePart):
    # ---- ingress side ------------------------------------------------------------------
    def submit_job(self, account_id: str, kind: str, params: Mapping[str, Any], *, cost: int, max_concurrent: int,
                   model: str | None = None, prompt: str | None = None, remixed_from: str | None = None,
                   title: str | None = None, description: str | None = None, tags: Sequence[str] | None = None,
                   metadata: Mapping[str, Any] | None = None, visibility: str = "private",
                   request_id: str | None = None, low_balance_threshold: int = 0) -> Avatar:
        """Accept a job in ONE transaction: lock the account, refuse with
        ConcurrencyLimitExceeded when it already has >= `max_concurrent` queued+processing jobs,
        with InsufficientCredits when balance < `cost`, else insert the avatar (status queued)
        and a `reserve` ledger entry (balance -= cost). `model`/`prompt` default to
        `params["model"]`/`params["prompt"]`. With `remixed_from`, the source avatar's `remixes`
        count is incremented in the same transaction (AvatarNotFound if it does not exist;
        visibility is the caller's check). `request_id` is kept for log correlation. When the
        reservation takes the balance from >= `low_balance_threshold` to below it, a
        `credits.low_balance` event is written in the same transaction (once per crossing).
        Raises AccountNotFound, InvalidArgument."""
        check_choice(kind, JOB_KINDS, "kind")
        if not isinstance(cost, int) or isinstance(cost, bool) or cost < 0:
            raise InvalidArgument("cost", f"must be a non-negative integer, got {cost!r}")
        if not isinstance(max_concurrent, int) or max_concurrent < 0:
            raise InvalidArgument("max_concurrent", f"must be a non-negative integer, got {max_concurrent!r}")
        check_choice(visibility, VISIBILITIES, "visibility")
        values = dict(
            id=new_id("av"), account_id=account_id, kind=kind, status=JobStatus.QUEUED,
            model=model if model is not None else params.get("model"),
            prompt=prompt if prompt is not None else params.get("prompt"), params=dict(params),
            tags=check_tags(tags if tags is not None else []), metadata=dict(metadata or {}), title=title,
            description=description, visibility=visibility, published=False, remixed_from=remixed_from,
            credit_cost=cost, attempts=0, request_id=request_id)

        def work(conn: Connection) -> Avatar:
            acct = conn.execute(_LOCK_ACCOUNT, {"acct": account_id}).first()
            if acct is None:
                raise AccountNotFound(account_id)
            active = _active_count(conn, account_id)
            if active >= max_concurrent:
                raise ConcurrencyLimitExceeded(active, max_concurrent)
            if int(acct.credits) < cost:
                raise InsufficientCredits(int(acct.credits), cost)
            if remixed_from is not None:
                if conn.execute(_COUNT_REMIX, {"src": remixed_from}).rowcount == 0:
                    raise AvatarNotFound(remixed_from)
            now = self._now()
            row = conn.execute(_INSERT_JOB, {**values, "created_at": now, "updated_at": now}).mappings().one()
            self._accept_upload(conn, values["params"])
            self.move_credits(conn, account_id, -cost)
            self.add_ledger(conn, account_id, LedgerKind.RESERVE, cost, -cost, values["id"], note=kind)
            balance = int(acct.credits) - cost
            if balance < low_balance_threshold <= int(acct.credits):
                self.emit_account_event(conn, account_id, EventType.CREDITS_LOW_BALANCE, {"object": {
                    "object": "credit_balance", "userId": account_id, "balance": balance,
                    "threshold": low_balance_threshold, "avatarId": values["id"]}})
            return to_avatar(row)

        return self.db.run(work)

    def _finish(self, conn: Connection, avatar_id: str, status: JobStatus, *, token: str | None,
                result: Mapping[str, Any] | None = None, code: str | None = None,
                message: str | None = None, refund: int = 0) -> Avatar | None:
        """Move an active job to a terminal status with its ledger entry and event.

        `token` None = any active job (cancel/reap); else only processing with that token."""
        now = self._now()
        values: dict[str, Any] = dict(status=status, error_code=code, error_message=message, completed_at=now,
                                      updated_at=now, lease_owner=None, lease_token=None, lease_expires_at=None)
        if result is not None:
            values["result"] = dict(result)
            if result.get("publishable") is False:  # an image did not pass the safety check
                values.update(visibility=Visibility.PRIVATE, published=False, published_at=None)
        if token is None:
            row = conn.execute(_FINISH_ANY, {"aid": avatar_id, **values}).mappings().first()
        else:
            row = conn.execute(_FINISH_HELD, {"aid": avatar_id, "token": token, **values}).mappings().first()
        if row is None:
            return None
        avatar = to_avatar(row)
        photos = upload_prefix(avatar.params)
        if photos:  # whichever path ended it (worker, cancel, reap, delete), the photos are doomed with it
            self.queue_asset_deletions(conn, [photos], AssetDeletionReason.PHOTOS, avatar.id)
        cost = avatar.credit_cost
        if status == JobStatus.COMPLETED:
            refund = min(max(0, int(refund)), cost)  # blocked images' share, in the same transaction
            self.add_ledger(conn, avatar.account_id, LedgerKind.CHARGE, cost - refund, 0, avatar.id, note=avatar.kind)
            if refund:
                self.move_credits(conn, avatar.account_id, refund)
                self.add_ledger(conn, avatar.account_id, LedgerKind.RELEASE, refund, refund, avatar.id,
                                note="blocked images")
            self.emit(conn, EventType.AVATAR_COMPLETED, avatar)
        else:
            self.move_credits(conn, avatar.account_id, cost)
            self.add_ledger(conn, avatar.account_id, LedgerKind.RELEASE, cost, cost, avatar.id, note=avatar.kind)
            if status == JobStatus.FAILED:
                self.emit(conn, EventType.AVATAR_FAILED, avatar)
        return avatar

    def owned_row(self, conn: Connection, avatar_id: str, account_id: str, action: str = "modify") -> Mapping[str, Any]:
        """The avatar's row, locked (PostgreSQL); AvatarNotFound / PermissionDenied(action) otherwise."""
        row = conn.execute(_LOCK_AVATAR, {"aid": avatar_id}).mappings().first()
        if row is None:
            raise AvatarNotFound(avatar_id)
        if row["account_id"] != account_id:
            raise PermissionDenied(avatar_id, account_id, action)
        return row

    def cancel_job(self, avatar_id: str, account_id: str) -> Avatar:
        """queued/processing -> cancelled with a `release` (refund) entry; the worker learns it
        through `heartbeat` / `job_statuses` / `complete_job` returning False. A job already in
        a terminal status is returned unchanged. Raises AvatarNotFound, PermissionDenied."""
        def work(conn: Connection) -> Avatar:
            row = self.owned_row(conn, avatar_id, account_id, "cancel")
            if row["status"] in ACTIVE_STATUSES:
                done = self._finish(conn, avatar_id, JobStatus.CANCELLED, token=None, code=JobErrorCode.CANCELLED,
                                    message="cancelled by the user")
                if done is not None:
                    return done
            return to_avatar(row)

        return self.db.run(work)

    # ---- worker side -------------------------------------------------------------------
    def _reap(self, conn: Connection, now: float, max_attempts: int) -> list[str]:
        ids = conn.execute(select(A.c.id).where(A.c.status == JobStatus.PROCESSING, A.c.lease_expires_at < now,
                                                A.c.attempts >= max_attempts)
                           .order_by(A.c.created_at, A.c.id).limit(100).with_for_update(skip_locked=True)).scalars().all()
        reaped = []
        for avatar_id in ids:
            done = self._finish(conn, avatar_id, JobStatus.FAILED, token=None, code=WORKER_LOST_CODE,
                                message=f"the job's worker stopped responding {max_attempts} times")
            if done is not None:
                reaped.append(done.id)
        return reaped

    def reap_expired(self, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> list[str]:
        """Fail (with refund and `avatar.failed`) expired processing jobs that already used
        `max_attempts` claims; returns their ids. `claim_jobs` does this too."""
        return self.db.run(lambda c: self._reap(c, self._now(), max_attempts))

    def claim_jobs(self, worker_id: str, limit: int = 1, lease_seconds: float = 60.0, *,
                   kinds: Sequence[str] | None = None, models: Sequence[str | None] | None = None,
                   max_attempts: int = DEFAULT_MAX_ATTEMPTS, dead_after: float | None = None) -> list[Avatar]:
        """Move up to `limit` jobs to processing for `worker_id`: queued ones and processing
        ones whose lease expired (a dead worker's; `attempts` is incremented on every claim).
        Each claimed job gets a fresh `lease_token` that later calls must present.
        Order is fair between accounts: reclaimed jobs first, then round-robin over accounts
        (an account's n-th queued job counts its jobs already processing as earlier turns), higher
        tiers first within a round, oldest first within an account — one account's long
        queue does not hold back another account's single job by more than about one batch.
        With `dead_after`, registered worker instances whose heartbeat is older than that
        many seconds are retired first (their leases expire, so their jobs are claimable now).
        Expired jobs that already had `max_attempts` claims are failed with code
        `worker_lost` and refunded instead. `kinds` / `models` restrict what is claimed
        (a `models` filter also matches jobs whose model is None only if None is listed)."""
        check_limit(limit, "limit", 1000)
        if lease_seconds <= 0:
            raise InvalidArgument("lease_seconds", "must be positive")
        if max_attempts < 1:
            raise InvalidArgument("max_attempts", "must be >= 1")

        def work(conn: Connection) -> list[Avatar]:
            now = self._now()
            if dead_after is not None:
                stale = conn.execute(_STALE_INSTANCES, {"before": now - dead_after}).scalars().all()
                self._retire(conn, [w for w in stale if w != worker_id])
            self._reap(conn, now, max_attempts)
            if (kinds is not None and not kinds) or (models is not None and not models):
                return []
            where = [(A.c.status == JobStatus.QUEUED) | (_EXPIRED & (A.c.attempts < max_attempts))]
            if kinds is not None:
                where.append(A.c.kind.in_(list(kinds)))
            if models is not None:
                named = [m for m in models if m is not None]
                where.append(or_(A.c.model.in_(named) if named else false(),
                                 A.c.model.is_(None) if len(named) < len(models) else false()))
            ids = conn.execute(_fair_order(where, limit), {"now": now}).scalars().all()
            claimed = []
            for avatar_id in ids:
                row = conn.execute(_CLAIM, {
                    "aid": avatar_id, "now": now, "lease_owner": worker_id, "lease_token": new_token(),
                    "lease_expires_at": now + lease_seconds, "started_at": now, "updated_at": now,
                }).mappings().first()
                if row is not None:
                    claimed.append(to_avatar(row))
            return claimed

        return self.db.run(work)

    def heartbeat(self, worker_id: str, leases: Mapping[str, str], lease_seconds: float = 60.0) -> set[str]:
        """Extend the leases {avatar_id: lease_token} still held by `worker_id`; returns the ids
        whose lease was extended. An id missing from the result was cancelled, deleted or
        reclaimed: the worker should stop working on it."""
        if not leases:
            return set()

        def work(conn: Connection) -> set[str]:
            expires = self._now() + lease_seconds
            return {avatar_id for avatar_id, token in leases.items() if conn.execute(_HEARTBEAT, {
                "aid": avatar_id, "token": token, "owner": worker_id, "lease_expires_at": expires}).rowcount}

        return self.db.run(work)

    def set_progress(self, worker_id: str, leases: Mapping[str, str], step: int, total_steps: int,
                     previews: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> int:
        """Record `{"step", "totalSteps"}` on the jobs {avatar_id: lease_token} this worker still
        holds (one short transaction; the worker calls it throttled, never per denoising step).
        `previews`: {avatar_id: [{"imageIndex", "step", "dataUrl"}]}, the latest preview frame of
        each image, kept with the progress for the event stream's `preview` events (bounded by
        `check_previews`). Does not touch `updated_at` (progress is not an edit). Returns the rows updated."""
        if not leases:
            return 0
        value = {"step": int(step), "totalSteps": int(total_steps)}
        frames = {aid: check_previews(p) for aid, p in (previews or {}).items()}
        stmt = (update(A).where(A.c.id == bindparam("aid"), A.c.lease_token == bindparam("token"),
                                A.c.lease_owner == worker_id, A.c.status == JobStatus.PROCESSING)
                .values(progress=bindparam("value")))

        def work(conn: Connection) -> int:
            return sum(conn.execute(stmt, {"aid": a, "token": t, "value": {**value, "previews": frames[a]}
                                           if frames.get(a) else value}).rowcount for a, t in leases.items())

        return self.db.run(work)

    def watch_rows(self, avatar_ids: Sequence[str]) -> dict[str, tuple[str, dict | None]]:
        """{avatar_id: (status, progress)} for the ids that still exist: the cheap read that
        waiters (`Prefer: wait`, event streams) poll with, one short connection per call."""
        ids = list(avatar_ids)
        if not ids:
            return {}
        rows = self.db.read(lambda c: c.execute(select(A.c.id, A.c.status, A.c.progress).where(A.c.id.in_(ids))).all())
        return {r.id: (r.status, r.progress) for r in rows}

    def job_statuses(self, avatar_ids: Sequence[str]) -> dict[str, str]:
        """{avatar_id: status} for the ids that still exist (deleted ids are absent)."""
        ids = list(avatar_ids)
        if not ids:
            return {}
        rows = self.db.read(lambda c: c.execute(select(A.c.id, A.c.status).where(A.c.id.in_(ids))).all())
        return {r.id: r.status for r in rows}

    def active_jobs(self, account_id: str) -> int:
        """The account's queued + processing jobs (the "concurrent generations" in use)."""
        return self.db.read(lambda c: _active_count(c, account_id))

    def queue_stats(self) -> dict[str, int]:
        """{"queued": n, "processing": m} over all accounts (metrics, autoscaling)."""
        rows = self.db.read(lambda c: c.execute(_QUEUE_STATS).all())
        return {"queued": 0, "processing": 0, **{status: int(n) for status, n in rows}}

    def complete_job(self, avatar_id: str, lease_token: str, result: Mapping[str, Any], refund: int = 0) -> bool:
        """processing + matching token -> completed with `result`, a `charge` ledger entry and
        an `avatar.completed` outbox message per subscribed endpoint, in one transaction.
        `refund` credits (images the safety check blocked) go back with a `release` entry in the
        same transaction, so the charge and refund happen exactly once whatever the retries.
        A result with `publishable: false` makes the avatar private (and unpublished).
        False (and no change) when the token does not match or the job is no longer
        processing (cancelled, reclaimed, already completed)."""
        if not isinstance(result, Mapping):
            raise InvalidArgument("result", "must be a JSON object")
        return self.db.run(lambda c: self._finish(c, avatar_id, JobStatus.COMPLETED, token=lease_token,
                                                  result=result, refund=refund) is not None)

    def fail_job(self, avatar_id: str, lease_token: str, code: str, message: str) -> bool:
        """processing + matching token -> failed with error code/message, a `release` (refund)
        entry and `avatar.failed` outbox messages. False when not held any more."""
        return self.db.run(lambda c: self._finish(c, avatar_id, JobStatus.FAILED, token=lease_token, code=code,
                                                  message=message) is not None)

    def requeue_job(self, avatar_id: str, lease_token: str) -> bool:
        """Give a held job back to the queue (graceful worker shutdown, storage error):
        processing -> queued, lease cleared; its attempts count stays. False when not held any more."""
        return self.db.run(lambda c: c.execute(_REQUEUE, {
            "aid": avatar_id, "token": lease_token, "status": JobStatus.QUEUED, "lease_owner": None,
            "lease_token": None, "lease_expires_at": None, "updated_at": self._now()}).rowcount > 0)

    # ---- worker instances ----------------------------------------------------------------
    def _retire(self, conn: Connection, worker_ids: Sequence[str]) -> list[str]:
        if not worker_ids:
            return []
        released = conn.execute(_EXPIRE_OWNED, {"owners": list(worker_ids)}).scalars().all()
        conn.execute(_DROP_INSTANCES, {"owners": list(worker_ids)})
        return list(released)

    def register_worker(self, worker_id: str, host: str, pid: int, process_start: str | None = None) -> None:
        """Announce a live job worker (or refresh it): `worker_heartbeat` keeps it alive."""
        def work(conn: Connection) -> None:
            now = self._now()
            stmt = dialect_insert(conn, W).values(id=worker_id, host=host, pid=int(pid), process_start=process_start,
                                                  started_at=now, heartbeat_at=now)
            conn.execute(stmt.on_conflict_do_update(index_elements=[W.c.id], set_={"heartbeat_at": now}))

        self.db.run(work)

    def worker_heartbeat(self, worker_id: str, lease_seconds: float, avatar_ids: Sequence[str] = (), *,
                         host: str = "", pid: int = 0, process_start: str | None = None) -> set[str]:
        """The worker is alive: refresh its row (re-registering it if it was retired) and extend
        the leases of the jobs `avatar_ids` it is working on (whatever their stage) to now +
        `lease_seconds`, in one transaction. Returns those ids it still holds; one missing was
        cancelled, deleted or reclaimed. Jobs it holds but no longer names (given up after an
        error) are not extended: their leases run out and they are claimed again."""
        ids = list(avatar_ids)

        def work(conn: Connection) -> set[str]:
            now = self._now()
            stmt = dialect_insert(conn, W).values(id=worker_id, host=host, pid=int(pid), process_start=process_start,
                                                  started_at=now, heartbeat_at=now)
            conn.execute(stmt.on_conflict_do_update(index_elements=[W.c.id], set_={"heartbeat_at": now}))
            if not ids:
                return set()
            conn.execute(_EXTEND_OWNED, {"owner": worker_id, "expires": now + lease_seconds, "ids": ids})
            return set(conn.execute(_HELD, {"owner": worker_id, "ids": ids}).scalars().all())

        return self.db.run(work)

    def list_workers(self) -> list[WorkerInstance]:
        """Registered worker instances, oldest first."""
        rows = self.db.read(lambda c: c.execute(select(W).order_by(W.c.started_at, W.c.id)).mappings().all())
        return [WorkerInstance(id=r["id"], host=r["host"], pid=int(r["pid"]), process_start=r["process_start"],
                               started_at=r["started_at"], heartbeat_at=r["heartbeat_at"]) for r in rows]

    def retire_workers(self, worker_ids: Sequence[str]) -> list[str]:
        """Workers known to be dead (a process gone, a stale heartbeat): expire the leases they
        hold so any worker can claim those jobs at once (a claim then issues a new lease token, so
        a late result of the dead worker can no longer complete them) and drop their rows.
        Returns the ids of the jobs released."""
        ids = [w for w in worker_ids]
        return self.db.run(lambda c: self._retire(c, ids)) if ids else []

    def unregister_worker(self, worker_id: str) -> None:
        """A worker stopping cleanly (after handing its jobs back)."""
        self.db.run(lambda c: c.execute(_DROP_INSTANCES, {"owners": [worker_id]}))


def _fair_order(where: list, limit: int):
    """The ids to claim, in fair order, locked (PostgreSQL: FOR UPDATE OF avatars SKIP LOCKED)."""
    turn = func.row_number().over(partition_by=A.c.account_id, order_by=(A.c.created_at, A.c.id))
    cand = select(A.c.id, A.c.account_id, A.c.status, A.c.created_at, turn.label("turn")).where(*where).subquery("cand")
    busy = (select(A.c.account_id, func.count().label("n"))
            .where(A.c.status == JobStatus.PROCESSING, A.c.lease_expires_at >= bindparam("now"))
            .group_by(A.c.account_id).subquery("busy"))
    tier = case(*[(accounts.c.tier == t, p) for t, p in TIER_PRIORITY.items()], else_=len(TIER_PRIORITY))
    return (select(A.c.id)
            .select_from(A.join(cand, cand.c.id == A.c.id).join(accounts, accounts.c.id == cand.c.account_id)
                         .outerjoin(busy, busy.c.account_id == cand.c.account_id))
            .order_by(case((cand.c.status == JobStatus.PROCESSING, 0), else_=1),
                      cand.c.turn + func.coalesce(busy.c.n, 0), tier, cand.c.created_at, cand.c.id)
            .limit(limit).with_for_update(skip_locked=True, of=A))
