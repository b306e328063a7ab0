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
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

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


class _Leases:
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


class _ProgressWriter:
    """Persists the running batch's progress off the engine's thread: the engine's per-step
    callback only records the latest (step, total) in memory; this loop writes it to the store
    (`set_progress`, one short transaction) at most once per `interval`, and only when it
    changed. A slow or failing write never stalls the GPU."""

    def __init__(self, store: Store, worker_id: str, leases: dict[str, str], interval: float, held: "_Leases"):
        self.store, self.worker_id, self.leases, self.held = store, worker_id, dict(leases), held
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
        live = {k: v for k, v in self.leases.items() if not self.held.is_lost(k)}
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
    """Claims, runs and finishes jobs. Thread-safe to `wake()`/`stop()` from other threads.

    The loop (`start()`) is a pipeline that keeps the engine busy: while batch k generates,
    the next claim is made (prefetch), and when it ends, batch k's post-processing (PNG/WebP
    encoding, thumbnail, upload, completing each job with its ledger entry and outbox message)
    goes to a pool of `post_workers` threads while the engine starts batch k+1. At most
    `post_queue_batches` batches wait for post-processing; generation waits beyond that. One
    heartbeat thread registers the worker (`worker_instances`) and, every `heartbeat_seconds`,
    extends the leases of the jobs it works on, whatever their stage. `run_once()` does
    one batch from claim to completion (tests, one-shot runs)."""

    def __init__(self, store: Store, engine: Any, assets: AssetStore, settings: ServiceSettings, *,
                 worker_id: str | None = None, policy: PolicyChecker | None = None, metrics: Any = None,
                 on_batch: Callable[[BatchReport], None] | None = None, models: list[str] | None = None):
        self.store, self.engine, self.assets, self.settings = store, engine, assets, settings
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.process_start = process_start_time(self.pid)
        self.worker_id = worker_id or f"{self.host}:{self.pid}:{uuid.uuid4().hex[:8]}"
        self.policy = policy
        self.metrics = metrics
        self.on_batch = on_batch
        self.served_models = list(models) if models else [engine.default_model]
        self._loop = BackgroundLoop("job-worker", self._step, settings.poll_seconds)
        self.batches_run = 0
        self._leases = _Leases()
        self._beat = BackgroundLoop("job-worker-heartbeat", self._beat_once, settings.resolved_heartbeat_seconds,
                                    wait_first=True)
        self._beat_users = 0
        self._beat_lock = threading.Lock()
        self._beats = 0
        self._post = ThreadPoolExecutor(settings.resolved_post_workers, thread_name_prefix="job-post")
        self._post_slots = threading.BoundedSemaphore(settings.post_queue_batches)
        self._in_post = 0
        self._post_idle = threading.Condition()
        self._claimer = ThreadPoolExecutor(1, thread_name_prefix="job-claim")
        self._prefetched: Future | None = None
        self._looping = False

    # -- one step ---------------------------------------------------------------------------
    def run_once(self) -> BatchReport:
        """Claim up to max_batch jobs, run them as one engine call and finish them; returns what
        happened (post-processing included)."""
        with self._beating():
            jobs = self._claim()
            return self._process(jobs, wait=True)

    def drain(self, max_batches: int = 1000) -> list[BatchReport]:
        """Run until the queue is empty (tests, CLI one-shot)."""
        reports = []
        for _ in range(max_batches):
            r = self.run_once()
            if not r.claimed:
                break
            reports.append(r)
        return reports

    # -- claiming ----------------------------------------------------------------------------
    def _claim(self) -> list[Avatar]:
        s = self.settings
        jobs = self.store.claim_jobs(self.worker_id, limit=s.max_batch, lease_seconds=s.lease_seconds,
                                     models=self.served_models, max_attempts=s.max_attempts,
                                     dead_after=s.worker_dead_after_seconds)
        self._leases.add(jobs)
        if self.metrics:
            try:
                self.metrics.set_queue_depth(self.store.queue_stats()["queued"])
            except Exception:  # noqa: BLE001 - metrics never break the loop
                log.debug("queue_stats failed", exc_info=True)
        return jobs

    def _claim_quietly(self) -> list[Avatar]:
        try:
            return self._claim()
        except Exception:  # noqa: BLE001 - a DB blip: the loop polls again
            log.warning("claiming jobs failed", exc_info=True)
            return []

    def _next_jobs(self) -> list[Avatar]:
        """The prefetched claim if it found work, else a claim now."""
        fut, self._prefetched = self._prefetched, None
        if fut is not None:
            jobs = fut.result()
            if jobs:
                return jobs
        return self._claim_quietly()

    def _give_back_prefetched(self) -> None:
        fut, self._prefetched = self._prefetched, None
        for job in (fut.result() if fut is not None else []):
            try:
                self.store.requeue_job(job.id, job.lease_token)
            except Exception:  # noqa: BLE001 - the lease expires instead
                log.warning("could not requeue prefetched job %s", job.id, exc_info=True)
            self._leases.release(job.id)

    # -- heartbeat ---------------------------------------------------------------------------
    @contextmanager
    def _beating(self) -> Iterator[None]:
        """Registered and heartbeating while at least one user (the loop, a run_once) needs it."""
        self._acquire_beat()
        try:
            yield
        finally:
            self._release_beat()

    def _acquire_beat(self) -> None:
        with self._beat_lock:
            self._beat_users += 1
            if self._beat_users == 1:
                self._register()
                self._beat.start()

    def _release_beat(self) -> None:
        with self._beat_lock:
            self._beat_users -= 1
            if self._beat_users:
                return
            self._beat.stop(timeout=self.settings.resolved_heartbeat_seconds + 5)
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
        before = self._leases.snapshot()
        try:
            held = self.store.worker_heartbeat(self.worker_id, self.settings.lease_seconds, sorted(before),
                                               host=self.host, pid=self.pid, process_start=self.process_start)
        except Exception:  # noqa: BLE001 - a DB blip must not kill the batch; the lease has slack
            log.warning("heartbeat failed", exc_info=True)
            return False
        self._leases.lost_except(before, held)
        self._beats += 1
        if self._beats % 5 == 0:
            try:
                self.retire_dead_neighbours()
            except Exception:  # noqa: BLE001
                log.debug("retiring dead workers failed", exc_info=True)
        return False

    # -- a batch -----------------------------------------------------------------------------
    def _process(self, jobs: list[Avatar], *, wait: bool) -> BatchReport:
        """Build, generate, then post-process (in the pool; `wait` blocks until done)."""
        report = BatchReport(claimed=len(jobs))
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
        finished: list[tuple[Avatar, Any, float]] = []
        if runnable:
            self._run_batch(runnable, report, finished)
        self._post_process(finished, report, wait=wait)
        return report

    def _run_batch(self, runnable: list[tuple[Avatar, GenerationRequest]], report: BatchReport,
                   finished: list[tuple[Avatar, Any, float]]) -> None:
        """One engine call; successful results are appended to `finished` for post-processing."""
        t0 = time.perf_counter()
        ids = [job.id for job, _ in runnable]

        writer = _ProgressWriter(self.store, self.worker_id, {job.id: job.lease_token for job, _ in runnable},
                                 self.settings.progress_interval_s, self._leases)

        def progress(done: int, total: int) -> None:
            # Every job of this call was cancelled/deleted/reclaimed: stop spending the GPU on it.
            if all(self._leases.is_lost(i) for i in ids):
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
                self._leases.release(job.id)
            return
        except Exception as exc:  # noqa: BLE001
            if len(runnable) > 1:
                # Isolate the failing request so one bad job does not fail its batch-mates.
                log.warning("batch of %d failed (%s); retrying one by one", len(runnable), exc)
                for item in runnable:
                    if not self._leases.is_lost(item[0].id):
                        self._run_batch([item], report, finished)
                    else:
                        report.dropped.append(item[0].id)
                        self._outcome(item[0], "dropped")
                        self._leases.release(item[0].id)
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
        finished.extend((job, result, elapsed) for (job, _), result in zip(runnable, results))

    # -- post-processing ---------------------------------------------------------------------
    def _post_process(self, finished: list[tuple[Avatar, Any, float]], report: BatchReport, *, wait: bool) -> None:
        """Finish each job in the post-processing pool. With `wait` False the caller goes on
        (the next generation) once the batch is queued; beyond `post_queue_batches` batches
        queued it waits for a slot (backpressure)."""
        self._post_slots.acquire()
        with self._post_idle:
            self._in_post += 1
        remaining = [len(finished)]
        lock = threading.Lock()
        done = threading.Event()

        def batch_done() -> None:
            self.batches_run += 1
            self._post_slots.release()
            with self._post_idle:
                self._in_post -= 1
                self._post_idle.notify_all()
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
            self._post.submit(finish_one, *item)
        if wait:
            done.wait()

    def _finish_or_retry(self, job: Avatar, result: Any, elapsed: float, report: BatchReport) -> None:
        try:
            self._finish(job, result, elapsed, report)
        except Exception:  # noqa: BLE001 - one job's storage error must not lose its batch-mates
            with request_context(job.request_id):
                log.exception("could not store the result of job %s", job.id)
            self._retry_or_fail(job, report)
        finally:
            self._leases.release(job.id)

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

    def _finish(self, job: Avatar, result: Any, elapsed: float, report: BatchReport) -> None:
        if self._leases.is_lost(job.id):
            report.dropped.append(job.id)
            self._outcome(job, "dropped")
            return
        t0 = time.perf_counter()
        images = list(result.images)
        engine_flags = (getattr(result, "extra", None) or {}).get("nsfw") or []
        if any(engine_flags) or (self.policy is not None and any(self.policy.check_images(images))):
            self._fail(job, "content_policy_violation", "The generated image was blocked by the safety checker", report)
            return
        stored = []
        for i, (img, seed) in enumerate(zip(images, result.seeds)):
            info = self.assets.put_image(job.id, i, img)
            if self.metrics:
                self.metrics.observe_encode(info.encode_seconds, info.width, info.height)
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
        engine_report = result.report.to_json() if getattr(result, "report", None) is not None else {}
        for key in ("identity", "characters"):
            if key in engine_report:
                payload[key] = engine_report[key]
        completed = self.store.complete_job(job.id, job.lease_token, payload)
        if self.metrics:
            self.metrics.observe_postprocess(time.perf_counter() - t0)
        if completed:
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
        try:
            if self.store.fail_job(job.id, job.lease_token, code, message):
                report.failed.append(job.id)
                self._outcome(job, "failed", f"{code}: {message}")
            else:
                report.dropped.append(job.id)
                self._outcome(job, "dropped")
        finally:
            self._leases.release(job.id)

    def _outcome(self, job: Avatar, outcome: str, detail: str = "") -> None:
        with request_context(job.request_id):
            log.info("job %s %s%s", job.id, outcome, f" ({detail})" if detail else "")
        if self.metrics:
            self.metrics.job_outcome(job.kind, outcome)

    # -- loop ---------------------------------------------------------------------------------
    def _step(self) -> bool:
        jobs = self._next_jobs()
        if not jobs:
            return False
        if self.settings.prefetch and not self._loop.stopping:
            self._prefetched = self._claimer.submit(self._claim_quietly)
        try:
            self._process(jobs, wait=False)
        except Exception:
            # Unexpected (e.g. the store went away mid-batch): stop extending the leases of this
            # batch's unfinished jobs so they run out and the jobs are claimed again.
            for job in jobs:
                self._leases.release(job.id)
            raise
        return True

    def wake(self) -> None:
        """New work was queued: skip the rest of the idle wait."""
        self._loop.wake()

    def start(self) -> BackgroundLoop:
        """Loop until stop(): run batches back to back while there is work, else wait for a
        wake-up or `poll_seconds` (the poll catches jobs submitted through other replicas and
        the jobs of dead workers)."""
        if not self._loop.running and not self._looping:
            self._looping = True
            self._acquire_beat()
        return self._loop.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the batch in progress and its post-processing, hand prefetched jobs back to
        the queue, then unregister. Jobs still unfinished keep their lease and are reclaimed
        once this worker is seen dead."""
        self._loop.stop(timeout)
        self._give_back_prefetched()
        with self._post_idle:
            self._post_idle.wait_for(lambda: self._in_post == 0, timeout)
        if self._looping:
            self._looping = False
            self._release_beat()

    @property
    def running(self) -> bool:
        return self._loop.running

    @property
    def held_jobs(self) -> int:
        """Jobs this worker holds leases on now (prefetched, generating or in post-processing):
        a replica with none can be stopped without handing work back."""
        return len(self._leases)
