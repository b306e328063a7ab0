"""One batch through the engine: claimed jobs → engine requests → one `generate` call, with its
progress persisted off the engine's thread; a failing batch is retried one job at a time so one
bad request does not fail its batch-mates, and a batch nobody waits for any more is abandoned."""
from __future__ import annotations

import threading
import time
from typing import Any

from avatar_engine.errors import AvatarEngineError
from avatar_engine.requests import GenerationRequest

from ..engine_client import EngineRunner
from ..logctx import logger, request_context
from ..loops import BackgroundLoop
from ..store import Avatar, Store
from ..vocab import JobErrorCode, JobStatus
from .jobs import BatchReport, JobBuildError, Outcomes, WorkerContext, build_engine_request
from .liveness import Leases
from .previews import PreviewFrames

log = logger("serve.worker")

#: A generated job waiting for post-processing: (job, engine result, generation seconds).
Finished = tuple[Avatar, Any, float]


class BatchAbandoned(Exception):
    """Raised from the progress callback to abort an engine call nobody waits for any more."""


class CancelRequested(Exception):
    """Raised from the progress callback at a step boundary: the owners of `avatar_ids` asked to
    cancel them (`POST /v1/avatars/{id}/cancel` on a processing job)."""

    def __init__(self, avatar_ids: set[str]):
        super().__init__(sorted(avatar_ids))
        self.avatar_ids = set(avatar_ids)


class ProgressWriter:
    """Persists the running batch's progress off the engine's thread: the engine's per-step
    callback only records the latest (step, total) and preview images in memory; this loop writes
    them to the store (`set_progress`, one short transaction) at most once per `interval`, and only
    when something changed, then reads which of its jobs their owners asked to cancel (one short
    read) for the callback to act on. A slow or failing write never stalls the GPU."""

    def __init__(self, store: Store, worker_id: str, leases: dict[str, str], interval: float, held: Leases,
                 previews: PreviewFrames | None = None):
        self.store, self.worker_id, self.leases, self.held = store, worker_id, dict(leases), held
        self.previews = previews
        self._latest: tuple[int, int] | None = None
        self._written: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._loop = BackgroundLoop("job-progress", self.flush, max(0.05, interval))
        self.cancel_requested: set[str] = set()
        self.writes = 0

    def __enter__(self) -> "ProgressWriter":
        self._loop.start()
        return self

    def __exit__(self, *exc) -> None:
        self._loop.stop(timeout=5)

    def report(self, step: int, total: int) -> None:
        with self._lock:
            self._latest = (int(step), int(total))

    def flush(self) -> None:
        with self._lock:
            latest = self._latest
        if latest is None:
            return
        changed, frames = self.previews.frames_due() if self.previews else (False, {})
        live = {k: v for k, v in self.leases.items() if not self.held.is_lost(k)}
        try:
            if latest != self._written or changed:
                self.store.set_progress(self.worker_id, live, *latest, previews=frames)
                self._written = latest
                self.writes += 1
            asked = self.store.cancel_requested(list(live))
            if asked:
                with self._lock:
                    self.cancel_requested = self.cancel_requested | asked
        except Exception:  # noqa: BLE001 - progress is best effort
            log.debug("progress write failed", exc_info=True)

    def cancelled(self) -> set[str]:
        with self._lock:
            return set(self.cancel_requested)


class BatchRunner:
    def __init__(self, ctx: WorkerContext, engine: EngineRunner, outcomes: Outcomes):
        self.ctx, self.engine, self.outcomes = ctx, engine, outcomes

    def build(self, jobs: list[Avatar], report: BatchReport) -> list[tuple[Avatar, GenerationRequest]]:
        """Each job's engine request; a job whose stored params no longer make one fails here."""
        runnable: list[tuple[Avatar, GenerationRequest]] = []
        for job in jobs:
            try:
                runnable.append((job, build_engine_request(job, self.ctx.assets)))
            except (JobBuildError, AvatarEngineError) as exc:
                self.outcomes.fail(job, exc.code, exc.message, report)
            except Exception:  # noqa: BLE001
                with request_context(job.request_id):
                    log.exception("cannot build request for job %s", job.id)
                self.outcomes.fail(job, JobErrorCode.INVALID_JOB, "The stored job parameters are invalid", report)
        return runnable

    def run(self, runnable: list[tuple[Avatar, GenerationRequest]], report: BatchReport,
            finished: list[Finished]) -> None:
        """One engine call; successful results are appended to `finished` for post-processing."""
        t0 = time.perf_counter()
        ids = [job.id for job, _ in runnable]

        ctx = self.ctx
        previews = PreviewFrames(ids)
        writer = ProgressWriter(ctx.store, ctx.worker_id, {job.id: job.lease_token for job, _ in runnable},
                                ctx.settings.progress_interval_s, ctx.leases, previews)

        def progress(done: int, total: int) -> None:
            # Every job of this call was cancelled/deleted/reclaimed: stop spending the GPU on it.
            if all(self.ctx.leases.is_lost(i) for i in ids):
                raise BatchAbandoned()
            asked = writer.cancelled()  # what the writer's last store read found; no I/O here
            if asked:
                raise CancelRequested(asked)
            writer.report(done, total)  # in memory; the writer thread persists it, throttled

        try:
            with writer:
                results = self.engine.generate([r for _, r in runnable], progress=progress, preview=previews.offer)
            if len(results) != len(runnable):
                raise RuntimeError(f"engine returned {len(results)} results for {len(runnable)} requests")
        except BatchAbandoned:
            for job, _ in runnable:
                self.outcomes.drop(job, report)
                if self.ctx.store.job_statuses([job.id]).get(job.id) in (None, JobStatus.CANCELLED):
                    self.ctx.assets.delete_avatar(job.id)
                self.ctx.leases.release(job.id)
            return
        except CancelRequested as stop:
            self._cancelled(runnable, stop.avatar_ids, report, finished)
            return
        except Exception as exc:  # noqa: BLE001
            self._failed(runnable, exc, report, finished)
            return
        elapsed = time.perf_counter() - t0
        if ctx.metrics:
            ctx.metrics.observe_generation(elapsed, runnable[0][1].model or "", len(runnable))
        finished.extend((job, result, elapsed) for (job, _), result in zip(runnable, results))

    def _cancelled(self, runnable: list[tuple[Avatar, GenerationRequest]], asked: set[str], report: BatchReport,
                   finished: list[Finished]) -> None:
        """The engine call stopped at a step boundary because owners cancelled some of its jobs:
        those end `cancelled` (credits released once, by the store's lease-guarded finish); the
        rest of the batch, which nobody cancelled, runs again without them."""
        rest = []
        for job, request in runnable:
            if job.id not in asked:
                rest.append((job, request))
                continue
            try:
                if self.ctx.store.finish_cancelled(job.id, job.lease_token) is not None:
                    report.cancelled.append(job.id)
                    self.outcomes.note(job, "cancelled")
                    self.outcomes.release_photos(job)
                else:
                    self.outcomes.drop(job, report)
                if self.ctx.store.job_statuses([job.id]).get(job.id) in (None, JobStatus.CANCELLED):
                    self.ctx.assets.delete_avatar(job.id)
            finally:
                self.ctx.leases.release(job.id)
        if rest:
            self.run(rest, report, finished)

    def _failed(self, runnable: list[tuple[Avatar, GenerationRequest]], exc: Exception, report: BatchReport,
                finished: list[Finished]) -> None:
        """A batch that raised is run again one job at a time (isolating the bad request); a single
        job that raised fails with the engine's code, or `generation_failed` for anything else."""
        if len(runnable) > 1:
            log.warning("batch of %d failed (%s); retrying one by one", len(runnable), exc)
            for item in runnable:
                if not self.ctx.leases.is_lost(item[0].id):
                    self.run([item], report, finished)
                else:
                    self.outcomes.drop(item[0], report)
                    self.ctx.leases.release(item[0].id)
            return
        job = runnable[0][0]
        if isinstance(exc, AvatarEngineError):
            self.outcomes.fail(job, exc.code, exc.message, report)
        else:
            with request_context(job.request_id):
                log.exception("generation failed for job %s", job.id)
            self.outcomes.fail(job, JobErrorCode.GENERATION_FAILED, "Image generation failed; the credits were released",
                               report)
