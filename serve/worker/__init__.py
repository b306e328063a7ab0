"""Durable job worker: the store is the queue, this package is the consumer.

A worker claims up to `max_batch` queued jobs with a lease (`claims`), keeps the leases alive
with a heartbeat thread while the engine runs (`liveness`), runs them as one engine call with
isolation retries (`batches`), writes the images under deterministic keys and completes each job
with its lease token (`postprocess`, `payload`). Every step is safe to repeat: if the process
dies at any point, the lease expires, another worker (or the restarted one) claims the job again,
the rerun overwrites the same asset keys, and `complete_job` only succeeds for the current lease
holder, so a job completes — and is charged — exactly once.

The same `JobWorker` runs inside the Ray model deployment (`deployments.AvatarModel`) and in
tests (`run_once()` / `drain()` with an injected engine).
"""
from __future__ import annotations

from .jobs import BatchReport, JobBuildError, build_engine_request
from .liveness import process_alive, process_start_time
from .loop import JobWorker

__all__ = ["BatchReport", "JobBuildError", "JobWorker", "build_engine_request", "process_alive",
           "process_start_time"]
