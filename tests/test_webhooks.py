"""serve.webhooks against a real store (SQLite, and PostgreSQL when reachable) and a real HTTP(S)
receiver on 127.0.0.1 that verifies every signature and de-duplicates on `webhook-id`.

Time is injected (one FakeClock shared by the store and the dispatcher), so retries and lease
expiry are reached by moving the clock, never by sleeping.
"""
from __future__ import annotations

import datetime as dt
import http.server
import ipaddress
import json
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from serve.settings import ServiceSettings
from serve.store import open_store
from serve.webhooks import (
    USER_AGENT,
    DestinationRefused,
    SignatureError,
    WebhookDispatcher,
    WebhookSettings,
    check_destination,
    destination_error,
    render_body,
    sign,
    signature_headers,
    verify,
    verify_signature,
)

from helpers import BACKENDS, FakeClock, open_test_store, reference_verify


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path, clock):
    with open_test_store(request.param, tmp_path, "webhooks", clock=clock) as s:
        yield s


# ---------------------------------------------------------------------------------------------
# A real receiver
# ---------------------------------------------------------------------------------------------
class Receiver:
    """HTTP(S) server on 127.0.0.1 acting like a careful webhook consumer: verifies the
    signature (400 when invalid), answers from a per-test plan, and processes each
    `webhook-id` once (a repeat is acknowledged but not processed again)."""

    def __init__(self, clock: FakeClock, ssl_context: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> None:
        self.clock = clock
        self.secret: str | None = None
        self.plan: list[Any] = []  # per request to /hook: status int, or (status, headers), or "sleep:<s>"
        self.requests: list[dict[str, Any]] = []
        self.processed: dict[str, dict] = {}
        self.duplicates: list[str] = []
        self.arrived = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    # Verified with the reference implementation, not with the module that signed.
                    msg_id = reference_verify(receiver.secret or "", headers, body, now=receiver.clock())
                    error = None
                except Exception as exc:  # noqa: BLE001 - any verification failure is a 400
                    msg_id, error = None, str(exc)
                receiver.requests.append({"path": self.path, "headers": headers, "body": body,
                                          "verified": msg_id, "error": error})
                step = receiver.plan.pop(0) if (receiver.plan and self.path == "/hook") else 200
                if isinstance(step, str) and step.startswith("sleep:"):
                    time.sleep(float(step.split(":", 1)[1]))
                    step = 200
                status, extra = step if isinstance(step, tuple) else (step, {})
                if msg_id is None:
                    status = 400
                elif 200 <= status < 300:
                    if msg_id in receiver.processed:
                        receiver.duplicates.append(msg_id)
                    else:
                        receiver.processed[msg_id] = json.loads(body)
                try:
                    self.send_response(status)
                    for k, v in extra.items():
                        self.send_header(k, v)
                    self.send_header("content-length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:  # the client gave up (timeout test)
                    pass
                receiver.arrived.set()

            def log_message(self, *args):
                pass

        server_cls = http.server.ThreadingHTTPServer
        if ":" in host:
            server_cls = type("V6Server", (http.server.ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
        self.server = server_cls((host, 0), Handler)
        self.server.daemon_threads = True
        if ssl_context is not None:
            self.server.socket = ssl_context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook", host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver(clock):
    r = Receiver(clock)
    yield r
    r.close()


def _options(**kw: Any) -> WebhookSettings:
    base = dict(worker_id="disp-test", allowlist=("127.0.0.1",), timeout_s=5.0, base_backoff_s=60.0,
                max_backoff_s=600.0, max_attempts=8, concurrency=4)
    base.update(kw)
    return WebhookSettings(**base)


def _endpoint(store, receiver: Receiver, url: str | None = None, events=("*",)):
    account = store.create_account(credits=1000)
    ep = store.create_endpoint(account.id, url or receiver.url(), events)
    receiver.secret = ep.secret
    return account, ep


def _completed_avatar(store, account_id: str, prompt: str = "a red fox"):
    """submit → claim → complete through the store: writes one avatar.completed per endpoint."""
    av = store.submit_job(account_id, "generate", {"prompt": prompt, "model": "tiny-sd15"},
                          cost=2, max_concurrent=10)
    [job] = store.claim_jobs("gpu-worker", 1, 60.0)
    assert store.complete_job(job.id, job.lease_token, {"images": [{"width": 64, "height": 64, "seed": 1}]})
    return av


def _failed_avatar(store, account_id: str):
    av = store.submit_job(account_id, "generate", {"prompt": "x"}, cost=2, max_concurrent=10)
    [job] = store.claim_jobs("gpu-worker", 1, 60.0)
    assert store.fail_job(job.id, job.lease_token, "engine_error", "boom")
    return av


# ---------------------------------------------------------------------------------------------
# Signing
# ---------------------------------------------------------------------------------------------
VECTOR = dict(secret="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", msg_id="msg_p5jXN8AQM9LWM0D4loKWxJek",
              ts=1614265330, body='{"test": 2432232314}')


def test_signature_matches_the_standard_webhooks_test_vector():
    # The spec's published vector: receivers using any Standard Webhooks library accept us.
    assert sign(VECTOR["secret"], VECTOR["msg_id"], VECTOR["ts"], VECTOR["body"]) == \
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    headers = signature_headers(VECTOR["secret"], VECTOR["msg_id"], VECTOR["ts"], VECTOR["body"].encode())
    assert verify_signature(VECTOR["secret"], headers, VECTOR["body"], now=VECTOR["ts"] + 10) == VECTOR["msg_id"]
    assert reference_verify(VECTOR["secret"], headers, VECTOR["body"].encode(), now=VECTOR["ts"] + 10) == VECTOR["msg_id"]


def test_signatures_made_now_pass_the_reference_verifier_unchanged():
    """`standardwebhooks.Webhook.verify` as a receiver runs it: wall clock, its own tolerance."""
    from standardwebhooks.webhooks import Webhook, WebhookVerificationError

    body = b'{"id":"evt_1","type":"avatar.completed","data":{}}'
    headers = signature_headers(VECTOR["secret"], "msg_now", int(time.time()), body)
    assert Webhook(VECTOR["secret"]).verify(body, headers) == json.loads(body)
    with pytest.raises(WebhookVerificationError):
        Webhook(VECTOR["secret"]).verify(body + b" ", headers)
    stale = signature_headers(VECTOR["secret"], "msg_old", int(time.time()) - 3600, body)
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(VECTOR["secret"]).verify(body, stale)


def test_signature_round_trip_with_a_store_secret_and_tamper_detection(store):
    account = store.create_account()
    secret = store.create_endpoint(account.id, "https://example.com/h").secret
    assert secret.startswith("whsec_")
    body = b'{"id":"evt_1","type":"avatar.completed","data":{"x":1}}'
    now = 1_700_000_000
    h = signature_headers(secret, "msg_abc", now, body)
    assert set(h) == {"webhook-id", "webhook-timestamp", "webhook-signature", "X-Avatar-Signature"}
    assert h["webhook-timestamp"] == str(now)
    assert h["webhook-signature"].startswith("v1,")
    assert verify_signature(secret, {k.upper(): v for k, v in h.items()}, body, now=now) == "msg_abc"
    assert verify(secret, h, body, now=now)

    tampered = [
        (secret, h, body + b" "),
        (secret, {**h, "webhook-id": "msg_other"}, body),
        (secret, {**h, "webhook-timestamp": str(now + 1)}, body),
        (store.create_endpoint(account.id, "https://example.com/h").secret, h, body),
    ]
    assert reference_verify(secret, h, body, now=now) == "msg_abc"
    for s, hh, b in tampered:
        with pytest.raises(SignatureError, match="no matching v1 signature"):
            verify_signature(s, hh, b, now=now)
        assert not verify(s, hh, b, now=now)
        with pytest.raises(Exception, match="No matching signature"):
            reference_verify(s, hh, b, now=now)
    # Key rotation: any of several space-separated signatures may match.
    rotated = {**h, "webhook-signature": "v1,AAAA v2,zzz " + h["webhook-signature"]}
    assert verify_signature(secret, rotated, body, now=now) == "msg_abc"
    assert reference_verify(secret, rotated, body, now=now) == "msg_abc"
    with pytest.raises(SignatureError, match="missing header.*webhook-signature"):
        verify_signature(secret, {k: v for k, v in h.items() if k != "webhook-signature"}, body, now=now)


def test_timestamp_tolerance_bounds_replays():
    s, body = VECTOR["secret"], b"{}"
    h = signature_headers(s, "msg_1", 1_000_000, body)
    for skew in (-300, -299, 0, 299, 300):
        assert verify_signature(s, h, body, now=1_000_000 + skew) == "msg_1"
    for skew in (-301, 301, 86400):
        with pytest.raises(SignatureError, match="webhook-timestamp.*tolerance"):
            verify_signature(s, h, body, now=1_000_000 + skew)
    assert verify_signature(s, h, body, now=1_000_000 + 3000, tolerance_s=3600) == "msg_1"
    with pytest.raises(SignatureError, match="webhook-timestamp: not an integer"):
        verify_signature(s, {**h, "webhook-timestamp": "soon"}, body, now=1_000_000)
    with pytest.raises(ValueError, match="secret"):
        sign("whsec_not*base64", "msg_1", 1, b"")


# ---------------------------------------------------------------------------------------------
# SSRF guard
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("url, kind", [
    ("http://127.0.0.1/hook", "loopback"),
    ("http://127.1:8080/", "loopback"),  # inet_aton short form
    ("http://2130706433/", "loopback"),  # decimal form
    ("http://10.1.2.3/", "private"),
    ("http://192.168.0.10/", "private"),
    ("http://172.16.5.5/", "private"),
    ("http://169.254.169.254/latest/meta-data", "link-local"),  # cloud metadata
    ("http://[::1]:9000/", "loopback"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[fd00::1]/", "private"),
    ("http://[::ffff:10.0.0.1]/", "private (embeds IPv4 10.0.0.1)"),
    ("http://[::ffff:127.0.0.1]/", "loopback (embeds IPv4 127.0.0.1)"),
    ("http://localhost:8000/", "loopback"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://100.64.0.7/", "carrier-grade NAT"),
    ("http://224.0.0.251/", "multicast"),
    ("https://[::]/", "unspecified"),
])
def test_private_destinations_are_refused_unless_allowed(url, kind):
    with pytest.raises(DestinationRefused) as err:
        check_destination(url, allow_private=False, allowlist=())
    assert err.value.param == "url" and kind in err.value.message and "webhook_allowlist" in err.value.message
    assert check_destination(url, allow_private=True)  # operator opt-in: still resolves, now allowed


def test_public_literal_passes_without_connecting_and_allowlist_is_exact():
    assert check_destination("http://93.184.216.34/x", allow_private=False, allowlist=()) == ["93.184.216.34"]
    assert check_destination("https://[2606:2800:220:1:248:1893:25c8:1946]/") == ["2606:2800:220:1:248:1893:25c8:1946"]
    assert check_destination("http://127.0.0.1:9/", allowlist=["127.0.0.1"]) == ["127.0.0.1"]
    assert check_destination("http://10.9.8.7/", allowlist=["10.0.0.0/8"]) == ["10.9.8.7"]
    local = check_destination("http://localhost/", allowlist=["LOCALHOST"])  # host names: case-insensitive
    assert local and all(ipaddress.ip_address(a).is_loopback for a in local)
    with pytest.raises(DestinationRefused, match="192.168.1.1 is private"):
        check_destination("http://192.168.1.1/", allowlist=["10.0.0.0/8", "127.0.0.1"])


def test_hostname_resolving_to_loopback_is_refused_and_any_bad_address_refuses():
    # A public-looking name whose DNS answer is loopback (the rebinding set-up) is refused, and a
    # name with one public and one private address is refused too: the check covers ANY address.
    dns = {"rebind.example": ["127.0.0.1"], "mixed.example": ["93.184.216.34", "10.0.0.5"],
           "ok.example": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]}

    def resolver(host, port):
        return dns[host]

    with pytest.raises(DestinationRefused, match="host 'rebind.example' resolves to 127.0.0.1, which is loopback"):
        check_destination("https://rebind.example/h", resolver=resolver)
    with pytest.raises(DestinationRefused, match="10.0.0.5, which is private"):
        check_destination("https://mixed.example/h", resolver=resolver)
    assert check_destination("https://ok.example/h", resolver=resolver) == dns["ok.example"]
    assert check_destination("https://rebind.example/h", allowlist=["rebind.example"], resolver=resolver) == ["127.0.0.1"]


@pytest.mark.parametrize("url, message", [
    ("ftp://93.184.216.34/x", "scheme 'ftp' is not allowed"),
    ("file:///etc/passwd", "scheme 'file' is not allowed"),
    ("http://user:pw@93.184.216.34/", "must not contain credentials"),
    ("http:///nohost", "has no host"),
    ("http://does-not-exist.invalid/", "does not resolve"),
])
def test_malformed_destinations_are_refused_with_a_reason(url, message):
    with pytest.raises(DestinationRefused, match=message):
        check_destination(url, allow_private=True)


def test_destination_error_reads_service_settings():
    assert "loopback" in destination_error("http://127.0.0.1:8/h", ServiceSettings())
    assert destination_error("http://127.0.0.1:8/h", ServiceSettings(webhook_allow_private=True)) is None
    assert destination_error("http://127.0.0.1:8/h", ServiceSettings(webhook_allowlist="127.0.0.0/8")) is None
    assert destination_error("http://93.184.216.34/h", ServiceSettings()) is None
    opts = ServiceSettings(webhook_allowlist=("10.0.0.0/8",), webhook_max_attempts=3).webhooks
    assert opts.allowlist == ("10.0.0.0/8",) and opts.allow_private is False and opts.max_attempts == 3
    assert destination_error("http://10.1.2.3/h", opts) is None  # the nested settings themselves work too
    with pytest.raises(ValueError, match="max_attempts"):
        WebhookSettings(max_attempts=0)


# ---------------------------------------------------------------------------------------------
# Delivery
# ---------------------------------------------------------------------------------------------
def test_event_is_delivered_exactly_once_with_a_valid_signature(store, receiver, clock):
    account, ep = _endpoint(store, receiver)
    av = _completed_avatar(store, account.id)
    disp = WebhookDispatcher(store, _options(), clock=clock)

    assert disp.run_once() == 1
    assert [r.outcome for r in disp.last_results] == ["delivered"]
    [req] = receiver.requests
    assert req["error"] is None and req["verified"] == req["headers"]["webhook-id"]
    assert req["headers"]["webhook-id"].startswith("msg_")
    assert req["headers"]["webhook-timestamp"] == str(int(clock()))
    assert req["headers"]["user-agent"] == USER_AGENT
    assert req["headers"]["content-type"] == "application/json"
    event = json.loads(req["body"])
    assert set(event) == {"id", "type", "createdAt", "data"}
    assert event["type"] == "avatar.completed" and event["id"].startswith("evt_")
    assert event["createdAt"].endswith("Z")
    assert event["data"]["avatar"]["id"] == av.id and event["data"]["avatar"]["status"] == "completed"
    assert "lease_token" not in event["data"]["avatar"]

    [d] = store.list_deliveries(account.id)
    assert d.status == "delivered" and d.attempts == 1 and d.id == req["headers"]["webhook-id"]
    clock.advance(3600)
    assert disp.run_once() == 0 and len(receiver.requests) == 1  # never sent again


def percify_style_verify(secret: str, headers: dict[str, str], raw_body: bytes) -> bool:
    """A receiver written from Percify-style docs, independent of `serve.signing`: the header is
    `sha256=<hex HMAC-SHA256 of the raw body>`, keyed with the secret string as shown."""
    import hashlib
    import hmac

    expected = "sha256=" + hmac.new(secret.encode(), raw_body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, headers.get("x-avatar-signature", ""))


def test_each_delivery_carries_a_hex_body_hmac_that_a_percify_style_receiver_verifies(store, receiver, clock):
    account, ep = _endpoint(store, receiver)
    _completed_avatar(store, account.id)
    assert WebhookDispatcher(store, _options(), clock=clock).run_once() == 1
    [req] = receiver.requests
    assert req["verified"]  # the Standard Webhooks headers still verify (reference library)
    assert percify_style_verify(ep.secret, req["headers"], req["body"])
    assert set(json.loads(req["body"])) >= {"type", "data"}
    # Tampering with one byte, or another secret, fails the body signature.
    assert not percify_style_verify(ep.secret, req["headers"], req["body"] + b" ")
    assert not percify_style_verify(ep.secret + "x", req["headers"], req["body"])
    from serve.signing import verify_body_signature

    value = req["headers"]["x-avatar-signature"]
    assert verify_body_signature(ep.secret, value, req["body"])
    assert verify_body_signature(ep.secret, value.split("=", 1)[1], req["body"])  # bare hex too
    assert not verify_body_signature(ep.secret, value, req["body"][:-1])


def test_low_balance_event_once_per_crossing_in_the_reserving_transaction(store):
    account = store.create_account(credits=14)
    store.create_endpoint(account.id, "http://127.0.0.1:9/h", ["credits.low_balance"])

    def submit(cost: int):
        return store.submit_job(account.id, "generate", {"prompt": "x"}, cost=cost, max_concurrent=10,
                                low_balance_threshold=10)

    def events():
        return [d for d in store.list_deliveries(account.id) if d.event_type == "credits.low_balance"]

    submit(2)  # 14 -> 12: still above
    assert events() == []
    av = submit(3)  # 12 -> 9: crosses
    [d] = events()
    assert d.payload == {"type": "credits.low_balance", "data": {"object": {
        "object": "credit_balance", "userId": account.id, "balance": 9, "threshold": 10, "avatarId": av.id}}}
    body = json.loads(render_body(d))
    assert body["type"] == "credits.low_balance" and body["data"]["object"]["balance"] == 9
    submit(1)  # 9 -> 8: already below, no second event
    assert len(events()) == 1
    store.grant_credits(account.id, 10)  # 8 -> 18: back above
    submit(9)  # 18 -> 9: a new crossing
    assert len(events()) == 2
    store.grant_credits(account.id, 100)
    with pytest.raises(Exception):  # a refused reservation writes nothing
        store.submit_job(account.id, "generate", {"prompt": "x"}, cost=10_000, max_concurrent=10,
                         low_balance_threshold=10)
    assert len(events()) == 2


def test_data_comes_from_the_stores_renderer(tmp_path, clock, receiver):
    # The app renders `{"type", "data": {"object": <API avatar>}}`; the body keeps that data.
    def render(event_type, avatar, extra):
        return {"type": event_type, "data": {"object": {"id": avatar.id, "status": avatar.status}, **extra}}

    s = open_store(f"sqlite:///{tmp_path / 'r.db'}", clock=clock, event_renderer=render)
    try:
        account, _ = _endpoint(s, receiver, events=["avatar.completed", "avatar.commented"])
        av = _completed_avatar(s, account.id)
        s.add_comment(av.id, account.id, "nice")
        bodies = {json.loads(render_body(d))["type"]: json.loads(render_body(d)) for d in s.list_deliveries(account.id)}
        assert bodies["avatar.completed"]["data"]["object"] == {"id": av.id, "status": "completed"}
        assert bodies["avatar.commented"]["data"]["object"]["id"] == av.id
        # Two events of one avatar: sent one after the other, in order (one per pass).
        assert WebhookDispatcher(s, _options(), clock=clock).drain() == 2
        assert {e["data"]["object"]["id"] for e in receiver.processed.values()} == {av.id}
    finally:
        s.drop_all()


def test_failed_attempts_are_retried_with_the_same_webhook_id(store, receiver, clock):
    account, _ = _endpoint(store, receiver)
    _completed_avatar(store, account.id)
    receiver.plan = [500, 503, 200]
    disp = WebhookDispatcher(store, _options(base_backoff_s=60.0, max_backoff_s=600.0), clock=clock)

    assert disp.run_once() == 1
    [r1] = disp.last_results
    assert r1.outcome == "retry" and r1.status_code == 500 and r1.error.startswith("HTTP 500")
    assert clock() <= r1.next_attempt_at <= clock() + 60.0  # full jitter, capped at base * 2**0
    [d] = store.list_deliveries(account.id)
    assert d.status == "pending" and d.attempts == 1 and d.last_error.startswith("HTTP 500")
    assert disp.run_once() == 0  # not due yet
    clock.advance(60.0)
    assert disp.run_once() == 1
    [r2] = disp.last_results
    assert r2.outcome == "retry" and r2.next_attempt_at <= clock() + 120.0
    clock.advance(120.0)
    assert disp.run_once() == 1 and disp.last_results[0].outcome == "delivered"

    ids = [r["headers"]["webhook-id"] for r in receiver.requests]
    stamps = [int(r["headers"]["webhook-timestamp"]) for r in receiver.requests]
    assert len(ids) == 3 and len(set(ids)) == 1 and stamps == sorted(stamps) and stamps[0] < stamps[2]
    assert all(r["verified"] for r in receiver.requests) and len({r["body"] for r in receiver.requests}) == 1
    assert len(receiver.processed) == 1 and receiver.duplicates == []
    [d] = store.list_deliveries(account.id)
    assert d.status == "delivered" and d.attempts == 3 and d.last_error is None
    assert store.get_endpoint(account.id, d.endpoint_id).consecutive_failures == 0


def test_backoff_is_full_jitter_capped_or_an_explicit_schedule(store, clock):
    import random

    disp = WebhookDispatcher(store, _options(base_backoff_s=2.0, max_backoff_s=30.0), rng=random.Random(7))
    samples = {n: [disp.backoff(n) for _ in range(200)] for n in (1, 2, 3, 10)}
    assert all(0 <= x <= 2.0 for x in samples[1]) and max(samples[1]) > 1.0
    assert all(0 <= x <= 8.0 for x in samples[3]) and max(samples[3]) > 4.0
    assert all(0 <= x <= 30.0 for x in samples[10]) and max(samples[10]) > 20.0
    fixed = WebhookDispatcher(store, _options(), retry_schedule=(5, 300, 1800))
    assert [fixed.backoff(n) for n in (1, 2, 3, 4, 9)] == [5.0, 300.0, 1800.0, 1800.0, 1800.0]


def test_message_fails_for_good_after_max_attempts(store, receiver, clock):
    account, ep = _endpoint(store, receiver)
    _completed_avatar(store, account.id)
    receiver.plan = [500] * 10
    disp = WebhookDispatcher(store, _options(max_attempts=3, base_backoff_s=1.0, max_backoff_s=1.0), clock=clock)
    outcomes = []
    for _ in range(5):
        disp.run_once()
        outcomes += [r.outcome for r in disp.last_results]
        clock.advance(1.0)
    assert outcomes == ["retry", "retry", "failed"]
    [d] = store.list_deliveries(account.id)
    assert d.status == "failed" and d.attempts == 3 and len(receiver.requests) == 3
    assert not store.get_endpoint(account.id, ep.id).disabled  # one failing message ≠ a dead endpoint


def test_410_gone_disables_the_endpoint_at_once(store, receiver, clock):
    account, ep = _endpoint(store, receiver)
    _completed_avatar(store, account.id)
    receiver.plan = [410]
    disp = WebhookDispatcher(store, _options(), clock=clock)
    assert disp.run_once() == 1 and disp.last_results[0].outcome == "disabled"
    endpoint = store.get_endpoint(account.id, ep.id)
    assert endpoint.disabled and "410" in endpoint.disabled_reason
    [d] = store.list_deliveries(account.id)
    assert d.status == "failed" and d.last_error.startswith("HTTP 410")
    _completed_avatar(store, account.id, "another")  # no new messages for a disabled endpoint
    clock.advance(10_000)
    assert disp.run_once() == 0 and len(receiver.requests) == 1


def test_persistently_failing_endpoint_is_disabled(store, receiver, clock):
    account, ep = _endpoint(store, receiver)
    for i in range(3):
        _completed_avatar(store, account.id, f"p{i}")
    receiver.plan = [502] * 10
    disp = WebhookDispatcher(store, _options(disable_after_consecutive_failures=3, concurrency=1,
                                             base_backoff_s=1.0, max_backoff_s=1.0), clock=clock)
    assert disp.run_once() == 3
    assert [r.outcome for r in disp.last_results] == ["retry", "retry", "disabled"]
    endpoint = store.get_endpoint(account.id, ep.id)
    assert endpoint.disabled and "3 consecutive failed deliveries" in endpoint.disabled_reason
    clock.advance(10.0)
    assert disp.run_once() == 0  # the two retries are failed at claim, never sent
    assert {d.status for d in store.list_deliveries(account.id)} == {"failed"}
    assert len(receiver.requests) == 3


def test_redirect_is_not_followed_and_counts_as_failure(store, receiver, clock):
    account, _ = _endpoint(store, receiver)
    _completed_avatar(store, account.id)
    receiver.plan = [(302, {"Location": "/elsewhere"})]
    disp = WebhookDispatcher(store, _options(), clock=clock)
    assert disp.run_once() == 1
    [r] = disp.last_results
    assert r.outcome == "retry" and r.status_code == 302 and "'/elsewhere' not followed" in r.error
    assert [q["path"] for q in receiver.requests] == ["/hook"]  # /elsewhere never requested
    [d] = store.list_deliveries(account.id)
    assert d.status == "pending" and d.attempts == 1 and "302" in d.last_error


def test_refused_destination_is_never_contacted(store, receiver, clock):
    account, _ = _endpoint(store, receiver)  # the store does not vet URLs; the dispatcher does
    _completed_avatar(store, account.id)
    disp = WebhookDispatcher(store, _options(allowlist=()), clock=clock)
    assert disp.run_once() == 1
    [r] = disp.last_results
    assert r.outcome == "retry" and "destination refused" in r.error and "loopback" in r.error
    assert receiver.requests == []


def test_timeout_counts_as_failure(store, receiver, clock):
    account, _ = _endpoint(store, receiver)
    _completed_avatar(store, account.id)
    receiver.plan = ["sleep:1.0"]
    disp = WebhookDispatcher(store, _options(timeout_s=0.2), clock=clock)
    assert disp.run_once() == 1
    [r] = disp.last_results
    assert r.outcome == "retry" and "timed out" in r.error


def test_connects_to_the_vetted_address_with_the_original_host_header(store, receiver, clock):
    # DNS pinning: the name is resolved once, by the check, and the request goes to that address
    # while the receiver still sees its own host name.
    lookups = []

    def resolver(host, port):
        lookups.append((host, port))
        return {"hooks.example": ["127.0.0.1"]}[host]

    account, _ = _endpoint(store, receiver, url=receiver.url(host="hooks.example"))
    _completed_avatar(store, account.id)
    disp = WebhookDispatcher(store, _options(allowlist=("hooks.example",)), clock=clock, resolver=resolver)
    assert disp.run_once() == 1 and disp.last_results[0].outcome == "delivered"
    assert lookups == [("hooks.example", receiver.port)]
    assert receiver.requests[0]["headers"]["host"] == f"hooks.example:{receiver.port}"


def test_ipv6_literal_destination_is_pinned_with_brackets(store, clock):
    try:
        rx = Receiver(clock, host="::1")
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here ({exc})")
    try:
        account, _ = _endpoint(store, rx, url=f"http://[::1]:{rx.port}/hook")
        _completed_avatar(store, account.id)
        disp = WebhookDispatcher(store, _options(allowlist=("::1/128",)), clock=clock)
        assert disp.run_once() == 1 and disp.last_results[0].outcome == "delivered"
        assert rx.requests[0]["headers"]["host"] == f"[::1]:{rx.port}" and len(rx.processed) == 1
    finally:
        rx.close()


def test_malformed_stored_url_fails_the_attempt_instead_of_stalling(store, receiver, clock):
    account, _ = _endpoint(store, receiver, url="http://bad host.example/hook")  # the store only checks the scheme
    _completed_avatar(store, account.id)
    disp = WebhookDispatcher(store, _options(max_attempts=1), clock=clock)
    assert disp.run_once() == 1
    [r] = disp.last_results
    assert r.outcome == "failed" and r.error.startswith("destination refused")
    assert store.list_deliveries(account.id)[0].status == "failed"


def _tls_context(tmp_path: Path, name: str) -> tuple[ssl.SSLContext, str]:
    """A self-signed certificate for `name` (server context, CA file for the client)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_path, key_path)
    return server, str(cert_path)


@pytest.mark.parametrize("cert_name, ok", [("hooks.example", True), ("other.example", False)])
def test_https_pins_the_address_but_verifies_the_certificate_for_the_host_name(tmp_path, clock, cert_name, ok):
    # SNI and certificate verification use the URL's host name although the socket goes to the
    # pinned IP: a certificate for another name is rejected.
    server_ctx, ca_file = _tls_context(tmp_path, cert_name)
    rx = Receiver(clock, ssl_context=server_ctx)
    s = open_store(f"sqlite:///{tmp_path / 'tls.db'}", clock=clock)
    try:
        account, _ = _endpoint(s, rx, url=rx.url(host="hooks.example", scheme="https"))
        _completed_avatar(s, account.id)
        client_ctx = ssl.create_default_context(cafile=ca_file)
        disp = WebhookDispatcher(s, _options(allowlist=("127.0.0.1",), verify=client_ctx), clock=clock,
                                 resolver=lambda host, port: {"hooks.example": ["127.0.0.1"]}[host])
        assert disp.run_once() == 1
        [r] = disp.last_results
        if ok:
            assert r.outcome == "delivered" and len(rx.processed) == 1
            assert rx.requests[0]["headers"]["host"] == f"hooks.example:{rx.port}"
        else:
            assert r.outcome == "retry" and "certificate" in r.error.lower() and rx.requests == []
    finally:
        rx.close()
        s.drop_all()


# ---------------------------------------------------------------------------------------------
# Durability
# ---------------------------------------------------------------------------------------------
class ProcessDied(BaseException):
    """Stands for the dispatcher's process being killed (not an Exception: nothing catches it)."""


class DiesBeforeMarking:
    """The real store, except that the process "dies" right after the receiver answered."""

    def __init__(self, store):
        self._store = store

    def __getattr__(self, name):
        return getattr(self._store, name)

    def mark_delivered(self, *args, **kwargs):
        raise ProcessDied()


def test_service_restart_mid_delivery_loses_nothing_and_receiver_dedupes(store, receiver, clock):
    owner, _ = _endpoint(store, receiver)
    fan = store.create_account(credits=10)
    done = _completed_avatar(store, owner.id, "first")           # avatar.completed
    store.publish_avatar(done.id, owner.id)                      # avatar.published
    store.like(done.id, fan.id)                                  # avatar.liked
    store.add_comment(done.id, fan.id, "great")                  # avatar.commented
    _failed_avatar(store, owner.id)                              # avatar.failed
    messages = store.list_deliveries(owner.id)
    assert sorted(d.event_type for d in messages) == sorted(
        ["avatar.completed", "avatar.published", "avatar.liked", "avatar.commented", "avatar.failed"])

    # Dispatcher B sends one message and is killed before recording that it was delivered.
    dying = WebhookDispatcher(DiesBeforeMarking(store), _options(worker_id="dies", batch_size=1,
                                                                 lease_seconds=30.0), clock=clock)
    with pytest.raises(ProcessDied):
        dying.run_once()
    assert len(receiver.processed) == 1
    # Dispatcher A claims what is due now and is killed before sending anything: only the first
    # event of each avatar is due (an avatar's later events wait for its earlier ones).
    claimed_by_dead = store.claim_deliveries("dead-before-send", 5, lease_seconds=30.0)
    assert len(claimed_by_dead) == 1
    leased = {d.event_type for d in store.list_deliveries(owner.id) if d.lease_token}
    assert leased == {"avatar.completed", "avatar.failed"}

    # After the restart, C finds nothing due until the leases expire (the rest waits in order)…
    fresh = WebhookDispatcher(store, _options(worker_id="after-restart"), clock=clock)
    assert fresh.drain() == 0
    clock.advance(31.0)
    # …then it sends all 5, re-sending B's under the same webhook-id, each avatar's in order.
    assert fresh.drain() == 5
    assert {d.status for d in store.list_deliveries(owner.id)} == {"delivered"}

    ids = [r["headers"]["webhook-id"] for r in receiver.requests]
    assert len(ids) == 6 and len(set(ids)) == 5  # one message was received twice…
    assert len(receiver.duplicates) == 1  # …and the receiver recognised the repeat
    assert sorted(e["type"] for e in receiver.processed.values()) == sorted(
        ["avatar.completed", "avatar.published", "avatar.liked", "avatar.commented", "avatar.failed"])
    assert set(receiver.processed) == {d.id for d in messages}  # every event processed exactly once
    assert all(r["verified"] for r in receiver.requests)


def test_events_of_one_avatar_are_delivered_in_the_order_they_happened(store, receiver, clock):
    """avatar.published waits while the same avatar's avatar.completed is being retried; other
    avatars' events are not held up by it."""
    owner, _ = _endpoint(store, receiver)
    done = _completed_avatar(store, owner.id, "first")       # avatar.completed (oldest message)
    clock.advance(1.0)
    store.publish_avatar(done.id, owner.id)                  # avatar.published
    clock.advance(1.0)
    other = _completed_avatar(store, owner.id, "second")     # another avatar's avatar.completed
    receiver.plan = [500]  # the first request (the oldest message: done's completed) fails
    disp = WebhookDispatcher(store, _options(batch_size=1, concurrency=1, retry_schedule=(10.0,)), clock=clock)
    assert disp.run_once() == 1 and disp.last_results[0].outcome == "retry"
    assert disp.drain() == 1  # only the other avatar's event: done's publication waits
    by_type = {(d.event_type, json.loads(render_body(d))["data"]["avatar"]["id"]): d
               for d in store.list_deliveries(owner.id)}
    assert by_type[("avatar.completed", other.id)].status == "delivered"
    assert by_type[("avatar.published", done.id)].status == "pending"
    assert by_type[("avatar.published", done.id)].attempts == 0
    clock.advance(10.0)
    assert disp.drain() == 2  # the retry, then (only after it was delivered) the publication
    sent = [(json.loads(r["body"])["type"], json.loads(r["body"])["data"]["avatar"]["id"]) for r in receiver.requests]
    assert [t for t, avatar_id in sent if avatar_id == done.id] == [
        "avatar.completed", "avatar.completed", "avatar.published"]
    assert {d.status for d in store.list_deliveries(owner.id)} == {"delivered"}


def test_late_mark_after_lease_expiry_is_ignored(store, receiver, clock):
    # A slow dispatcher whose lease expired must not overwrite the new owner's outcome.
    account, _ = _endpoint(store, receiver)
    _completed_avatar(store, account.id)
    [stale] = store.claim_deliveries("slow", 1, lease_seconds=5.0)
    clock.advance(6.0)
    disp = WebhookDispatcher(store, _options(), clock=clock)
    assert disp.run_once() == 1 and disp.last_results[0].outcome == "delivered"
    assert store.mark_attempt_failed(stale.id, stale.lease_token, "late", next_attempt_at=clock() + 5) is False
    [d] = store.list_deliveries(account.id)
    assert d.status == "delivered" and d.attempts == 1


def test_background_loop_delivers_on_wake_and_stops(tmp_path, receiver):
    s = open_store(f"sqlite:///{tmp_path / 'loop.db'}")  # real clock: the loop runs on its own
    receiver.clock = time.time
    disp = WebhookDispatcher(s, _options(poll_seconds=60.0))
    try:
        account, _ = _endpoint(s, receiver)
        disp.start()
        assert disp.running
        disp.start()  # idempotent
        _completed_avatar(s, account.id)
        disp.wake()
        assert receiver.arrived.wait(20.0), "the woken loop did not deliver"
        for _ in range(200):  # the mark lands just after the receiver answered
            if s.list_deliveries(account.id)[0].status == "delivered":
                break
            time.sleep(0.02)
        assert s.list_deliveries(account.id)[0].status == "delivered"
    finally:
        disp.stop(timeout=10)
        s.drop_all()
    assert not disp.running and len(receiver.processed) == 1
