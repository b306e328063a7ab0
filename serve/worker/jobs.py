"""A claimed job as the worker handles it: its stored params turned back into an engine request,
and the report of what one batch did to its jobs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from avatar_engine.protocol import TASK_FIELDS, request_from_wire
from avatar_engine.requests import GenerationRequest

from ..assets import AssetStore
from ..logctx import logger, request_context
from ..policy import PolicyChecker
from ..settings import ServiceSettings
from ..store import Avatar, Store
from ..vocab import JobErrorCode
from .liveness import Leases

log = logger("serve.worker")


class JobBuildError(Exception):
    """A stored job cannot be turned into an engine request (missing upload, bad params)."""

    def __init__(self, code: JobErrorCode, message: str):
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
            raise JobBuildError(JobErrorCode.ASSET_MISSING, f"Reference image {key!r} of this job no longer exists") from None

    if job.kind not in TASK_FIELDS:
        raise JobBuildError(JobErrorCode.UNSUPPORTED_KIND, f"Unknown job kind {job.kind!r}")
    return request_from_wire(job.params, job.kind, load=load, strict=False)


@dataclass
class BatchReport:
    claimed: int = 0
    completed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # lease lost (cancelled / reclaimed)
    retried: list[str] = field(default_factory=list)  # result not stored; back in the queue
    cancelled: list[str] = field(default_factory=list)  # stopped mid-denoising on the owner's request


@dataclass
class WorkerContext:
    """What the roles of one worker share. `assets`, `policy` and `metrics` may be swapped on a
    running worker (tests do), so roles read them from here at each use."""

    store: Store
    assets: AssetStore
    settings: ServiceSettings
    worker_id: str
    leases: Leases
    policy: PolicyChecker | None = None
    metrics: Any = None


class Outcomes:
    """Where a job's fate is recorded: failed in the store (its credits released), logged under
    the request that submitted it, counted in the metrics; its lease then no longer held."""

    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx

    def fail(self, job: Avatar, code: str, message: str, report: BatchReport) -> None:
        """`code`: a `JobErrorCode`, or the `code` of the engine error that refused the job."""
        try:
            if self.ctx.store.fail_job(job.id, job.lease_token, code, message):
                report.failed.append(job.id)
                self.note(job, "failed", f"{code}: {message}")
                self.release_photos(job)
            else:
                self.drop(job, report)
        finally:
            self.ctx.leases.release(job.id)

    def release_photos(self, job: Avatar) -> None:
        """The job is terminal: its uploaded reference photos go, unless the deployment keeps them
        with the avatar (`photo_retention: avatar`). Retries never get here, so they still have them."""
        upload_id = (job.params or {}).get("uploadId")
        if not upload_id or self.ctx.settings.photo_retention != "job":
            return
        try:
            self.ctx.assets.delete_uploads(upload_id)
        except Exception:  # noqa: BLE001 - the job's outcome stands; the files go with the avatar later
            with request_context(job.request_id):
                log.exception("could not delete the reference photos of job %s", job.id)

    def drop(self, job: Avatar, report: BatchReport) -> None:
        """The job is no longer this worker's (cancelled, deleted, reclaimed)."""
        report.dropped.append(job.id)
        self.note(job, "dropped")

    def note(self, job: Avatar, outcome: str, detail: str = "") -> None:
        with request_context(job.request_id):
            log.info("job %s %s%s", job.id, outcome, f" ({detail})" if detail else "")
        if self.ctx.metrics:
            self.ctx.metrics.job_outcome(job.kind, outcome)
