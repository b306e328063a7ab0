"""Claiming: up to `max_batch` queued jobs of the served models under a lease, in the store's
fair order; with prefetch, the next claim runs in its own thread while a batch generates."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from ..logctx import logger
from ..store import Avatar
from .jobs import WorkerContext

log = logger("serve.worker")


class Claimer:
    def __init__(self, ctx: WorkerContext, models: list[str]):
        self.ctx, self.models = ctx, models
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="job-claim")
        self._prefetched: Future | None = None

    def claim(self) -> list[Avatar]:
        ctx, s = self.ctx, self.ctx.settings
        jobs = ctx.store.claim_jobs(ctx.worker_id, limit=s.max_batch, lease_seconds=s.lease_seconds,
                                     models=self.models, max_attempts=s.max_attempts,
                                     dead_after=s.worker_dead_after_seconds)
        ctx.leases.add(jobs)
        if ctx.metrics:
            try:
                ctx.metrics.set_queue_depth(ctx.store.queue_stats()["queued"])
            except Exception:  # noqa: BLE001 - metrics never break the loop
                log.debug("queue_stats failed", exc_info=True)
        return jobs

    def claim_quietly(self) -> list[Avatar]:
        try:
            return self.claim()
        except Exception:  # noqa: BLE001 - a DB blip: the loop polls again
            log.warning("claiming jobs failed", exc_info=True)
            return []

    def prefetch(self) -> None:
        """Start the next claim in the background (taken by `next_jobs`)."""
        self._prefetched = self._pool.submit(self.claim_quietly)

    def next_jobs(self) -> list[Avatar]:
        """The prefetched claim if it found work, else a claim now."""
        fut, self._prefetched = self._prefetched, None
        if fut is not None:
            jobs = fut.result()
            if jobs:
                return jobs
        return self.claim_quietly()

    def give_back_prefetched(self) -> None:
        """Stopping: jobs claimed ahead go back to the queue (else their lease runs out)."""
        fut, self._prefetched = self._prefetched, None
        for job in (fut.result() if fut is not None else []):
            try:
                self.ctx.store.requeue_job(job.id, job.lease_token)
            except Exception:  # noqa: BLE001 - the lease expires instead
                log.warning("could not requeue prefetched job %s", job.id, exc_info=True)
            self.ctx.leases.release(job.id)
