"""API-key authentication and per-tier request limits as FastAPI dependencies.

Keys are verified by the store (hashed at rest, constant-time compare). The rate limit is a
sliding one-minute window counted in the database, so it holds across all ingress replicas; its
state is reported on every response as `RateLimit-Policy: "minute";q=60;w=60` and
`RateLimit: "minute";r=59;t=41` (IETF httpapi-ratelimit-headers draft), and a refusal is a 429
with `Retry-After`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from .errors import authentication_required, rate_limit_exceeded
from .settings import ServiceSettings, TierLimits
from .store import Account, Store


@dataclass(frozen=True)
class Principal:
    """The authenticated caller."""

    account: Account
    limits: TierLimits

    @property
    def id(self) -> str:
        return self.account.id


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def tier_limits(settings: ServiceSettings, tier: str) -> TierLimits:
    return settings.tiers.get(tier) or settings.tiers["free"]


def set_response_headers(request: Request, headers: dict[str, str]) -> None:
    """Headers the outer middleware adds to whatever response this request ends with
    (including error responses)."""
    request.scope.setdefault("state", {}).setdefault("extra_headers", {}).update(headers)


async def authenticate(request: Request) -> Principal:
    """Dependency: 401 unless a valid key is presented; then counts the request against the
    tier's per-minute limit (429 when over)."""
    store: Store = request.app.state.store
    settings: ServiceSettings = request.app.state.settings
    token = bearer_token(request)
    if token is None:
        raise authentication_required()
    account = await run_in_threadpool(store.authenticate, token)
    if account is None:
        raise authentication_required("The API key is invalid or revoked")
    limits = tier_limits(settings, account.tier)
    request.state.account_id = account.id
    decision = await run_in_threadpool(store.hit_rate_limit, account.id, limits.requests_per_minute)
    reset = max(1, int(math.ceil(decision.reset_seconds)))
    headers = {
        "RateLimit-Policy": f'"minute";q={limits.requests_per_minute};w=60',
        "RateLimit": f'"minute";r={max(0, decision.remaining)};t={reset}',
    }
    set_response_headers(request, headers)
    if not decision.allowed:
        raise rate_limit_exceeded(
            f"Rate limit of {limits.requests_per_minute} requests per minute exceeded for the "
            f"{account.tier} tier; retry in {reset} s", retry_after=reset, headers=headers)
    return Principal(account=account, limits=limits)
