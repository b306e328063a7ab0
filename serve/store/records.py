"""Records (immutable row snapshots) and errors of the service's data layer.

Conventions
- Timestamps are UTC epoch seconds (`float`) everywhere; the clock is injectable (`open_store`).
- Credits are integers.
- JSON columns are exposed as plain Python values (`dict` / `list`).
- Authorization: methods that *modify* a user's object take `account_id` and raise
  `PermissionDenied` when it is not the owner. Plain reads (`get_avatar`, `list_comments`,
  `get_account`) return the record with its owner (`account_id`) and the caller decides who may
  see it (e.g. public/unlisted avatars are readable by anyone). `like` / `unlike` /
  `add_comment` / `submit_job(remixed_from=...)` do not check visibility: the caller reads the
  avatar first and checks it. Listing (`list_avatars`, `list_endpoints`, `list_api_keys`) is
  always scoped to the given account.
- Methods that mutate a missing object raise a `NotFound` subclass; `get_*` return `None`.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar

from ..vocab import JobErrorCode

#: Idempotency records live this long (seconds) after they were created.
IDEMPOTENCY_TTL_S = 24 * 3600.0
#: An `in_flight` idempotency record older than this is treated as abandoned (crashed replica)
#: and may be taken over by a retry (`begin_idempotent(..., stale_after_s=...)` overrides).
IDEMPOTENCY_STALE_S = 600.0
#: Default number of times a job may be claimed before an expired lease fails it for good.
DEFAULT_MAX_ATTEMPTS = 3
#: Error code stored on a job that ran out of attempts (its worker kept dying).
WORKER_LOST_CODE = JobErrorCode.WORKER_LOST

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
class StoreError(Exception):
    """Base class of every error the store raises on purpose."""

    code = "store_error"


class InvalidArgument(StoreError, ValueError):
    """An argument is out of its domain; `param` names it (maps to HTTP 400 invalid_request)."""

    code = "invalid_request"

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


class InvalidCursor(InvalidArgument):
    """A pagination cursor is malformed or was issued for another sort order."""

    def __init__(self, message: str = "malformed or foreign pagination cursor") -> None:
        super().__init__("cursor", message)


class NotFound(StoreError, LookupError):
    """The object does not exist (or was deleted)."""

    code = "not_found"

    def __init__(self, kind: str, object_id: str) -> None:
        super().__init__(f"{kind} {object_id!r} not found")
        self.kind = kind
        self.object_id = object_id


class AccountNotFound(NotFound):
    code = "account_not_found"

    def __init__(self, account_id: str) -> None:
        super().__init__("account", account_id)


class AvatarNotFound(NotFound):
    code = "avatar_not_found"

    def __init__(self, avatar_id: str) -> None:
        super().__init__("avatar", avatar_id)


class EndpointNotFound(NotFound):
    code = "webhook_not_found"

    def __init__(self, endpoint_id: str) -> None:
        super().__init__("webhook endpoint", endpoint_id)


class PermissionDenied(StoreError):
    """The account does not own the object it tries to modify (HTTP 403 unauthorized_access)."""

    code = "unauthorized_access"

    def __init__(self, object_id: str, account_id: str, action: str = "modify") -> None:
        super().__init__(f"account {account_id!r} may not {action} {object_id!r}")
        self.object_id = object_id
        self.account_id = account_id
        self.action = action


class InsufficientCredits(StoreError):
    """Balance below the job's cost (HTTP 402 insufficient_credits)."""

    code = "insufficient_credits"

    def __init__(self, balance: int, required: int) -> None:
        super().__init__(f"balance {balance} is below the required {required} credits")
        self.balance = balance
        self.required = required


class ConcurrencyLimitExceeded(StoreError):
    """The account already has `limit` queued+processing jobs (HTTP 429 rate_limit_exceeded)."""

    code = "rate_limit_exceeded"

    def __init__(self, active: int, limit: int) -> None:
        super().__init__(f"{active} concurrent generations already running (limit {limit})")
        self.active = active
        self.limit = limit


class InvalidState(StoreError):
    """The object is in a status that forbids the operation (e.g. publishing a queued job)."""

    code = "invalid_request"

    def __init__(self, object_id: str, status: str, message: str) -> None:
        super().__init__(f"{object_id}: {message} (status {status!r})")
        self.object_id = object_id
        self.status = status
        self.message = message


class NotPublishable(StoreError):
    """An image of the avatar did not pass the safety check: it cannot be public or published."""

    code = "content_policy_violation"

    def __init__(self, object_id: str) -> None:
        super().__init__(f"{object_id}: not every image passed the image safety check")
        self.object_id = object_id
        self.message = ("This avatar cannot be public or published: not every image passed the image safety "
                        "check (see images[].safety)")


# --------------------------------------------------------------------------------------------
# Records (immutable snapshots of rows)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Account:
    id: str  # "acct_…"
    tier: str  # free | pro | enterprise
    credits: int  # current balance; always equals the sum of the ledger's deltas
    created_at: float


@dataclass(frozen=True)
class ApiKey:
    id: str  # "key_…"
    account_id: str
    prefix: str  # visible part, e.g. "ak_live_3f9KxQ2a" (unique; used for lookup)
    revoked: bool
    created_at: float
    revoked_at: float | None = None


@dataclass(frozen=True)
class Avatar:
    """One avatar = one job: request, lifecycle, result and social counters in one row."""

    id: str  # "av_…"
    account_id: str  # owner
    kind: str  # generate | percify | cast | remix
    status: str  # queued | processing | completed | failed | cancelled
    model: str | None  # model profile name (for filters and worker routing)
    prompt: str | None  # main prompt, kept in its own column for search
    params: dict[str, Any]  # the engine request as submitted
    result: dict[str, Any] | None  # images [{width, height, seed, key...}], identity, characters
    title: str | None
    description: str | None
    tags: list[str]
    metadata: dict[str, Any]
    visibility: str  # private | unlisted | public
    published: bool
    published_at: float | None
    likes: int
    comments: int
    remixes: int
    remixed_from: str | None
    credit_cost: int
    error_code: str | None
    error_message: str | None
    created_at: float
    updated_at: float
    started_at: float | None  # last time a worker claimed it
    completed_at: float | None  # set on completed, failed and cancelled
    lease_owner: str | None
    lease_token: str | None
    lease_expires_at: float | None
    attempts: int  # how many times it was claimed
    request_id: str | None = None  # the HTTP request that submitted it (log correlation)
    progress: dict[str, int] | None = None  # {"step", "totalSteps"} of a processing job (throttled)
    link_epoch: int = 0  # part of signed image links; bumped when the avatar stops being public
    cancel_requested_at: float | None = None  # a cancel asked for while processing (the worker ends it)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (snake_case, Python values) e.g. for default webhook payloads."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LedgerEntry:
    """Append-only credit movement. `delta` is the effect on the balance.

    reserve: delta = -amount (job accepted); charge: delta = 0 (reservation consumed);
    release: delta = +amount (job failed/cancelled); grant: delta = +amount (top-up).
    """

    id: int
    account_id: str
    kind: str
    amount: int
    delta: int
    avatar_id: str | None
    created_at: float
    note: str | None = None


@dataclass(frozen=True)
class Comment:
    id: str  # "cm_…"
    avatar_id: str
    account_id: str  # author
    text: str
    created_at: float


@dataclass(frozen=True)
class LikeResult:
    changed: bool  # True when this call created (like) or removed (unlike) the like
    likes: int  # the avatar's like count after the call


@dataclass(frozen=True)
class WebhookEndpoint:
    id: str  # "wh_…"
    account_id: str
    url: str
    events: list[str]  # event types; ["*"] = all
    secret: str  # "whsec_" + base64 (Standard Webhooks); shown to the user once by the API
    disabled: bool
    disabled_reason: str | None
    consecutive_failures: int
    created_at: float
    description: str | None = None


@dataclass(frozen=True)
class Delivery:
    """One outbox message for one endpoint, as claimed by a delivery worker."""

    id: str  # "msg_…" — use as the Standard Webhooks `webhook-id` (stable across retries)
    event_id: str  # "evt_…" — shared by the messages of one event fanned out to N endpoints
    endpoint_id: str
    account_id: str
    event_type: str
    payload: dict[str, Any]
    status: str  # pending | delivered | failed
    attempts: int  # delivery attempts made before this claim
    next_attempt_at: float
    created_at: float
    last_error: str | None
    lease_token: str | None
    # joined from the endpoint at claim time so the worker needs no second query:
    url: str
    secret: str
    endpoint_consecutive_failures: int
    request_id: str | None = None  # the request that started the job this event is about


@dataclass(frozen=True)
class StoredResponse:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


class IdempotencyState(str, enum.Enum):
    NEW = "new"  # record inserted as in_flight: the caller proceeds and then finishes it
    REPLAY = "replay"  # same key + same request hash, finished: return `response`
    MISMATCH = "mismatch"  # same key, other request hash: HTTP 422
    IN_FLIGHT = "in_flight"  # same key, first request still running: HTTP 409


@dataclass(frozen=True)
class IdempotencyResult:
    state: IdempotencyState
    response: StoredResponse | None = None  # set for REPLAY only


class RateLimitDecision(NamedTuple):
    allowed: bool
    remaining: int  # requests left in the current window after this one
    reset_seconds: float  # allowed: seconds to the window's end; refused: seconds until one more fits


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None  # opaque; None when there is no further page
    total: int | None = None  # rows matching the same filters, over all pages
    offset: int | None = None  # how many matching rows come before this page's first


class _Unset:
    """Sentinel type: "leave this field unchanged" in `update_avatar`."""

    _instance: "_Unset | None" = None

    def __new__(cls) -> "_Unset":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


UNSET: Any = _Unset()
