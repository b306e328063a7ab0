"""`JobWorker`: the claim → generate → post-process pipeline, assembled from its roles
(`claims`, `liveness`, `batches`, `postprocess`) and driven by one background loop."""
from __future__ import annotations

import os
import socket
import time
import uuid
from typing import Any, Callable

from ..assets import AssetStore
from ..engine_client import EngineRunner
from ..logctx import logger, request_context
from ..loops import BackgroundLoop
from ..policy import PolicyChecker
from ..settings import ServiceSettings
from ..store import Avatar, Store
from .batches import BatchRunner, Finished
from .claims import Claimer
from .jobs import BatchReport, Outcomes, WorkerContext
from .liveness import Heartbeat, Leases, process_start_time
from .postprocess import PostProcessor

log = logger("serve.worker")


class JobWorker:
    """Claims, runs and finishes jobs. Thread-safe to `wake()`/`stop()` from other threads.

    The loop (`start()`) is a pipeline that keeps the engine busy: while batch k generates,
    the next claim is made (prefetch), and when it ends, batch k's post-processing (PNG/WebP
    encoding, thumbnail, upload, completing each job with its ledger entry and outbox message)
    goes to a pool of `post_workers` threads while the engine starts batch k+1. At most
    `post_queue_batches` batches wait for post-processing; generation waits beyond that. One
    heartbeat thread registers the worker (`worker_instances`) and, every `heartbeat_seconds`,
    extends the leases of the jobs it works on, whatever their stage. `run_once()` does
    one batch from claim to completion (tests, one-shot runs).

    `engine`: an in-process engine (or its `EngineRunner`), seen only through `EngineRunner`."""

    def __init__(self, store: Store, engine: Any, assets: AssetStore, settings: ServiceSettings, *,
                 worker_id: str | None = None, policy: PolicyChecker | None = None, metrics: Any = None,
                 on_batch: Callable[[BatchReport], None] | None = None, models: list[str] | None = None):
        self.engine = EngineRunner.of(engine)
        host, pid = socket.gethostname(), os.getpid()
        self.host, self.pid, self.process_start = host, pid, process_start_time(pid)
        self.worker_id = worker_id or f"{host}:{pid}:{uuid.uuid4().hex[:8]}"
        self.served_models = list(models) if models else [self.engine.default_model]
        self._leases = Leases()
        self._ctx = WorkerContext(store, assets, settings, self.worker_id, self._leases, policy, metrics)
        outcomes = Outcomes(self._ctx)
        self._heartbeat = Heartbeat(store, settings, self._leases, worker_id=self.worker_id, host=host, pid=pid,
                                    process_start=self.process_start)
        self._claimer = Claimer(self._ctx, self.served_models)
        self._batches = BatchRunner(self._ctx, self.engine, outcomes)
        self._post = PostProcessor(self._ctx, outcomes, on_batch)
        self._loop = BackgroundLoop("job-worker", self._step, settings.poll_seconds)
        self._looping = False

    # -- what the roles share (tests swap assets, policy, metrics on a built worker) ---------
    store = property(lambda self: self._ctx.store)
    settings = property(lambda self: self._ctx.settings)

    @property
    def assets(self) -> AssetStore:
        return self._ctx.assets

    @assets.setter
    def assets(self, value: AssetStore) -> None:
        self._ctx.assets = value

    @property
    def policy(self) -> PolicyChecker | None:
        return self._ctx.policy

    @policy.setter
    def policy(self, value: PolicyChecker | None) -> None:
        self._ctx.policy = value

    @property
    def metrics(self) -> Any:
        return self._ctx.metrics

    @metrics.setter
    def metrics(self, value: Any) -> None:
        self._ctx.metrics = value

    # -- one step ---------------------------------------------------------------------------
    def run_once(self) -> BatchReport:
        """Claim up to max_batch jobs, run them as one engine call and finish them; returns what
        happened (post-processing included)."""
        with self._heartbeat.held():
            jobs = self._claimer.claim()
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

    def retire_dead_neighbours(self) -> list[str]:
        """Release at once the jobs of dead workers registered from this host (see `Heartbeat`)."""
        return self._heartbeat.retire_dead_neighbours()

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
        runnable = self._batches.build(jobs, report)
        finished: list[Finished] = []
        if runnable:
            self._batches.run(runnable, report, finished)
        self._post.submit(finished, report, wait=wait)
        return report

    # -- loop ---------------------------------------------------------------------------------
    def _step(self) -> bool:
        jobs = self._claimer.next_jobs()
        if not jobs:
            return False
        if self.settings.prefetch and not self._loop.stopping:
            self._claimer.prefetch()
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
            self._heartbeat.acquire()
        return self._loop.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the batch in progress and its post-processing, hand prefetched jobs back to
        the queue, then unregister. Jobs still unfinished keep their lease and are reclaimed
        once this worker is seen dead."""
        self._loop.stop(timeout)
        self._claimer.give_back_prefetched()
        self._post.wait_idle(timeout)
        if self._looping:
            self._looping = False
            self._heartbeat.release()

    @property
    def batches_run(self) -> int:
        """Batches fully post-processed so far."""
        return self._post.batches_done

    @property
    def running(self) -> bool:
        return self._loop.running

    @property
    def held_jobs(self) -> int:
        """Jobs this worker holds leases on now (prefetched, generating or in post-processing):
        a replica with none can be stopped without handing work back."""
        return len(self._leases)
