"""What every router shares: the services the app was built with (`serve.services`), auth,
response helpers."""
from __future__ import annotations

from typing import Any

from fastapi import Depends, Query, Request
from fastapi.responses import JSONResponse

from .. import schemas as S
from ..auth import Principal, authenticate
from ..schemas import dump
from ..services import Services, call, get_visible, visible_to
from ..store.base import cursor_pattern

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


def services(request: Request) -> Services:
    return request.app.state.services


#: Handler parameter defaults: `svc: Services = Svc`, `principal: Principal = Auth`.
Svc = Depends(services)
Auth = Depends(authenticate)


def json_response(model: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(dump(model), status_code=status, headers=headers)


def cursor_query(*orders: str, int_keys: bool = False) -> Any:
    """The `cursor` query parameter of a list whose cursors carry one of `orders` (none: one order)."""
    return Query(None, max_length=200, pattern=cursor_pattern(*orders, int_keys=int_keys),
                 description="`nextCursor` of the previous page (it continues the order it was issued for).")


def offset_query() -> Any:
    return Query(None, ge=0, le=1_000_000, description="Items to skip (after the cursor, when both are given).")


__all__ = ["ERROR_RESPONSES", "SUBMIT_RESPONSES", "Auth", "Principal", "Services", "Svc", "call", "cursor_query", "dump",
           "get_visible", "json_response", "offset_query", "services", "visible_to"]
