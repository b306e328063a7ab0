"""`Idempotency-Key` on any POST, as a dependency: `idem: Idempotency = Depends(idempotency)` and
then `return await idem.run(canonical_request, produce)` in the handler.

Same key + same request within 24 h → the stored response with `Idempotent-Replayed: true`;
other request → 422; first still running → 409. The record lives in the store, so this holds
across replicas. 5xx/unexpected failures and 409/429 refusals abandon the key so a retry runs
afresh (as Stripe does); any other answer, 402 included, is stored.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Awaitable, Callable

from fastapi import Depends, Request, Response
from fastapi.responses import JSONResponse

import avatar_engine

from ..auth import Principal, authenticate
from ..errors import ApiError, error_body, invalid_request, request_id_of, store_error
from ..store import IdempotencyState, StoreError
from .common import Services, call, services

KEY_HEADER = "idempotency-key"
KEY_MAX = 255
#: Refusals that say "not now" rather than answering the request: never stored under a key, so
#: a retry with the same Idempotency-Key runs afresh once the limit allows (as Stripe does).
RETRYABLE_STATUSES = frozenset({409, 429})
#: Response headers replayed with the stored body.
KEPT_HEADERS = ("content-type", "location", "retry-after")


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def request_fingerprint(method: str, path: str, canonical: Any) -> str:
    """What an Idempotency-Key is bound to: method, path and the canonical (parsed, defaults
    filled, photos hashed) request body."""
    return hashlib.sha256(f"{method.upper()} {path}\n{_canonical(canonical)}".encode()).hexdigest()


def _error_response(request: Request, status: int, code: str, message: str, param: str | None,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message, param, request_id_of(request)), status_code=status, headers=headers)


class Idempotency:
    """The Idempotency-Key of one request (or none) and the means to honour it."""

    def __init__(self, request: Request, principal: Principal, svc: Services) -> None:
        self.request, self.principal, self.store = request, principal, svc.store
        self.key = request.headers.get(KEY_HEADER)

    async def run(self, canonical: Any, produce: Callable[[], Awaitable[Response]]) -> Response:
        """`produce()` at most once per (account, key) within 24 h; see the module docstring."""
        if self.key is None:
            return await produce()
        if not self.key.strip() or len(self.key) > KEY_MAX:
            raise invalid_request(f"Idempotency-Key must be 1 to {KEY_MAX} characters", "Idempotency-Key")
        account, key, request = self.principal.id, self.key, self.request
        digest = request_fingerprint(request.method, request.url.path, canonical)
        res = await call(self.store.begin_idempotent, account, key, digest)
        if res.state == IdempotencyState.REPLAY:
            stored = res.response
            return Response(stored.body, status_code=stored.status, headers={**stored.headers, "Idempotent-Replayed": "true"})
        if res.state == IdempotencyState.MISMATCH:
            raise ApiError(422, "invalid_request", "This Idempotency-Key was used with a different request",
                           param="Idempotency-Key")
        if res.state == IdempotencyState.IN_FLIGHT:
            raise ApiError(409, "idempotency_conflict",
                           "A request with this Idempotency-Key is still being processed; retry later",
                           param="Idempotency-Key", headers={"Retry-After": "1"})
        try:
            response = await produce()
        except ApiError as exc:
            if exc.status >= 500:
                await call(self.store.abandon_idempotent, account, key)
                raise
            response = _error_response(request, exc.status, exc.code, exc.message, exc.param, exc.headers)
        except StoreError as exc:
            mapped = store_error(exc)
            response = _error_response(request, mapped.status, mapped.code, mapped.message, mapped.param, mapped.headers)
        except avatar_engine.AvatarEngineError as exc:
            if exc.code != "invalid_request":
                await call(self.store.abandon_idempotent, account, key)
                raise
            response = _error_response(request, 400, exc.code, exc.message, exc.param)
        except BaseException:
            await call(self.store.abandon_idempotent, account, key)
            raise
        if response.status_code >= 500 or response.status_code in RETRYABLE_STATUSES:
            await call(self.store.abandon_idempotent, account, key)
            return response
        keep = {k: v for k, v in response.headers.items() if k.lower() in KEPT_HEADERS}
        await call(self.store.finish_idempotent, account, key, response.status_code, bytes(response.body), keep)
        return response


def idempotency(request: Request, principal: Principal = Depends(authenticate),
                svc: Services = Depends(services)) -> Idempotency:
    """Dependency: the request's Idempotency-Key handling (authenticates the caller too)."""
    return Idempotency(request, principal, svc)


#: Handler parameter default: `idem: Idempotency = Idem`.
Idem = Depends(idempotency)
