"""Durable webhook delivery: the outbox dispatcher (signing: `serve.signing`; the SSRF guard:
`serve.destinations`; both re-exported here).

The store writes one outbox message per subscribed endpoint in the same transaction as the
state change; this module only *drains* that outbox, so an event is never lost: a dispatcher
that dies mid-delivery leaves a lease that expires, and another dispatcher sends the message
again under the same `webhook-id` (receivers de-duplicate on it — delivery is at-least-once).

SSRF: every attempt re-vets the destination (`check_destination`) and the dispatcher then
connects to exactly the vetted address (DNS pinning, so a rebinding DNS answer between check and
connect cannot redirect it): the request URL's host is replaced by the IP, the `Host` header
carries the original host, and for https the TLS SNI and certificate check use the original host
name (httpcore's `sni_hostname` extension). Each request uses a fresh connection (no keep-alive
pool) so a connection opened for one host name is never reused for another on the same IP, and
environment proxies are ignored (`trust_env=False`) so nothing bypasses the pinning.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import ssl
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import httpx

from .destinations import DestinationRefused, Resolver, check_destination, destination_error
from .logctx import logger, request_context
from .loops import BackgroundLoop
from .schemas import iso
from .settings import USER_AGENT, WebhookSettings
from .signing import SignatureError, secret_key, sign, signature_headers, verify, verify_signature
from .store import Delivery, Store

log = logger("serve.webhooks")

__all__ = [
    "USER_AGENT", "SignatureError", "DestinationRefused", "WebhookSettings", "WebhookDispatcher",
    "AttemptResult", "secret_key", "sign", "signature_headers", "verify_signature",
    "check_destination", "destination_error", "render_body", "verify",
]

#: Most bytes of a receiver's response body read (for the error message); the rest is dropped.
MAX_RESPONSE_BYTES = 4096
#: Most vetted addresses of one host tried when connecting fails.
MAX_ADDRESSES_TRIED = 3


# --------------------------------------------------------------------------------------------
# Payload
# --------------------------------------------------------------------------------------------
def render_body(delivery: Delivery) -> bytes:
    """The JSON body `{"id", "type", "createdAt", "data"}` of a message; identical on every
    retry. `id` is the event id (shared by the copies sent to several endpoints of one account);
    `data` is the store's payload's `data` (the app's renderer), else the payload minus `type`
    (the store's default renderer: `{"avatar": ..., **extra}`)."""
    payload = dict(delivery.payload or {})
    if isinstance(payload.get("data"), dict):
        data = payload["data"]
    else:
        data = {k: v for k, v in payload.items() if k != "type"}
    envelope = {"id": delivery.event_id, "type": payload.get("type") or delivery.event_type,
                "createdAt": iso(delivery.created_at), "data": data}
    return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8")


# --------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttemptResult:
    """What one delivery attempt did (`deliver()`'s result; `run_once` keeps them in `last_results`)."""

    message_id: str
    outcome: str  # delivered | retry | failed | disabled | lost (lease gone before marking)
    status_code: int | None
    error: str | None
    next_attempt_at: float | None = None


def _ssl_context(verify: Any) -> ssl.SSLContext | bool:
    if isinstance(verify, ssl.SSLContext) or verify is False:
        return verify
    if verify is True:
        import certifi

        return ssl.create_default_context(cafile=certifi.where())
    path = os.fspath(verify)
    if os.path.isdir(path):
        return ssl.create_default_context(capath=path)
    return ssl.create_default_context(cafile=path)


class WebhookDispatcher:
    """Drains the webhook outbox: claim due messages, POST them signed, record the outcome.

    `run_once()` is one synchronous pass (tests drive it directly); `start()` runs it in a
    daemon thread every `poll_seconds` (sooner after `wake()`, immediately again while a pass
    claimed a full batch); `stop()` ends the loop. `clock` must be the store's clock (retry
    times are compared with it) and also stamps `webhook-timestamp`; `rng` drives the jitter.
    """

    def __init__(self, store: Store, settings: WebhookSettings | None = None, *,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None,
                 resolver: Resolver | None = None, **overrides: Any) -> None:
        """`settings`: the service's `ServiceSettings.webhooks` (default: all defaults); keyword
        `overrides` replace single fields (e.g. `retry_schedule=(0,)`)."""
        opts = settings or WebhookSettings()
        if overrides:
            opts = WebhookSettings.model_validate({**opts.model_dump(), **overrides})
        if not opts.worker_id:
            opts = opts.model_copy(update={
                "worker_id": f"webhooks-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"})
        self.store = store
        self.options = opts
        self.clock = clock
        self.rng = rng or random.Random()
        self.resolver = resolver
        self._ssl = _ssl_context(opts.verify)  # built once: loading CA bundles is not free
        self.last_results: list[AttemptResult] = []
        self._loop = BackgroundLoop(f"webhooks-{opts.worker_id}", self._step, opts.poll_seconds)

    # ---- one pass ----------------------------------------------------------------------
    def run_once(self) -> int:
        """Claim up to `batch_size` due messages and attempt each once; returns how many were
        attempted (delivered or not). Per-message outcomes are in `last_results`."""
        deliveries = self.store.claim_deliveries(self.options.worker_id, self.options.batch_size,
                                                 self.options.lease_seconds)
        if not deliveries:
            self.last_results = []
            return 0
        if len(deliveries) == 1 or self.options.concurrency == 1:
            results = [self.deliver(d) for d in deliveries]
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(self.options.concurrency, len(deliveries)),
                                    thread_name_prefix="webhook-send") as pool:
                results = list(pool.map(self.deliver, deliveries))
        self.last_results = results
        return len(results)

    def drain(self, max_passes: int = 100) -> int:
        """`run_once` until nothing is due (tests, CLI); returns the attempts made."""
        total = 0
        for _ in range(max_passes):
            n = self.run_once()
            total += n
            if n == 0:
                break
        return total

    def deliver(self, d: Delivery) -> AttemptResult:
        """Attempt one claimed message and record the outcome in the store (never raises for a
        receiver's fault; a store error propagates and the lease simply expires). Logged under
        the request id of the job the event is about."""
        with request_context(d.request_id):
            result = self._deliver(d)
            log.log(logging.WARNING if result.outcome in ("failed", "disabled") else logging.INFO,
                    "webhook %s (%s) to endpoint %s, attempt %d: %s%s", d.id, d.event_type, d.endpoint_id,
                    d.attempts + 1, result.outcome, f" ({result.error})" if result.error else "")
        return result

    def _deliver(self, d: Delivery) -> AttemptResult:
        try:
            status, error, disable = self._send(d)
        except Exception as exc:  # noqa: BLE001 - a bad message must fail, not stall the outbox
            log.exception("webhook %s: unexpected error while sending", d.id)
            status, error, disable = None, f"internal error: {type(exc).__name__}: {exc}"[:500], False
        if error is None:
            ok = self.store.mark_delivered(d.id, d.lease_token)
            return AttemptResult(d.id, "delivered" if ok else "lost", status, None)
        attempt = d.attempts + 1
        opts = self.options
        reason = None
        if disable:
            reason = f"endpoint answered 410 Gone: {error}"
        elif opts.disable_after_consecutive_failures and \
                d.endpoint_consecutive_failures + 1 >= opts.disable_after_consecutive_failures:
            disable = True
            reason = (f"{d.endpoint_consecutive_failures + 1} consecutive failed deliveries;"
                      f" last error: {error}")
        next_at = None if (disable or attempt >= opts.max_attempts) else self.clock() + self.backoff(attempt)
        ok = self.store.mark_attempt_failed(d.id, d.lease_token, error, next_attempt_at=next_at,
                                            disable_endpoint=disable, disable_reason=reason)
        if ok and not disable and opts.disable_after_consecutive_failures:
            # Messages claimed in the same batch (or by other dispatchers) saw an older count:
            # re-read it so a dead endpoint is disabled as soon as the threshold is reached.
            ep = self.store.get_endpoint(d.account_id, d.endpoint_id)
            if ep is not None and not ep.disabled and \
                    ep.consecutive_failures >= opts.disable_after_consecutive_failures:
                reason = f"{ep.consecutive_failures} consecutive failed deliveries; last error: {error}"
                self.store.set_endpoint_disabled(d.account_id, d.endpoint_id, True, reason)
                disable = True
        outcome = "lost" if not ok else "disabled" if disable else "retry" if next_at is not None else "failed"
        return AttemptResult(d.id, outcome, status, error, next_at)

    def backoff(self, attempt: int) -> float:
        """Delay before retry after failed attempt `attempt` (1-based): full jitter, capped."""
        schedule = self.options.retry_schedule
        if schedule:
            return schedule[min(attempt, len(schedule)) - 1]
        cap = min(self.options.max_backoff_s, self.options.base_backoff_s * math.pow(2, min(attempt - 1, 60)))
        return self.rng.uniform(0.0, cap)

    # ---- HTTP --------------------------------------------------------------------------
    def _send(self, d: Delivery) -> tuple[int | None, str | None, bool]:
        """POST one message to its pinned address; (status, error or None, gone)."""
        opts = self.options
        try:
            addrs = check_destination(d.url, allow_private=opts.allow_private, allowlist=opts.allowlist,
                                      resolver=self.resolver)
        except DestinationRefused as exc:
            return None, f"destination refused: {exc.message}", False
        url = httpx.URL(d.url)  # parsed exactly as check_destination parsed it
        body = render_body(d)
        headers = {
            **signature_headers(d.secret, d.id, int(self.clock()), body),
            "content-type": "application/json",
            "user-agent": opts.user_agent,
            "host": url.netloc.decode("ascii"),
        }
        extensions = {"sni_hostname": url.raw_host.decode("ascii")} if url.scheme == "https" else {}
        error = "no address tried"
        with httpx.Client(timeout=opts.timeout_s, follow_redirects=False, trust_env=False, verify=self._ssl,
                          limits=httpx.Limits(max_keepalive_connections=0)) as client:
            for ip in addrs[:MAX_ADDRESSES_TRIED]:
                request = client.build_request("POST", url.copy_with(host=ip), headers=headers,
                                               content=body, extensions=extensions)
                try:
                    return self._exchange(client, request)
                except httpx.ConnectError as exc:  # try the next vetted address
                    error = f"connection to {ip} failed: {exc or type(exc).__name__}"
                except httpx.TimeoutException as exc:
                    return None, f"timed out after {opts.timeout_s:g} s ({type(exc).__name__})", False
                except (httpx.HTTPError, ssl.SSLError, OSError) as exc:
                    return None, f"{type(exc).__name__}: {exc}"[:500], False
        return None, error, False

    def _exchange(self, client: httpx.Client, request: httpx.Request) -> tuple[int, str | None, bool]:
        deadline = time.monotonic() + self.options.timeout_s
        response = client.send(request, stream=True)
        snippet = b""
        try:
            for chunk in response.iter_raw():
                snippet += chunk[: MAX_RESPONSE_BYTES - len(snippet)]
                if len(snippet) >= MAX_RESPONSE_BYTES or time.monotonic() > deadline:
                    break
        finally:
            response.close()
        code = response.status_code
        if 200 <= code < 300:
            return code, None, False
        text = snippet.decode("utf-8", "replace").strip()[:200]
        if 300 <= code < 400:
            where = response.headers.get("location", "?")
            return code, f"HTTP {code}: redirect to {where[:200]!r} not followed", False
        return code, f"HTTP {code}" + (f": {text}" if text else ""), code == 410

    # ---- background loop ----------------------------------------------------------------
    def start(self) -> "WebhookDispatcher":
        """Run the dispatch loop in a daemon thread (idempotent): a pass every `poll_seconds`,
        sooner after `wake()`, at once again while a pass claimed a full batch."""
        self._loop.start()
        return self

    def wake(self) -> None:
        """Poll now (e.g. right after a state change wrote outbox messages)."""
        self._loop.wake()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop after the current pass; messages in flight finish or their leases expire."""
        self._loop.stop(timeout if timeout is not None else self.options.timeout_s * 3 + 5)

    @property
    def running(self) -> bool:
        return self._loop.running

    def _step(self) -> bool:
        return self.run_once() >= self.options.batch_size
