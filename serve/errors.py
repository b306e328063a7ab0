"""One error shape for every failure: `{"error": {"code", "message", "param", "requestId"}}`.

Route code raises `ApiError`, a store error (mapped by `store_error`) or an engine error (which
carries `.code`/`.param`); FastAPI's own
failures (validation, unknown route, wrong method, bad JSON) are mapped by the handlers
installed in `install_error_handlers`. Anything else becomes a 500 whose body only carries the
request id; the traceback goes to the log under that id, never to the client.
"""
from __future__ import annotations

import re
import secrets
from typing import Any, Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError as FastAPIValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from avatar_engine.errors import AvatarEngineError, ProfileError

from .logctx import logger
from .store import (
    ConcurrencyLimitExceeded, InsufficientCredits, InvalidArgument, InvalidState, NotFound, NotPublishable,
    PermissionDenied, StoreError,
)

log = logger("serve.errors")

REQUEST_ID_HEADER = "x-request-id"


class ApiError(Exception):
    """An error with its HTTP status and API code; `param` names the offending field."""

    def __init__(self, status: int, code: str, message: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers or {}


def invalid_request(message: str, param: str | None = None, status: int = 400) -> ApiError:
    return ApiError(status, "invalid_request", message, param=param)


def authentication_required(message: str = "A valid API key is required: send 'Authorization: Bearer <key>'") -> ApiError:
    return ApiError(401, "authentication_required", message, headers={"WWW-Authenticate": "Bearer"})


def unauthorized_access(message: str = "This avatar belongs to another account") -> ApiError:
    return ApiError(403, "unauthorized_access", message)


def avatar_not_found(avatar_id: str) -> ApiError:
    return ApiError(404, "avatar_not_found", f"No avatar with id {avatar_id!r}", param="avatarId")


def not_found(message: str = "Not found", param: str | None = None) -> ApiError:
    return ApiError(404, "not_found", message, param=param)


def content_policy_violation(param: str, message: str = "The text violates the content policy") -> ApiError:
    return ApiError(400, "content_policy_violation", message, param=param)


def rate_limit_exceeded(message: str, retry_after: int, headers: dict[str, str] | None = None) -> ApiError:
    return ApiError(429, "rate_limit_exceeded", message, headers={"Retry-After": str(retry_after), **(headers or {})})


def store_error(exc: StoreError) -> ApiError:
    """Store exceptions → API errors."""
    if isinstance(exc, InsufficientCredits):
        return ApiError(402, "insufficient_credits",
                        f"This request costs {exc.required} credits; the account has {exc.balance}")
    if isinstance(exc, ConcurrencyLimitExceeded):
        return ApiError(429, "rate_limit_exceeded",
                        f"Concurrent generation limit reached: {exc.active} queued or processing, your tier "
                        f"allows {exc.limit}; retry when one finishes", headers={"Retry-After": "5"})
    if isinstance(exc, PermissionDenied):
        return unauthorized_access(f"Only the owner can {exc.action} this avatar")
    if isinstance(exc, NotFound):
        if exc.code == "avatar_not_found":
            return avatar_not_found(exc.object_id)
        return not_found(str(exc))
    if isinstance(exc, InvalidArgument):
        return invalid_request(exc.message if exc.param in exc.message else f"{exc.param}: {exc.message}", exc.param)
    if isinstance(exc, NotPublishable):
        return ApiError(409, "content_policy_violation", exc.message, param="avatarId")
    if isinstance(exc, InvalidState):
        return ApiError(400, "invalid_request", exc.message, param="avatarId")
    return ApiError(500, "internal_error", "A storage error occurred")


class BodyTooLarge(Exception):
    """Raised from the receive channel when a streamed body passes the configured limit."""


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


def request_id_of(request: Request) -> str:
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        rid = new_request_id()
        request.state.request_id = rid
    return rid


def error_body(code: str, message: str, param: str | None, request_id: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "param": param, "requestId": request_id}}


def error_response(request: Request, status: int, code: str, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    rid = request_id_of(request)
    return JSONResponse(error_body(code, message, param, rid), status_code=status,
                        headers={**(headers or {}), REQUEST_ID_HEADER: rid})


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def param_from_loc(loc: Iterable[Any]) -> str | None:
    """('body', 'characters', 1, 'prompt') → 'characters[1].prompt'; ('query','limit') → 'limit'."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "cookie", "form"):
        parts = parts[1:]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + _camel(str(p))
    return out or None


#: What a value that fails a field's `pattern` should look like, by parameter (last segment).
_PATTERN_HINTS = {
    "cursor": "is not a cursor this list issued: pass `nextCursor` back unchanged",
    "url": "must be an http(s) URL with a host name or IPv4 address and no credentials",
}


def _validation_message(err: dict[str, Any], param: str | None) -> str:
    etype = err.get("type", "")
    if etype == "json_invalid":
        return "The request body is not valid JSON"
    if etype == "missing":
        return f"{param} is required"
    if etype == "extra_forbidden":
        return f"{param} is not a recognised parameter"
    if "input" in err and err["input"] is None:
        return f"{param} cannot be null"
    if etype == "string_pattern_mismatch":
        name = (param or "").rsplit(".", 1)[-1].split("[", 1)[0]
        return f"{param} {_PATTERN_HINTS.get(name, 'must contain a non-blank character')}"
    msg = str(err.get("msg", "is invalid"))
    return f"{param}: {msg}" if param else msg


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(request, exc.status, exc.code, exc.message, exc.param, exc.headers)

    @app.exception_handler(AvatarEngineError)
    async def _engine_error(request: Request, exc: AvatarEngineError):
        # ProfileError on a submitted request means an unknown/unloaded model: the client's fault.
        status = 400 if exc.code in ("invalid_request", "content_policy_violation") or isinstance(exc, ProfileError) else 500
        code = "invalid_request" if isinstance(exc, ProfileError) else exc.code
        return error_response(request, status, code, exc.message, exc.param)

    @app.exception_handler(FastAPIValidationError)
    async def _validation(request: Request, exc: FastAPIValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = list(first.get("loc", ()))
        if first.get("type") == "json_invalid":
            return error_response(request, 400, "invalid_request", _validation_message(first, None), None)
        if loc[:1] == ["body"] and len(loc) == 1 and first.get("type") in ("missing", "model_attributes_type", "dict_type"):
            return error_response(request, 400, "invalid_request", "The request body must be a JSON object", None)
        param = param_from_loc(loc)
        return error_response(request, 400, "invalid_request", _validation_message(first, param), param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if isinstance(exc.__cause__, BodyTooLarge):
            return _too_large(request)
        status = exc.status_code
        if status == 404:
            return error_response(request, 404, "not_found", f"No route for {request.method} {request.url.path}")
        if status == 405:
            allowed = allowed_methods(request)
            return error_response(request, 405, "method_not_allowed",
                                  f"{request.method} is not allowed on {request.url.path}; allowed: {allowed}",
                                  headers={**dict(exc.headers or {}), "Allow": allowed})
        if status == 413:
            return _too_large(request)
        if status == 400:
            return error_response(request, 400, "invalid_request", str(exc.detail))
        code = {401: "authentication_required", 403: "unauthorized_access", 429: "rate_limit_exceeded"}.get(status, "error")
        return error_response(request, status, code, str(exc.detail), headers=dict(exc.headers or {}))

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, exc: StoreError):
        mapped = store_error(exc)
        if mapped.status >= 500:
            log.error("store error (requestId=%s): %r", request_id_of(request), exc)
        return error_response(request, mapped.status, mapped.code, mapped.message, mapped.param, mapped.headers)

    @app.exception_handler(BodyTooLarge)
    async def _too_large_handler(request: Request, exc: BodyTooLarge):
        return _too_large(request)


def path_table(app: Any) -> list[tuple[re.Pattern[str], int, frozenset[str]]]:
    """(matcher, number of templated segments, methods) of each path of `app.openapi()`, built
    once per app (kept on `app.state`)."""
    spec = app.openapi()
    cached = getattr(app.state, "path_table", None)
    if cached is None or cached[0] is not spec:
        rows = [(re.compile(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))), template.count("{"),
                 frozenset(m.upper() for m in ops if m in _HTTP_METHODS))
                for template, ops in spec.get("paths", {}).items()]
        cached = (spec, rows)
        app.state.path_table = cached
    return cached[1]


def schema_methods(app: Any, path: str) -> set[str] | None:
    """The methods `app`'s OpenAPI document lists for `path`, matched as OpenAPI says: a concrete
    path before templated ones (`/v1/avatars/generate` is not `/v1/avatars/{avatarId}`). None
    when no documented path matches."""
    best: tuple[int, set[str]] | None = None
    for matcher, params, methods in path_table(app):
        if matcher.fullmatch(path):
            if best is None or params < best[0]:
                best = (params, set(methods))
            elif params == best[0]:
                best[1].update(methods)
    return None if best is None else best[1]


def allowed_methods(request: Request) -> str:
    """The `Allow` value of a 405: the schema's methods for this path (Starlette's own value names
    only the first matching route's, e.g. GET but not PATCH and DELETE on /v1/avatars/{avatarId})."""
    return ", ".join(sorted(schema_methods(request.app, request.url.path) or ()))


_HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def _too_large(request: Request) -> JSONResponse:
    limit = getattr(request.app.state, "max_body_bytes", None)
    msg = f"The request body is larger than the limit of {limit} bytes" if limit else "The request body is too large"
    return error_response(request, 413, "request_too_large", msg)
