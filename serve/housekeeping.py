"""The ingress replicas' chores: expired idempotency records and rate-limit windows go, and so do
the files the store queued for deletion (`store.cleanup`: a job's reference photos once it ended,
a deleted avatar's images) that the inline delete missed — a process killed between commit and
delete, a job reaped or cancelled on a path that never held the files, an object store that was
down. Cheap and idempotent: every ingress replica may run one."""
from __future__ import annotations

from typing import Any

from .assets import AssetStore
from .logctx import logger
from .loops import BackgroundLoop
from .vocab import AssetDeletionReason

log = logger("serve.housekeeping")

#: A queued deletion waits this long before the sweep acts: the inline delete normally did it,
#: and a worker still writing the images of an avatar deleted under it has finished by then.
DELETION_GRACE_S = 300.0
SWEEP_BATCH = 200
SWEEP_MAX_BATCHES = 50  # per run: a backlog drains over several runs, never one unbounded pass


class Housekeeper:
    """`run_once()` every `interval_s` on a background thread (first run one interval after start)."""

    def __init__(self, store: Any, interval_s: float = 600.0, *, assets: AssetStore | None = None,
                 photo_retention: str = "job", deletion_grace_s: float = DELETION_GRACE_S):
        self.store, self.interval_s, self.assets = store, interval_s, assets
        self.photo_retention, self.deletion_grace_s = photo_retention, deletion_grace_s
        self._loop = BackgroundLoop("avatar-housekeeper", self._step, interval_s, wait_first=True)

    def start(self) -> "Housekeeper":
        self._loop.start()
        return self

    def run_once(self) -> int:
        """Rows purged plus file deletions done; never raises (retried next interval)."""
        done = 0
        try:
            removed = self.store.purge_expired()
            log.info("housekeeping: removed %d expired rows", removed)
            done += removed
        except Exception:  # noqa: BLE001 - retried next interval; never kill the replica
            log.exception("housekeeping failed")
        try:
            done += self.sweep_assets()
        except Exception:  # noqa: BLE001
            log.exception("asset deletion sweep failed")
        return done

    def sweep_assets(self) -> int:
        """Delete the files of due `asset_deletions` rows and forget the rows; a prefix whose delete
        raises keeps its row (attempts and error recorded) for the next run. Under
        `photo_retention: avatar` a finished job's photos stay: their row is dropped, and the
        avatar's deletion queues them again; photos of a submission never accepted always go.
        Returns the prefixes deleted."""
        if self.assets is None:
            return 0
        deleted = 0
        for _ in range(SWEEP_MAX_BATCHES):
            due = self.store.due_asset_deletions(self.deletion_grace_s, SWEEP_BATCH)
            finished, failed = [], 0
            for item in due:
                kept = item.avatar_id is not None and self.photo_retention != "job"  # None: never accepted
                if item.reason == AssetDeletionReason.PHOTOS and kept:
                    finished.append(item.id)
                    continue
                try:
                    self.assets.backend.delete_prefix(item.prefix)
                except Exception as exc:  # noqa: BLE001 - the row stays; the store may be back next run
                    failed += 1
                    log.warning("could not delete %s (avatar %s): %r", item.prefix, item.avatar_id, exc)
                    self.store.fail_asset_deletion(item.id, repr(exc))
                    continue
                finished.append(item.id)
                deleted += 1
            self.store.finish_asset_deletions(finished)
            if len(due) < SWEEP_BATCH or failed:
                break
        if deleted:
            log.info("housekeeping: deleted %d queued asset prefixes", deleted)
        return deleted

    def stop(self) -> None:
        self._loop.stop(timeout=5)

    def _step(self) -> bool:
        self.run_once()
        return False  # a chore per interval, never "more work now"
