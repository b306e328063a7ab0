"""What every router shares: the services the app was built with, auth, response helpers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from fastapi import Depends, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .. import schemas as S
from ..assets import AssetStore
from ..auth import Principal, authenticate
from ..engine_client import EngineClient
from ..errors import avatar_not_found, unauthorized_access
from ..links import REQUEST_BASE_URL, ImageLinks
from ..metrics import IngressMetrics
from ..policy import PolicyChecker
from ..settings import ServiceSettings
from ..store import Avatar, Store
from ..store.base import cursor_pattern
from ..waiting import Waiters
from ..vocab import Visibility

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": S.ErrorResponse, "description": "invalid_request / content_policy_violation"},
    401: {"model": S.ErrorResponse, "description": "authentication_required"},
    403: {"model": S.ErrorResponse, "description": "unauthorized_access"},
    404: {"model": S.ErrorResponse, "description": "avatar_not_found"},
    429: {"model": S.ErrorResponse, "description": "rate_limit_exceeded (Retry-After)"},
}
SUBMIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    402: {"model": S.ErrorResponse, "description": "insufficient_credits"},
    409: {"model": S.ErrorResponse, "description": "Idempotency-Key still in flight"},
    413: {"model": S.ErrorResponse, "description": "request_too_large"},
    415: {"model": S.ErrorResponse, "description": "Content-Type is neither application/json nor multipart/form-data"},
    422: {"model": S.ErrorResponse, "description": "Idempotency-Key reused with another body"},
}


@dataclass(frozen=True)
class Services:
    """Everything a handler may use; built once by `create_app`."""

    settings: ServiceSettings
    store: Store
    engine: EngineClient
    assets: AssetStore
    policy: PolicyChecker
    metrics: IngressMetrics
    links: ImageLinks
    waiters: Waiters  # bounds on waiting requests (Prefer: wait, event streams)

    @property
    def base_url(self) -> str:
        """Prefix of absolute URLs: `public_base_url`, else the current request's base URL."""
        return self.settings.public_base_url.rstrip("/") or REQUEST_BASE_URL.get()


def services(request: Request) -> Services:
    return request.app.state.services


#: Handler parameter defaults: `svc: Services = Svc`, `principal: Principal = Auth`.
Svc = Depends(services)
Auth = Depends(authenticate)


async def call(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Store and asset calls are blocking: run them off the event loop."""
    return await run_in_threadpool(fn, *args, **kwargs)


def dump(model: Any) -> Any:
    """A wire model as its JSON value (camelCase)."""
    return model.model_dump(mode="json", by_alias=True)


def json_response(model: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(dump(model), status_code=status, headers=headers)


def cursor_query(*orders: str, int_keys: bool = False) -> Any:
    """The `cursor` query parameter of a list whose cursors carry one of `orders` (none: one order)."""
    return Query(None, max_length=200, pattern=cursor_pattern(*orders, int_keys=int_keys),
                 description="`nextCursor` of the previous page (it continues the order it was issued for).")


def offset_query() -> Any:
    return Query(None, ge=0, le=1_000_000, description="Items to skip (after the cursor, when both are given).")


def visible_to(av: Avatar, principal: Principal) -> bool:
    return av.account_id == principal.id or av.visibility in (Visibility.PUBLIC, Visibility.UNLISTED) or bool(av.published)


async def get_visible(svc: Services, avatar_id: str, principal: Principal) -> Avatar:
    """The avatar if the caller may see it: own, public, unlisted or published (404 / 403 otherwise)."""
    av = await call(svc.store.get_avatar, avatar_id)
    if av is None:
        raise avatar_not_found(avatar_id)
    if not visible_to(av, principal):
        raise unauthorized_access("This avatar is private to another account")
    return av
