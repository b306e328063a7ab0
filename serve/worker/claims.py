"""Claiming: up to `max_batch` queued jobs of the served models under a lease, in the store's
fair order; with prefetch, the next claim runs in its own thread while a batch generates."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..logctx import logger
from ..settings import ServiceSettings
from ..store import Avatar, Store
from .liveness import Leases

log = logger("serve.worker")


class Claimer:
    def __init__(self, store: Store, settings: ServiceSettings, leases: Leases, *, worker_id: str,
                 models: list[str], metrics: Any = None):
        self.store, self.settings, self.leases, self.metrics = store, settings, leases, metrics
        self.worker_id, self.models = worker_id, models
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="job-claim")
        self._prefetched: Future | None = None

    def claim(self) -> list[Avatar]:
        s = self.settings
        jobs = self.store.claim_jobs(self.worker_id, limit=s.max_batch, lease_seconds=s.lease_seconds,
                                     models=self.models, max_attempts=s.max_attempts,
                                     dead_after=s.worker_dead_after_seconds)
        self.leases.add(jobs)
        if self.metrics:
            try:
                self.metrics.set_queue_depth(self.store.queue_stats()["queued"])
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
                self.store.requeue_job(job.id, job.lease_token)
            except Exception:  # noqa: BLE001 - the lease expires instead
                log.warning("could not requeue prefetched job %s", job.id, exc_info=True)
            self.leases.release(job.id)
