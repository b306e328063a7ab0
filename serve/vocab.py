"""The service's vocabularies, in one place: used by the store (queries and records), the
migrations (CHECK constraints) and the wire schemas (`Literal` types in the OpenAPI document).

Members are `str` enums, so they compare equal to, serialise as and bind to the database as
their plain string values (`JobStatus.QUEUED == "queued"`).
"""
from __future__ import annotations

import enum
from typing import Literal

try:  # Python >= 3.11
    from enum import StrEnum
except ImportError:  # pragma: no cover - Python 3.10
    class StrEnum(str, enum.Enum):  # type: ignore[no-redef]
        def __str__(self) -> str:
            return str(self.value)


class Tier(StrEnum):
    FREE = "free"
    PRO = "pro"
    ENTERPRISE = "enterprise"


class JobKind(StrEnum):
    GENERATE = "generate"
    PERCIFY = "percify"
    CAST = "cast"
    REMIX = "remix"


class JobStatus(StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobErrorCode(StrEnum):
    """`error.code` of a failed or cancelled job, besides the engine's own error codes (a job the
    engine refused fails with the `code` of its `AvatarEngineError`). Every job failure names one
    of these, never a string literal, so `tests/test_docs.py` can check that docs/api.md lists them."""

    ASSET_MISSING = "asset_missing"  # a reference photo / init image of the job is gone
    UNSUPPORTED_KIND = "unsupported_kind"  # the stored kind is not one this worker can build
    INVALID_JOB = "invalid_job"  # the stored parameters no longer make an engine request
    GENERATION_FAILED = "generation_failed"  # the engine call raised an unexpected error
    BLOCKED = "content_policy_violation"  # the safety checker refused a generated image
    STORAGE_FAILED = "internal_error"  # the images could not be stored, attempts used up
    WORKER_LOST = "worker_lost"  # its worker died too often (max_attempts claims)
    CANCELLED = "cancelled"  # deleted while queued or running


class Visibility(StrEnum):
    PRIVATE = "private"
    UNLISTED = "unlisted"
    PUBLIC = "public"


class LedgerKind(StrEnum):
    RESERVE = "reserve"  # job accepted: delta = -amount
    CHARGE = "charge"  # job completed: delta = 0 (the reservation is consumed)
    RELEASE = "release"  # job failed/cancelled: delta = +amount
    GRANT = "grant"  # top-up: delta = +amount


class EventType(StrEnum):
    AVATAR_COMPLETED = "avatar.completed"
    AVATAR_FAILED = "avatar.failed"
    AVATAR_PUBLISHED = "avatar.published"
    AVATAR_LIKED = "avatar.liked"
    AVATAR_COMMENTED = "avatar.commented"
    CREDITS_LOW_BALANCE = "credits.low_balance"  # a reservation took the balance below the threshold


class OutboxStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class AssetDeletionReason(StrEnum):
    """Why files of the asset store are queued for deletion (`store.cleanup`)."""

    PHOTOS = "photos"  # a job with reference photos / an init image ended
    AVATAR = "avatar"  # the avatar was deleted: its images and uploads go


class IdempotencyStatus(StrEnum):
    IN_FLIGHT = "in_flight"
    DONE = "done"


class SortField(StrEnum):
    """`GET /v1/avatars?sortBy=` (wire names)."""

    CREATED_AT = "createdAt"
    LIKES = "likes"
    COMMENTS = "comments"
    REMIXES = "remixes"


class FeedSort(StrEnum):
    NEWEST = "newest"
    MOST_LIKED = "most_liked"


def values(vocabulary: type[enum.Enum]) -> tuple[str, ...]:
    """The plain string values of a vocabulary, in declaration order."""
    return tuple(m.value for m in vocabulary)


TIERS = values(Tier)
JOB_KINDS = values(JobKind)
JOB_STATUSES = values(JobStatus)
ACTIVE_STATUSES = (JobStatus.QUEUED.value, JobStatus.PROCESSING.value)
TERMINAL_STATUSES = (JobStatus.COMPLETED.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value)
VISIBILITIES = values(Visibility)
LEDGER_KINDS = values(LedgerKind)
ASSET_DELETION_REASONS = values(AssetDeletionReason)
EVENT_TYPES = values(EventType)
SORT_FIELDS = values(SortField)
SORT_ORDERS = ("asc", "desc")

#: Wildcard subscription of a webhook endpoint (every event type).
ALL_EVENTS = "*"

# The same values as Literal types for the pydantic wire models (rendered as JSON Schema enums).
TierName = Literal[TIERS]  # type: ignore[valid-type]
KindName = Literal[JOB_KINDS]  # type: ignore[valid-type]
StatusName = Literal[JOB_STATUSES]  # type: ignore[valid-type]
VisibilityName = Literal[VISIBILITIES]  # type: ignore[valid-type]
EventName = Literal[EVENT_TYPES + (ALL_EVENTS,)]  # type: ignore[valid-type]
SortFieldName = Literal[SORT_FIELDS]  # type: ignore[valid-type]
SortOrderName = Literal[SORT_ORDERS]  # type: ignore[valid-type]
