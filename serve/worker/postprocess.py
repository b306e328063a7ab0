"""Post-processing in a bounded pool: each generated job's images are checked (safety), encoded,
uploaded and the job completed with its lease token (charge + outbox in one transaction), while
the engine generates the next batch. At most `post_queue_batches` batches wait (backpressure);
a job whose result cannot be stored goes back to the queue, or fails once out of attempts."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from ..assets import encode_png
from ..imaging import JobMarker, image_marker
from ..logctx import logger, request_context
from ..store import Avatar
from ..vocab import JobErrorCode, JobStatus, Visibility
from .batches import Finished
from .jobs import BatchReport, Outcomes, WorkerContext
from .payload import refund_for, result_payload, safety_outcome

log = logger("serve.worker")


class PostProcessor:
    def __init__(self, ctx: WorkerContext, outcomes: Outcomes, on_batch: Callable[[BatchReport], None] | None = None):
        settings = ctx.settings
        self.ctx, self.outcomes, self.on_batch = ctx, outcomes, on_batch
        self.batches_done = 0
        self._pool = ThreadPoolExecutor(settings.resolved_post_workers, thread_name_prefix="job-post")
        self._slots = threading.BoundedSemaphore(settings.post_queue_batches)
        self._in_post = 0
        self._idle = threading.Condition()

    def submit(self, finished: list[Finished], report: BatchReport, *, wait: bool) -> None:
        """Finish each job in the pool. With `wait` False the caller goes on (the next generation)
        once the batch is queued; beyond `post_queue_batches` batches queued it waits for a slot."""
        self._slots.acquire()
        with self._idle:
            self._in_post += 1
        remaining = [len(finished)]
        lock = threading.Lock()
        done = threading.Event()

        def batch_done() -> None:
            self.batches_done += 1
            self._slots.release()
            with self._idle:
                self._in_post -= 1
                self._idle.notify_all()
            done.set()
            if self.on_batch:
                try:
                    self.on_batch(report)
                except Exception:  # noqa: BLE001
                    log.exception("on_batch callback failed")

        def finish_one(job: Avatar, result: Any, elapsed: float) -> None:
            try:
                self._finish_or_retry(job, result, elapsed, report)
            finally:
                with lock:
                    remaining[0] -= 1
                    last = remaining[0] == 0
                if last:
                    batch_done()

        if not finished:
            batch_done()
        for item in finished:
            self._pool.submit(finish_one, *item)
        if wait:
            done.wait()

    def wait_idle(self, timeout: float | None) -> None:
        """Until every submitted batch is post-processed (or `timeout`)."""
        with self._idle:
            self._idle.wait_for(lambda: self._in_post == 0, timeout)

    def _finish_or_retry(self, job: Avatar, result: Any, elapsed: float, report: BatchReport) -> None:
        try:
            self._finish(job, result, elapsed, report)
        except Exception:  # noqa: BLE001 - one job's storage error must not lose its batch-mates
            with request_context(job.request_id):
                log.exception("could not store the result of job %s", job.id)
            self._retry_or_fail(job, report)
        finally:
            self.ctx.leases.release(job.id)

    def _retry_or_fail(self, job: Avatar, report: BatchReport) -> None:
        """Saving a result failed (asset backend or store error): hand the job back to the queue
        for another attempt, or fail it (credits released) once it has used its attempts. If the
        store is down too, the lease simply expires and the job is reclaimed or reaped later."""
        try:
            if job.attempts >= self.ctx.settings.max_attempts:
                self.outcomes.fail(job, JobErrorCode.STORAGE_FAILED,
                                   "The generated images could not be stored; the credits were released", report)
            elif self.ctx.store.requeue_job(job.id, job.lease_token):
                report.retried.append(job.id)
                self.outcomes.note(job, "retried")
            else:
                if self.ctx.store.job_statuses([job.id]).get(job.id) in (None, JobStatus.CANCELLED):
                    self.ctx.assets.delete_avatar(job.id)  # deleted meanwhile: drop any partial files
                self.outcomes.drop(job, report)
        except Exception:  # noqa: BLE001
            with request_context(job.request_id):
                log.exception("could not requeue job %s; its lease will expire", job.id)

    def _finish(self, job: Avatar, result: Any, elapsed: float, report: BatchReport) -> None:
        if self.ctx.leases.is_lost(job.id):
            self.outcomes.drop(job, report)
            return
        t0 = time.perf_counter()
        images = list(result.images)
        outcome = safety_outcome(result, images, self.ctx.settings, self.ctx.policy)
        if self.ctx.metrics and outcome is not None:
            self.ctx.metrics.observe_safety(outcome.verdicts, outcome.decisions)
        if outcome is not None and outcome.all_blocked:
            self.outcomes.fail(job, JobErrorCode.BLOCKED, "Every generated image was blocked by the image safety "
                                                          "check; the credits were released", report)
            return
        mark = self._job_marker(job, result)
        stored = []
        for i, (img, seed) in enumerate(zip(images, result.seeds)):
            kept = outcome.images[i] if outcome is not None else img
            if kept is None:  # blocked: dropped, the delivered images keep consecutive indexes
                continue
            info = self.ctx.assets.put_image(job.id, len(stored), kept, mark)
            if self.ctx.metrics:
                self.ctx.metrics.observe_encode(info.encode_seconds, info.width, info.height)
            entry = {"key": info.key, "width": info.width, "height": info.height, "seed": int(seed)}
            if outcome is not None:
                entry["safety"] = outcome.safety_json(i)
            stored.append(entry)
        payload = result_payload(job.id, result, stored, elapsed)
        refund = 0
        if outcome is not None:
            refund = refund_for(job.credit_cost, len(outcome.blocked), len(images))
            payload["publishable"] = all(e["safety"]["action"] == "pass" for e in stored)
            if refund:
                payload["creditsRefunded"] = refund
        completed = self.ctx.store.complete_job(job.id, job.lease_token, payload, refund=refund)
        if self.ctx.metrics:
            self.ctx.metrics.observe_postprocess(time.perf_counter() - t0)
        if completed:
            report.completed.append(job.id)
            self.outcomes.note(job, "completed")
            self.outcomes.release_photos(job)
            return
        # Not ours any more: cancelled/deleted while running (drop the files) or reclaimed by
        # another worker after our lease expired (it writes the same keys; leave them).
        status = self.ctx.store.job_statuses([job.id]).get(job.id)
        if status in (None, JobStatus.CANCELLED):
            self.ctx.assets.delete_avatar(job.id)
        self.outcomes.drop(job, report)

    def _job_marker(self, job: Avatar, result: Any) -> JobMarker | None:
        """Watermark + Content Credentials for this job's images (None when both are off)."""
        marker = image_marker(self.ctx.settings)
        if marker is None:
            return None
        params = {"kind": job.kind, **(job.params or {})}
        return JobMarker(marker, job.id, model=job.model or getattr(result.request, "model", "") or "",
                         identity_method=(job.params or {}).get("identityMethod"), params=params,
                         public=job.visibility == Visibility.PUBLIC, png_encoder=encode_png)
