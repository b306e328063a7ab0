"""Durable job worker: the store is the queue, this loop is the consumer.

A worker claims up to `max_batch` queued jobs with a lease, keeps the leases alive with a
heartbeat thread while the engine runs, writes the images under deterministic keys and
completes each job with its lease token. Every step is safe to repeat: if the process dies at
any point, the lease expires, another worker (or the restarted one) claims the job again, the
rerun overwrites the same asset keys, and `complete_job` only succeeds for the current lease
holder, so a job completes — and is charged — exactly once.

The same class runs inside the Ray model deployment (`deployments.AvatarModel`) and in tests
(`run_once()` / `drain()` with an injected engine).
"""
from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from avatar_engine.errors import AvatarEngineError
from avatar_engine.protocol import TASK_FIELDS, request_from_wire
from avatar_engine.requests import GenerationRequest

from .logctx import logger, request_context
from .assets import AssetStore
from .loops import BackgroundLoop
from .policy import PolicyChecker
from .settings import ServiceSettings
from .store import Avatar, Store
from .vocab import JobStatus

log = logger("serve.worker")


class JobBuildError(Exception):
    """A stored job cannot be turned into an engine request (missing upload, bad params)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def build_engine_request(job: Avatar, assets: AssetStore) -> GenerationRequest:
    """Stored params (the wire format, resolved at submit; photos and the init image as asset
    keys) → the engine's request, through the one wire ↔ engine conversion (`avatar_engine.protocol`)."""
    def load(key: str):
        try:
            return assets.load_image(key).convert("RGB")
        except FileNotFoundError:
            raise JobBuildError("asset_missing", f"Reference image {key!r} of this job no longer exists") from None

    if job.kind not in TASK_FIELDS:
        raise JobBuildError("unsupported_kind", f"Unknown job kind {job.kind!r}")
    return request_from_wire(job.params, job.kind, load=load, strict=False)


class _BatchAbandoned(Exception):
    """Raised from the progress callback to abort an engine call nobody waits for any more."""


class _Heartbeat:
    """Extends the batch's leases every `interval` seconds; records ids whose lease was lost
    (cancelled, deleted or reclaimed) so the worker does not publish results for them."""

    def __init__(self, store: Store, worker_id: str, leases: dict[str, str], interval: float, lease_seconds: float):
        self.store, self.worker_id, self.leases = store, worker_id, dict(leases)
        self.interval, self.lease_seconds = interval, lease_seconds
        self.lost: set[str] = set()
        self._loop = BackgroundLoop("job-heartbeat", self.beat, interval, wait_first=True)
        self._lock = threading.Lock()

    def __enter__(self) -> "_Heartbeat":
        self._loop.start()
        return self

    def __exit__(self, *exc) -> None:
        self._loop.stop(timeout=self.interval + 5)

    def beat(self) -> None:
        with self._lock:
            live = {k: v for k, v in self.leases.items() if k not in self.lost}
        if not live:
            return
        try:
            alive = self.store.heartbeat(self.worker_id, live, self.lease_seconds)
        except Exception:  # noqa: BLE001 - a DB blip must not kill the batch; the lease has slack
            log.warning("heartbeat failed", exc_info=True)
            return
        with self._lock:
            self.lost |= set(live) - set(alive)

    def is_lost(self, avatar_id: str) -> bool:
        with self._lock:
            return avatar_id in self.lost


class _ProgressWriter:
    """Persists the running batch's progress off the engine's thread: the engine's per-step
    callback only records the latest (step, total) in memory; this loop writes it to the store
    (`set_progress`, one short transaction) at most once per `interval`, and only when it
    changed. A slow or failing write never stalls the GPU."""

    def __init__(self, store: Store, worker_id: str, leases: dict[str, str], interval: float, hb: "_Heartbeat"):
        self.store, self.worker_id, self.leases, self.hb = store, worker_id, dict(leases), hb
        self._latest: tuple[int, int] | None = None
        self._written: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._loop = BackgroundLoop("job-progress", self.flush, max(0.05, interval))
        self.writes = 0

    def __enter__(self) -> "_ProgressWriter":
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
        if latest is None or latest == self._written:
            return
        live = {k: v for k, v in self.leases.items() if not self.hb.is_lost(k)}
        try:
            self.store.set_progress(self.worker_id, live, *latest)
            self._written = latest
            self.writes += 1
        except Exception:  # noqa: BLE001 - progress is best effort
            log.debug("progress write failed", exc_info=True)


@dataclass
class BatchReport:
    claimed: int = 0
    completed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # lease lost (cancelled / reclaimed)
    retried: list[str] = field(default_factory=list)  # result not stored; back in the queue


class JobWorker:
    """Claims, runs and finishes jobs. Thread-safe to `wake()`/`stop()` from other threads."""

    def __init__(self, store: Store, engine: Any, assets: AssetStore, settings: ServiceSettings, *,
                 worker_id: str | None = None, policy: PolicyChecker | None = None, metrics: Any = None,
                 on_batch: Callable[[BatchReport], None] | None = None, models: list[str] | None = None):
        self.store, self.engine, self.assets, self.settings = store, engine, assets, settings
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.policy = policy
        self.metrics = metrics
        self.on_batch = on_batch
        self.served_models = list(models) if models else [engine.default_model]
        self._loop = BackgroundLoop("job-worker", lambda: self.run_once().claimed > 0, settings.poll_seconds)
        self.batches_run = 0

    # -- one step ---------------------------------------------------------------------------
    def run_once(self) -> BatchReport:
        """Claim up to max_batch jobs and run them as one engine call; returns what happened."""
        s = self.settings
        jobs = self.store.claim_jobs(self.worker_id, limit=s.max_batch, lease_seconds=s.lease_seconds,
                                     models=self.served_models, max_attempts=s.max_attempts)
        report = BatchReport(claimed=len(jobs))
        if self.metrics:
            try:
                self.metrics.set_queue_depth(self.store.queue_stats()["queued"])
            except Exception:  # noqa: BLE001 - metrics never break the loop
                log.debug("queue_stats failed", exc_info=True)
        if not jobs:
            return report
        now = time.time()
        if self.metrics:
            self.metrics.observe_batch(len(jobs))
            for j in jobs:
                self.metrics.observe_queue_wait(max(0.0, now - j.created_at))
        for j in jobs:
            with request_context(j.request_id):
                log.info("job %s claimed by %s (attempt %d, batch of %d)", j.id, self.worker_id, j.attempts, len(jobs))
        leases = {j.id: j.lease_token for j in jobs}
        with _Heartbeat(self.store, self.worker_id, leases, s.resolved_heartbeat_seconds, s.lease_seconds) as hb:
            runnable: list[tuple[Avatar, GenerationRequest]] = []
            for job in jobs:
                try:
                    runnable.append((job, build_engine_request(job, self.assets)))
                except JobBuildError as exc:
                    self._fail(job, exc.code, exc.message, report)
                except AvatarEngineError as exc:
                    self._fail(job, exc.code, exc.message, report)
                except Exception:  # noqa: BLE001
                    with request_context(job.request_id):
                        log.exception("cannot build request for job %s", job.id)
                    self._fail(job, "invalid_job", "The stored job parameters are invalid", report)
            if runnable:
                self._run_batch(runnable, hb, report)
        self.batches_run += 1
        if self.on_batch:
            self.on_batch(report)
        return report

    def drain(self, max_batches: int = 1000) -> list[BatchReport]:
        """Run until the queue is empty (tests, CLI one-shot)."""
        reports = []
        for _ in range(max_batches):
            r = self.run_once()
            if not r.claimed:
                break
            reports.append(r)
        return reports

    # -- internals ---------------------------------------------------------------------------
    def _run_batch(self, runnable: list[tuple[Avatar, GenerationRequest]], hb: _Heartbeat, report: BatchReport) -> None:
        t0 = time.perf_counter()
        ids = [job.id for job, _ in runnable]

        writer = _ProgressWriter(self.store, self.worker_id, {job.id: job.lease_token for job, _ in runnable},
                                 self.settings.progress_interval_s, hb)

        def progress(done: int, total: int) -> None:
            # Every job of this call was cancelled/deleted/reclaimed: stop spending the GPU on it.
            if all(hb.is_lost(i) for i in ids):
                raise _BatchAbandoned()
            writer.report(done, total)  # in memory; the writer thread persists it, throttled

        try:
            with writer:
                results = self.engine.generate([r for _, r in runnable], progress=progress)
            if len(results) != len(runnable):
                raise RuntimeError(f"engine returned {len(results)} results for {len(runnable)} requests")
        except _BatchAbandoned:
            report.dropped.extend(ids)
            for job, _ in runnable:
                self._outcome(job, "dropped")
                if self.store.job_statuses([job.id]).get(job.id) in (None, JobStatus.CANCELLED):
                    self.assets.delete_avatar(job.id)
            return
        except Exception as exc:  # noqa: BLE001
            if len(runnable) > 1:
                # Isolate the failing request so one bad job does not fail its batch-mates.
                log.warning("batch of %d failed (%s); retrying one by one", len(runnable), exc)
                for item in runnable:
                    if not hb.is_lost(item[0].id):
                        self._run_batch([item], hb, report)
                return
            job = runnable[0][0]
            if isinstance(exc, AvatarEngineError):
                self._fail(job, exc.code, exc.message, report)
            else:
                with request_context(job.request_id):
                    log.exception("generation failed for job %s", job.id)
                self._fail(job, "generation_failed", "Image generation failed; the credits were released", report)
            return
        elapsed = time.perf_counter() - t0
        if self.metrics:
            self.metrics.observe_generation(elapsed, runnable[0][1].model or "", len(runnable))
        for (job, _), result in zip(runnable, results):
            try:
                self._finish(job, result, elapsed, hb, report)
            except Exception:  # noqa: BLE001 - one job's storage error must not lose its batch-mates
                with request_context(job.request_id):
                    log.exception("could not store the result of job %s", job.id)
                self._retry_or_fail(job, report)

    def _retry_or_fail(self, job: Avatar, report: BatchReport) -> None:
        """Saving a result failed (asset backend or store error): hand the job back to the queue
        for another attempt, or fail it (credits released) once it has used its attempts. If the
        store is down too, the lease simply expires and the job is reclaimed or reaped later."""
        try:
            if job.attempts >= self.settings.max_attempts:
                self._fail(job, "internal_error", "The generated images could not be stored; the credits were released",
                           report)
            elif self.store.requeue_job(job.id, job.lease_token):
                report.retried.append(job.id)
                self._outcome(job, "retried")
            else:
                if self.store.job_statuses([job.id]).get(job.id) in (None, JobStatus.CANCELLED):
                    self.assets.delete_avatar(job.id)  # deleted meanwhile: drop any partial files
                report.dropped.append(job.id)
                self._outcome(job, "dropped")
        except Exception:  # noqa: BLE001
            with request_context(job.request_id):
                log.exception("could not requeue job %s; its lease will expire", job.id)

    def _finish(self, job: Avatar, result: Any, elapsed: float, hb: _Heartbeat, report: BatchReport) -> None:
        if hb.is_lost(job.id):
            report.dropped.append(job.id)
            self._outcome(job, "dropped")
            return
        images = list(result.images)
        engine_flags = (getattr(result, "extra", None) or {}).get("nsfw") or []
        if any(engine_flags) or (self.policy is not None and any(self.policy.check_images(images))):
            self._fail(job, "content_policy_violation", "The generated image was blocked by the safety checker", report)
            return
        stored = []
        for i, (img, seed) in enumerate(zip(images, result.seeds)):
            info = self.assets.put_image(job.id, i, img)
            stored.append({"key": info.key, "width": info.width, "height": info.height, "seed": int(seed)})
        res = result.request
        payload: dict[str, Any] = {
            "images": stored,
            "thumbnailKey": f"avatars/{job.id}/thumbnail.webp" if stored else None,
            "generationMs": int(round(elapsed * 1000)),
            "engineTimings": {k: float(v) for k, v in (result.timings or {}).items() if isinstance(v, (int, float))},
            "seed": getattr(res, "seed", None),
            "width": getattr(res, "width", None),
            "height": getattr(res, "height", None),
            "steps": getattr(res, "steps", None),
            "guidanceScale": getattr(res, "guidance_scale", None),
            "model": getattr(res, "model", None),
        }
        extra = dict(getattr(result, "extra", {}) or {})
        for key in ("identity", "characters"):
            if key in extra:
                payload[key] = _jsonable(extra[key])
        if self.store.complete_job(job.id, job.lease_token, payload):
            report.completed.append(job.id)
            self._outcome(job, "completed")
            return
        # Not ours any more: cancelled/deleted while running (drop the files) or reclaimed by
        # another worker after our lease expired (it writes the same keys; leave them).
        status = self.store.job_statuses([job.id]).get(job.id)
        if status in (None, JobStatus.CANCELLED):
            self.assets.delete_avatar(job.id)
        report.dropped.append(job.id)
        self._outcome(job, "dropped")

    def _fail(self, job: Avatar, code: str, message: str, report: BatchReport) -> None:
        if self.store.fail_job(job.id, job.lease_token, code, message):
            report.failed.append(job.id)
            self._outcome(job, "failed", f"{code}: {message}")
        else:
            report.dropped.append(job.id)
            self._outcome(job, "dropped")

    def _outcome(self, job: Avatar, outcome: str, detail: str = "") -> None:
        with request_context(job.request_id):
            log.info("job %s %s%s", job.id, outcome, f" ({detail})" if detail else "")
        if self.metrics:
            self.metrics.job_outcome(job.kind, outcome)

    # -- loop ---------------------------------------------------------------------------------
    def wake(self) -> None:
        """New work was queued: skip the rest of the idle wait."""
        self._loop.wake()

    def start(self) -> BackgroundLoop:
        """Loop until stop(): run batches back to back while there is work, else wait for a
        wake-up or `poll_seconds` (the poll catches jobs submitted through other replicas and
        expired leases of dead workers)."""
        return self._loop.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the batch in progress, then return. Unfinished jobs keep their lease and are
        picked up again once it expires."""
        self._loop.stop(timeout)

    @property
    def running(self) -> bool:
        return self._loop.running


def _jsonable(value: Any) -> Any:
    import json

    try:
        json.dumps(value)
        return value
    except TypeError:
        if isinstance(value, dict):
            return {str(k): _jsonable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [_jsonable(v) for v in value]
        if hasattr(value, "tolist"):
            return value.tolist()
        if hasattr(value, "__dict__"):
            return _jsonable(vars(value))
        return str(value)
