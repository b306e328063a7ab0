"""The app's two ASGI middlewares: `RequestContextMiddleware` (outermost: request id, body size
limit, last-resort 500 in the error shape) and `SchemaMethodGuard` (405 for a method the OpenAPI
document does not list, before routing). Error bodies come from `serve.errors`."""
from __future__ import annotations

import json
import re
from typing import Any

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import REQUEST_ID_HEADER, BodyTooLarge, error_body, error_response, new_request_id, schema_methods
from .links import REQUEST_BASE_URL, request_base_url
from .logctx import logger, reset_request_id, set_request_id

log = logger("serve.errors")


class SchemaMethodGuard:
    """405 for a method the OpenAPI document does not list for a documented path, before routing:
    without it `GET /v1/avatars/generate` would reach `GET /v1/avatars/{avatarId}` (a 404), so
    the app would answer differently from what its schema says. HEAD goes with GET."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("app") is not None:
            method = scope.get("method", "GET").upper()
            allowed = schema_methods(scope["app"], scope.get("path", ""))
            if allowed and method not in allowed and not (method == "HEAD" and "GET" in allowed):
                request = Request(scope, receive)
                response = error_response(request, 405, "method_not_allowed",
                                          f"{method} is not allowed on {request.url.path}; allowed: "
                                          f"{', '.join(sorted(allowed))}", headers={"Allow": ", ".join(sorted(allowed))})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def proxy_request_id(scope: Scope) -> str | None:
    """The `x-request-id` a proxy put on the request (Ray Serve's: the client's own header if it
    sent one, else a UUID), when it is a plain token fit for logs."""
    for key, value in scope.get("headers", []):
        if key == REQUEST_ID_HEADER.encode():
            text = value.decode("latin-1")
            return text if _SAFE_REQUEST_ID.fullmatch(text) else None
    return None


class RequestContextMiddleware:
    """Outermost ASGI layer: assigns the request id, enforces the body size limit (declared and
    streamed), and turns any uncaught exception into a logged 500 with the error shape.

    Every response carries exactly one `x-request-id`. Standalone, the id is ours (`req_…`)
    and this layer sets the header. Behind Ray Serve (`proxy_request_id=True`) the proxy
    already gives every request an id and appends it to every response as `X-Request-ID`, so
    the app adopts that id (in bodies and logs) and leaves the header to the proxy."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, proxy_request_id: bool = False):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.proxy_request_id = proxy_request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = (proxy_request_id(scope) if self.proxy_request_id else None) or new_request_id()
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                if self.proxy_request_id:
                    # The proxy appends its own; drop any a handler set so there is one.
                    headers = [(k, v) for k, v in headers if k.lower() != REQUEST_ID_HEADER.encode()]
                elif REQUEST_ID_HEADER.encode() not in present:
                    headers.append((REQUEST_ID_HEADER.encode(), rid.encode()))
                for k, v in scope.get("state", {}).get("extra_headers", {}).items():
                    if k.lower().encode() not in present:
                        headers.append((k.lower().encode(), str(v).encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await _send_json(send_wrapper, 413, error_body(
                "request_too_large", f"The request body is larger than the limit of {self.max_body_bytes} bytes",
                None, rid), rid)
            return

        seen = 0

        async def receive_wrapper() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise BodyTooLarge()
            return message

        token = set_request_id(rid)  # every log line of this request carries its id
        base_token = REQUEST_BASE_URL.set(request_base_url(scope))  # absolute links' default prefix
        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        except BodyTooLarge:
            if not started:
                await _send_json(send_wrapper, 413, error_body(
                    "request_too_large", f"The request body is larger than the limit of {self.max_body_bytes} bytes",
                    None, rid), rid)
        except Exception:  # noqa: BLE001 - the last line of defence
            log.exception("unhandled error (requestId=%s) on %s %s", rid, scope.get("method"), scope.get("path"))
            if not started:
                await _send_json(send_wrapper, 500, error_body(
                    "internal_error", f"An internal error occurred; quote requestId {rid} when reporting it",
                    None, rid), rid)
        finally:
            REQUEST_BASE_URL.reset(base_token)
            reset_request_id(token)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_json(send: Send, status: int, body: dict[str, Any], rid: str) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
        (REQUEST_ID_HEADER.encode(), rid.encode())]})
    await send({"type": "http.response.body", "body": payload})
