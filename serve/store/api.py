"""Public interface of the service's data layer: records, errors and the abstract `Store`.

Every invariant (credits, concurrency, likes, leases, idempotency, rate limits) is enforced by
the database inside one transaction per call, never by in-process locks, because ingress and
worker replicas are separate processes. Implementations: `serve.store.sql.SQLStore` over
SQLite (WAL, `BEGIN IMMEDIATE`) and PostgreSQL (row locks, `FOR UPDATE SKIP LOCKED`).

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

import abc
import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Mapping, NamedTuple, Sequence, TypeVar

Tier = Literal["free", "pro", "enterprise"]
JobKind = Literal["generate", "percify", "cast", "remix"]
JobStatus = Literal["queued", "processing", "completed", "failed", "cancelled"]
Visibility = Literal["private", "unlisted", "public"]
LedgerKind = Literal["reserve", "charge", "release", "grant"]
SortBy = Literal["createdAt", "likes", "comments", "remixes"]
SortOrder = Literal["asc", "desc"]
FeedSort = Literal["newest", "most_liked"]
EventType = Literal[
    "avatar.completed", "avatar.failed", "avatar.published", "avatar.liked", "avatar.commented"
]

TIERS: tuple[str, ...] = ("free", "pro", "enterprise")
JOB_KINDS: tuple[str, ...] = ("generate", "percify", "cast", "remix")
JOB_STATUSES: tuple[str, ...] = ("queued", "processing", "completed", "failed", "cancelled")
ACTIVE_STATUSES: tuple[str, ...] = ("queued", "processing")
TERMINAL_STATUSES: tuple[str, ...] = ("completed", "failed", "cancelled")
VISIBILITIES: tuple[str, ...] = ("private", "unlisted", "public")
EVENT_TYPES: tuple[str, ...] = (
    "avatar.completed", "avatar.failed", "avatar.published", "avatar.liked", "avatar.commented"
)
SORT_FIELDS: tuple[str, ...] = ("createdAt", "likes", "comments", "remixes")

#: Idempotency records live this long (seconds) after they were created.
IDEMPOTENCY_TTL_S = 24 * 3600.0
#: An `in_flight` idempotency record older than this is treated as abandoned (crashed replica)
#: and may be taken over by a retry (`begin_idempotent(..., stale_after_s=...)` overrides).
IDEMPOTENCY_STALE_S = 600.0
#: Default number of times a job may be claimed before an expired lease fails it for good.
DEFAULT_MAX_ATTEMPTS = 3
#: Error code stored on a job that ran out of attempts (its worker kept dying).
WORKER_LOST_CODE = "worker_lost"

T = TypeVar("T")

__all__ = [
    "ACTIVE_STATUSES", "DEFAULT_MAX_ATTEMPTS", "EVENT_TYPES", "IDEMPOTENCY_STALE_S",
    "IDEMPOTENCY_TTL_S", "JOB_KINDS", "JOB_STATUSES", "SORT_FIELDS", "TERMINAL_STATUSES", "TIERS",
    "UNSET", "VISIBILITIES", "WORKER_LOST_CODE",
    "Account", "AccountNotFound", "ApiKey", "Avatar", "AvatarNotFound", "Comment",
    "ConcurrencyLimitExceeded", "Delivery", "EndpointNotFound", "IdempotencyResult",
    "IdempotencyState", "InsufficientCredits", "InvalidArgument", "InvalidCursor", "InvalidState",
    "LedgerEntry", "LikeResult", "NotFound", "Page", "PermissionDenied", "RateLimitDecision",
    "Store", "StoreError", "StoredResponse", "WebhookEndpoint",
]


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

    def __init__(self, object_id: str, account_id: str) -> None:
        super().__init__(f"account {account_id!r} may not modify {object_id!r}")
        self.object_id = object_id
        self.account_id = account_id


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


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------
class Store(abc.ABC):
    """Durable state of the service. Every method is one atomic transaction, safe across
    threads and processes; all methods are blocking (call them from a thread pool in async code).
    """

    # ---- lifecycle ------------------------------------------------------------------------
    @abc.abstractmethod
    def migrate(self) -> int:
        """Apply pending schema migrations (idempotent, also run by `open_store`); returns the
        schema version now in place."""

    @abc.abstractmethod
    def schema_version(self) -> int:
        """Highest applied migration version."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close pooled connections (the store must not be used afterwards)."""

    # ---- accounts & keys ------------------------------------------------------------------
    @abc.abstractmethod
    def create_account(self, tier: str = "free", credits: int = 0) -> Account:
        """New account; initial credits are recorded as a `grant` ledger entry."""

    @abc.abstractmethod
    def get_account(self, account_id: str) -> Account | None:
        """The account or None."""

    @abc.abstractmethod
    def set_tier(self, account_id: str, tier: str) -> Account:
        """Change an account's tier (operator action). Raises AccountNotFound."""

    @abc.abstractmethod
    def grant_credits(self, account_id: str, amount: int, note: str | None = None) -> Account:
        """Add `amount` (> 0) credits with a `grant` ledger entry. Raises AccountNotFound."""

    @abc.abstractmethod
    def ledger(self, account_id: str, limit: int = 1000) -> list[LedgerEntry]:
        """Ledger entries of an account, oldest first."""

    @abc.abstractmethod
    def ledger_balance(self, account_id: str) -> int:
        """Sum of the account's ledger deltas (must equal `Account.credits`)."""

    @abc.abstractmethod
    def create_api_key(self, account_id: str, *, environment: str = "live") -> tuple[ApiKey, str]:
        """New key; returns (record, plaintext). The plaintext `ak_<env>_<8 chars><secret>` is
        never stored: only its SHA-256 is. Raises AccountNotFound."""

    @abc.abstractmethod
    def authenticate(self, plaintext_key: str) -> Account | None:
        """Account of a valid, non-revoked key, else None. Looks the key up by its visible
        prefix and compares hashes with `hmac.compare_digest`."""

    @abc.abstractmethod
    def list_api_keys(self, account_id: str) -> list[ApiKey]:
        """Keys of the account (revoked included), oldest first."""

    @abc.abstractmethod
    def revoke_api_key(self, account_id: str, key_id: str) -> bool:
        """Revoke one of the account's keys; False if not found or not the account's."""

    # ---- jobs (ingress side) --------------------------------------------------------------
    @abc.abstractmethod
    def submit_job(
        self,
        account_id: str,
        kind: str,
        params: Mapping[str, Any],
        *,
        cost: int,
        max_concurrent: int,
        model: str | None = None,
        prompt: str | None = None,
        remixed_from: str | None = None,
        title: str | None = None,
        description: str | None = None,
        tags: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        visibility: str = "private",
    ) -> Avatar:
        """Accept a job in ONE transaction: lock the account, refuse with
        ConcurrencyLimitExceeded when it already has >= `max_concurrent` queued+processing jobs,
        with InsufficientCredits when balance < `cost`, else insert the avatar (status queued)
        and a `reserve` ledger entry (balance -= cost). `model`/`prompt` default to
        `params["model"]`/`params["prompt"]`. With `remixed_from`, the source avatar's `remixes`
        count is incremented in the same transaction (AvatarNotFound if it does not exist;
        visibility is the caller's check). Raises AccountNotFound, InvalidArgument."""

    @abc.abstractmethod
    def cancel_job(self, avatar_id: str, account_id: str) -> Avatar:
        """queued/processing -> cancelled with a `release` (refund) entry; the worker learns it
        through `heartbeat` / `job_statuses` / `complete_job` returning False. A job already in
        a terminal status is returned unchanged. Raises AvatarNotFound, PermissionDenied."""

    # ---- jobs (worker side) ---------------------------------------------------------------
    @abc.abstractmethod
    def claim_jobs(
        self,
        worker_id: str,
        limit: int = 1,
        lease_seconds: float = 60.0,
        *,
        kinds: Sequence[str] | None = None,
        models: Sequence[str | None] | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> list[Avatar]:
        """Move up to `limit` jobs to processing for `worker_id`, oldest first: queued ones and
        processing ones whose lease expired (a dead worker's; `attempts` is incremented on every
        claim). Each claimed job gets a fresh `lease_token` that later calls must present.
        Expired jobs that already had `max_attempts` claims are failed with code
        `worker_lost` and refunded instead. `kinds` / `models` restrict what is claimed
        (a `models` filter also matches jobs whose model is None only if None is listed)."""

    @abc.abstractmethod
    def heartbeat(
        self, worker_id: str, leases: Mapping[str, str], lease_seconds: float = 60.0
    ) -> set[str]:
        """Extend the leases {avatar_id: lease_token} still held by `worker_id`; returns the ids
        whose lease was extended. An id missing from the result was cancelled, deleted or
        reclaimed: the worker should stop working on it."""

    @abc.abstractmethod
    def job_statuses(self, avatar_ids: Sequence[str]) -> dict[str, str]:
        """{avatar_id: status} for the ids that still exist (deleted ids are absent)."""

    @abc.abstractmethod
    def active_jobs(self, account_id: str) -> int:
        """The account's queued + processing jobs (the "concurrent generations" in use)."""

    @abc.abstractmethod
    def queue_stats(self) -> dict[str, int]:
        """{"queued": n, "processing": m} over all accounts (metrics, autoscaling)."""

    @abc.abstractmethod
    def complete_job(self, avatar_id: str, lease_token: str, result: Mapping[str, Any]) -> bool:
        """processing + matching token -> completed with `result`, a `charge` ledger entry and
        an `avatar.completed` outbox message per subscribed endpoint, in one transaction.
        False (and no change) when the token does not match or the job is no longer
        processing (cancelled, reclaimed, already completed)."""

    @abc.abstractmethod
    def fail_job(self, avatar_id: str, lease_token: str, code: str, message: str) -> bool:
        """processing + matching token -> failed with error code/message, a `release` (refund)
        entry and `avatar.failed` outbox messages. False when not held any more."""

    @abc.abstractmethod
    def requeue_job(self, avatar_id: str, lease_token: str) -> bool:
        """Give a held job back to the queue (graceful worker shutdown): processing -> queued,
        lease cleared; its attempts count stays. False when not held any more."""

    @abc.abstractmethod
    def reap_expired(self, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> list[str]:
        """Fail (with refund and `avatar.failed`) expired processing jobs that already used
        `max_attempts` claims; returns their ids. `claim_jobs` does this too."""

    # ---- avatars --------------------------------------------------------------------------
    @abc.abstractmethod
    def get_avatar(self, avatar_id: str) -> Avatar | None:
        """The avatar (any owner) or None; the caller checks visibility against `account_id`."""

    @abc.abstractmethod
    def list_avatars(
        self,
        account_id: str,
        *,
        limit: int = 20,
        cursor: str | None = None,
        status: str | None = None,
        model: str | None = None,
        visibility: str | None = None,
        published: bool | None = None,
        kind: str | None = None,
        search: str | None = None,
        sort_by: str = "createdAt",
        sort_order: str = "desc",
    ) -> Page[Avatar]:
        """The account's avatars with keyset pagination (id breaks ties, so pages never repeat
        or skip rows with equal sort values). `search` is a case-insensitive substring of the
        prompt or title. A cursor is only valid with the same sort_by/sort_order (else
        InvalidCursor); filters should also stay the same between pages."""

    @abc.abstractmethod
    def update_avatar(
        self,
        avatar_id: str,
        account_id: str,
        *,
        title: str | None = UNSET,
        description: str | None = UNSET,
        tags: Sequence[str] = UNSET,
        visibility: str = UNSET,
        metadata: Mapping[str, Any] = UNSET,
    ) -> Avatar:
        """Update metadata fields given (UNSET = unchanged). Making a published avatar
        non-public unpublishes it. Raises AvatarNotFound, PermissionDenied, InvalidArgument."""

    @abc.abstractmethod
    def publish_avatar(self, avatar_id: str, account_id: str) -> Avatar:
        """completed + own -> visibility public, published, published_at, and an
        `avatar.published` outbox event (only on the first publish; repeating is a no-op).
        Raises AvatarNotFound, PermissionDenied, InvalidState (not completed)."""

    @abc.abstractmethod
    def delete_avatar(self, avatar_id: str, account_id: str) -> Avatar:
        """Delete the avatar with its likes and comments; a queued/processing job is cancelled
        and refunded first. Returns the final record (status `cancelled` if it was running) so
        the caller can delete the image assets in `result`. Raises AvatarNotFound,
        PermissionDenied."""

    @abc.abstractmethod
    def feed(self, *, limit: int = 20, cursor: str | None = None, sort: str = "newest") -> Page[Avatar]:
        """Published public avatars of everyone: `newest` (published_at desc) or `most_liked`
        (likes desc), id as tiebreak."""

    # ---- likes & comments -----------------------------------------------------------------
    @abc.abstractmethod
    def like(self, avatar_id: str, account_id: str) -> LikeResult:
        """Like once per account; a repeat is a no-op (changed=False). A new like increments the
        count and writes an `avatar.liked` event for the owner in the same transaction.
        Raises AvatarNotFound."""

    @abc.abstractmethod
    def unlike(self, avatar_id: str, account_id: str) -> LikeResult:
        """Remove the account's like if any. Raises AvatarNotFound."""

    @abc.abstractmethod
    def has_liked(self, avatar_id: str, account_id: str) -> bool:
        """Whether the account currently likes the avatar."""

    @abc.abstractmethod
    def add_comment(self, avatar_id: str, account_id: str, text: str) -> Comment:
        """Insert a comment (1..2000 chars, else InvalidArgument), increment the count and
        write an `avatar.commented` event for the owner. Raises AvatarNotFound."""

    @abc.abstractmethod
    def list_comments(
        self, avatar_id: str, *, limit: int = 20, cursor: str | None = None, sort_order: str = "asc"
    ) -> Page[Comment]:
        """Comments of an avatar, oldest first by default, cursor-paginated."""

    # ---- idempotency ----------------------------------------------------------------------
    @abc.abstractmethod
    def begin_idempotent(
        self,
        account_id: str,
        key: str,
        request_hash: str,
        *,
        stale_after_s: float = IDEMPOTENCY_STALE_S,
    ) -> IdempotencyResult:
        """Atomically claim (account_id, key). NEW: an in_flight row was inserted (or an expired
        row / an in_flight row older than `stale_after_s` was taken over): proceed, then call
        `finish_idempotent` or `abandon_idempotent`. REPLAY: finished with the same hash.
        MISMATCH: another hash (422). IN_FLIGHT: first request still running (409)."""

    @abc.abstractmethod
    def finish_idempotent(
        self,
        account_id: str,
        key: str,
        status: int,
        body: bytes,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Store the response and mark the record done (replayed for 24 h from creation).
        The caller decides what is final: the service stores 2xx and most 4xx (402 included, as
        Stripe does) but abandons 409/429, whose retry should run again once allowed."""

    @abc.abstractmethod
    def abandon_idempotent(self, account_id: str, key: str) -> None:
        """Delete an in_flight record so a retry runs afresh. Policy: call it when the request
        failed with a 5xx / unexpected exception before anything was committed."""

    @abc.abstractmethod
    def purge_expired(self) -> int:
        """Delete expired idempotency records and old rate-limit windows; returns rows removed."""

    # ---- rate limiting --------------------------------------------------------------------
    @abc.abstractmethod
    def hit_rate_limit(
        self, account_id: str, limit: int, *, window_seconds: float = 60.0
    ) -> RateLimitDecision:
        """Count one request against a sliding window of `window_seconds` (shared by all
        processes): the previous fixed window's count, weighted by its remaining overlap, plus
        the current one's. Refused requests are not counted. Returns (allowed, remaining,
        reset_seconds): time to the current window's end when allowed, the wait until one more
        request fits when refused (use it for Retry-After)."""

    # ---- webhooks -------------------------------------------------------------------------
    @abc.abstractmethod
    def create_endpoint(
        self,
        account_id: str,
        url: str,
        events: Sequence[str] = ("*",),
        *,
        secret: str | None = None,
        description: str | None = None,
    ) -> WebhookEndpoint:
        """New endpoint; `secret` defaults to a fresh `whsec_…`. Events must be EVENT_TYPES or
        "*" (InvalidArgument names `events`). URL safety (private ranges) is the caller's check."""

    @abc.abstractmethod
    def list_endpoints(self, account_id: str) -> list[WebhookEndpoint]:
        """The account's endpoints, oldest first."""

    @abc.abstractmethod
    def get_endpoint(self, account_id: str, endpoint_id: str) -> WebhookEndpoint | None:
        """One of the account's endpoints, or None (also for another account's endpoint)."""

    @abc.abstractmethod
    def delete_endpoint(self, account_id: str, endpoint_id: str) -> bool:
        """Delete one of the account's endpoints and its undelivered messages; False if absent."""

    @abc.abstractmethod
    def set_endpoint_disabled(
        self, account_id: str, endpoint_id: str, disabled: bool, reason: str | None = None
    ) -> WebhookEndpoint:
        """Disable or re-enable an endpoint (re-enabling resets consecutive failures).
        Raises EndpointNotFound."""

    @abc.abstractmethod
    def claim_deliveries(
        self, worker_id: str, limit: int = 10, lease_seconds: float = 30.0
    ) -> list[Delivery]:
        """Lease up to `limit` due pending messages (next_attempt_at <= now, no live lease),
        oldest first. Messages of disabled endpoints are marked failed instead of claimed."""

    @abc.abstractmethod
    def mark_delivered(self, message_id: str, lease_token: str) -> bool:
        """pending + matching lease -> delivered; resets the endpoint's consecutive failures."""

    @abc.abstractmethod
    def mark_attempt_failed(
        self,
        message_id: str,
        lease_token: str,
        error: str,
        *,
        next_attempt_at: float | None,
        disable_endpoint: bool = False,
        disable_reason: str | None = None,
    ) -> bool:
        """Record a failed attempt: attempts+1, last_error, endpoint consecutive_failures+1;
        retry at `next_attempt_at`, or mark the message failed when it is None. With
        `disable_endpoint` the endpoint is disabled (its other pending messages fail at claim)."""

    @abc.abstractmethod
    def list_deliveries(
        self, account_id: str, *, endpoint_id: str | None = None, limit: int = 100
    ) -> list[Delivery]:
        """The account's outbox messages, newest first (for inspection and tests)."""
