"""The service's rules against the real Ray Serve app, on SQLite and then on PostgreSQL.

One Ray session for the module. The app is started the way `avatar-serve run` starts it
(`serve.deployments.run_config` on `serve/config/serve_local.yaml`), with two ingress replicas so
every limit is enforced through shared state and not one process's memory, then redeployed on
the other database. Traffic is real HTTP on 127.0.0.1 from threads (parallel clients).
Accounts are made the operator's way (the store, as `avatar-serve create-key` does).

Settings for the run are explicit: free tier at its default 10 req/min and 1 concurrent job, a
roomy tier for the credit burst, a per-model cost override, webhooks allowed to 127.0.0.1 only
(allowlist, not allow-all), short webhook backoff and leases.
"""
from __future__ import annotations

import base64
import http.server
import io
import json
import select
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pg_support
import pytest

from helpers import assert_error, make_account, ray_serve_session, wait_for_jobs

pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

httpx = pytest.importorskip("httpx")
from PIL import Image  # noqa: E402

APP = "avatar"
WAIT_S = 180  # upper bound for anything to settle on a busy 2-core box; never asserted
COST = 3  # per-image cost of tiny-sd15 in this run (model_costs override; the profile says 1)
FAST = {"steps": 2}  # generation parameters that keep jobs short
SLOW = {"steps": 150}  # keeps a job in flight while a burst of submits races it


@pytest.fixture(scope="module")
def ray_serve():
    """One Ray + Serve for the whole module, HTTP on 127.0.0.1."""
    with ray_serve_session() as port:
        yield port


class Service:
    """The running app plus the operator's view of its database."""

    def __init__(self, port: int, store, backend: str):
        self.base = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.base, timeout=60,
                                   limits=httpx.Limits(max_connections=100, max_keepalive_connections=100))
        self.store = store
        self.backend = backend

    def account(self, tier: str = "enterprise", credits: int = 1000):
        return make_account(self.store, tier, credits)

    def wait(self, auth, ids, until=("completed", "failed", "cancelled")) -> dict:
        return wait_for_jobs(self.client, auth, ids, WAIT_S, until, poll_s=0.2)

    def parallel(self, calls) -> list:
        """Run `calls` (zero-argument functions) at the same moment from separate threads."""
        barrier = threading.Barrier(len(calls))

        def run(fn):
            barrier.wait()
            return fn()

        with ThreadPoolExecutor(len(calls)) as pool:
            return list(pool.map(run, calls))

    def healthy(self) -> None:
        """Wait until the app answers again (after a replica was killed)."""
        from ray import serve

        deadline = time.monotonic() + WAIT_S
        streak = 0
        while time.monotonic() < deadline:
            try:
                ok = self.client.get("/v1/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                ok = False
            status = serve.status().applications.get(APP)
            streak = streak + 1 if ok and status is not None and status.status == "RUNNING" else 0
            if streak >= 3:
                return
            time.sleep(0.3)
        pytest.fail("the service did not come back")


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def svc(request, ray_serve, tmp_path_factory):
    from ray import serve

    from serve.app import event_renderer
    from serve.deployments import default_config_path, load_config, run_config
    from serve.store import open_store

    data = tmp_path_factory.mktemp(f"rules-{request.param}")
    if request.param == "postgresql":
        pg_support.require_postgres()
        db_url = pg_support.fresh_url("e2e")
    else:
        db_url = f"sqlite:///{data}/avatar.db"
    config = load_config(default_config_path("serve_local.yaml"))
    for dep in config["applications"][0]["deployments"]:
        if dep["name"] == "AvatarIngress":
            dep["num_replicas"] = 2  # limits must hold across replicas
    overrides = {
        "data_dir": str(data), "db_url": db_url, "models": ["tiny-sd15"], "device": "cpu",
        "lease_seconds": 3.0, "poll_seconds": 0.2, "max_batch": 4,
        "tiers": {"free": {"requests_per_minute": 10, "concurrent_jobs": 1},
                  "pro": {"requests_per_minute": 60, "concurrent_jobs": 5},
                  "enterprise": {"requests_per_minute": 2000, "concurrent_jobs": 100}},
        "model_costs": {"tiny-sd15": COST},
        "webhook_allowlist": ["127.0.0.1"], "webhook_base_backoff_s": 0.2, "webhook_max_backoff_s": 0.5,
        "webhook_lease_seconds": 3.0, "webhook_poll_seconds": 0.2, "webhook_timeout_s": 10.0,
        # These tests need jobs that fail in the worker (refunds, avatar.failed): a photo without a
        # face does, once the ingress does not refuse it at submit (tests/test_photo_intake.py does).
        "face_check_at_submit": False,
    }
    run_config(config, overrides)
    store = open_store(db_url, event_renderer=event_renderer())
    service = Service(ray_serve, store, request.param)
    try:
        yield service
    finally:
        service.client.close()
        # Bounded: a replica wedged by a failed test must not hang the run (ray.shutdown at
        # the end of the module removes whatever is left).
        deleting = threading.Thread(target=serve.delete, args=(APP,), daemon=True)
        deleting.start()
        deleting.join(120)
        store.close()
        if request.param == "postgresql":
            pg_support.drop_schemas([db_url])


def no_face_png() -> str:
    """A valid photo without a face: with `face_check_at_submit` off, percify accepts it and the
    engine then fails the job."""
    buf = io.BytesIO()
    Image.new("RGB", (160, 160), (128, 128, 128)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# ------------------------------------------------------------------------------------------
# Tiers
# ------------------------------------------------------------------------------------------
def test_eleventh_request_in_a_minute_on_free_is_429_with_retry_after(svc):
    # Sliding window: the count holds across a fixed-window boundary, so no need to dodge one.
    _, auth = svc.account(tier="free")
    seen = []
    for i in range(10):
        r = svc.client.get("/v1/account", headers=auth)
        assert r.status_code == 200, r.text
        assert r.headers["ratelimit-policy"] == '"minute";q=10;w=60'
        seen.append(int(r.headers["ratelimit"].split(";")[1].removeprefix("r=")))
    assert seen == list(range(9, -1, -1))
    r = svc.client.post("/v1/avatars/generate", json={"prompt": "one too many", **FAST}, headers=auth)
    err = assert_error(r, 429, "rate_limit_exceeded")
    assert "10 requests per minute" in err["message"]
    assert 1 <= int(r.headers["retry-after"]) <= 66  # sliding window: at most 60 s + 60/limit
    assert r.headers["ratelimit"].startswith('"minute";r=0;')
    assert svc.store.list_avatars(svc.store.authenticate(auth["Authorization"][7:]).id).items == []


def test_concurrency_cap_holds_under_parallel_submits(svc):
    acct, free = svc.account(tier="free", credits=100)
    results = svc.parallel([lambda i=i: svc.client.post(
        "/v1/avatars/generate", json={"prompt": f"race {i}", **SLOW}, headers=free) for i in range(2)])
    assert sorted(r.status_code for r in results) == [202, 429], [r.text for r in results]
    refused = next(r for r in results if r.status_code == 429)
    err = assert_error(refused, 429, "rate_limit_exceeded")
    assert "your tier allows 1;" in err["message"]
    assert int(refused.headers["retry-after"]) >= 1 and "ratelimit" in refused.headers
    assert svc.store.active_jobs(acct.id) == 1

    pro_acct, pro = svc.account(tier="pro", credits=1000)
    burst = svc.parallel([lambda i=i: svc.client.post(
        "/v1/avatars/generate", json={"prompt": f"burst {i}", **SLOW}, headers=pro) for i in range(12)])
    codes = Counter(r.status_code for r in burst)
    assert codes == {202: 5, 429: 7}, codes
    assert svc.store.active_jobs(pro_acct.id) == 5
    # Cancelling (DELETE) frees the slots and releases what was reserved.
    for owner, resp in [(free, r) for r in results] + [(pro, r) for r in burst]:
        if resp.status_code == 202:
            assert svc.client.delete(f"/v1/avatars/{resp.json()['id']}", headers=owner).status_code == 200
    assert svc.store.active_jobs(acct.id) == svc.store.active_jobs(pro_acct.id) == 0
    for a, auth in ((acct, free), (pro_acct, pro)):
        kinds = Counter(e.kind for e in svc.store.ledger(a.id))
        charged = kinds["charge"] * COST  # a job may have finished just before its DELETE
        assert svc.client.get("/v1/account", headers=auth).json()["credits"] == \
            svc.store.ledger_balance(a.id) == a.credits - charged


# ------------------------------------------------------------------------------------------
# Credits
# ------------------------------------------------------------------------------------------
def test_fifty_parallel_submits_against_a_balance_for_ten(svc):
    acct, auth = svc.account(tier="enterprise", credits=10 * COST)
    account = svc.client.get("/v1/account", headers=auth).json()
    assert account["costs"]["generatePerImage"] == {"tiny-sd15": COST} and account["credits"] == 10 * COST
    results = svc.parallel([lambda i=i: svc.client.post(
        "/v1/avatars/generate", json={"prompt": f"credit race {i}", "seed": i, **FAST}, headers=auth)
        for i in range(50)])
    codes = Counter(r.status_code for r in results)
    assert codes == {202: 10, 402: 40}, codes
    for r in results:
        if r.status_code == 402:
            assert_error(r, 402, "insufficient_credits")
            assert "ratelimit" in r.headers
    accepted = [r.json() for r in results if r.status_code == 202]
    assert {a["creditCost"] for a in accepted} == {COST}
    assert svc.client.get("/v1/account", headers=auth).json()["credits"] == 0  # all reserved, none negative
    done = svc.wait(auth, [a["id"] for a in accepted])
    assert {a["status"] for a in done.values()} == {"completed"}
    assert svc.client.get("/v1/account", headers=auth).json()["credits"] == 0
    ledger = svc.store.ledger(acct.id)
    assert Counter(e.kind for e in ledger) == {"grant": 1, "reserve": 10, "charge": 10}
    assert svc.store.ledger_balance(acct.id) == 0
    assert_error(svc.client.post("/v1/avatars/generate", json={"prompt": "one more", **FAST}, headers=auth), 402,
                 "insufficient_credits")


def test_failed_job_releases_its_credits(svc):
    acct, auth = svc.account(tier="pro", credits=10)
    r = svc.client.post("/v1/avatars/percify-yourself", json={"photos": [no_face_png()], "steps": 2}, headers=auth)
    assert r.status_code == 202, r.text
    assert r.json()["creditCost"] == 10
    # (No balance check here: the worker may already have failed the job and released the credits.)
    failed = svc.wait(auth, [r.json()["id"]])[r.json()["id"]]
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_request", failed
    assert "face" in failed["error"]["message"]
    assert svc.client.get("/v1/account", headers=auth).json()["credits"] == 10
    assert [e.kind for e in svc.store.ledger(acct.id)] == ["grant", "reserve", "release"]


# ------------------------------------------------------------------------------------------
# Idempotency
# ------------------------------------------------------------------------------------------
def test_idempotent_replay_mismatch_and_in_flight(svc):
    from serve import schemas as S
    from serve.api.idempotency import request_fingerprint

    acct, auth = svc.account(tier="enterprise", credits=100)
    body = {"prompt": "idempotent portrait", "seed": 9, **FAST}
    hdr = {**auth, "Idempotency-Key": "order-1"}
    first = svc.client.post("/v1/avatars/generate", json=body, headers=hdr)
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    again = svc.client.post("/v1/avatars/generate", json=dict(reversed(body.items())), headers=hdr)
    assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json() and again.headers["location"] == first.headers["location"]
    assert_error(svc.client.post("/v1/avatars/generate", json={**body, "seed": 10}, headers=hdr), 422,
                 "invalid_request", "Idempotency-Key")
    assert len(svc.store.list_avatars(acct.id).items) == 1
    assert svc.store.get_account(acct.id).credits == 100 - COST

    # Scoped per account: the same key and body from another account is its own request.
    other_acct, other = svc.account(tier="enterprise", credits=100)
    mine = svc.client.post("/v1/avatars/generate", json=body, headers={**other, "Idempotency-Key": "order-1"})
    assert mine.status_code == 202 and "idempotent-replayed" not in mine.headers
    assert mine.json()["id"] != first.json()["id"]

    # In flight on another replica: the key is claimed in the shared store and not finished yet.
    canonical = S.GenerateRequest.model_validate(body).model_dump(mode="json", by_alias=True)
    digest = request_fingerprint("POST", "/v1/avatars/generate", canonical)
    assert svc.store.begin_idempotent(acct.id, "order-2", digest).state.value == "new"
    busy = svc.client.post("/v1/avatars/generate", json=body, headers={**auth, "Idempotency-Key": "order-2"})
    assert_error(busy, 409, "idempotency_conflict", "Idempotency-Key")
    assert busy.headers["retry-after"] == "1"
    svc.store.abandon_idempotent(acct.id, "order-2")  # that replica failed before committing
    retry = svc.client.post("/v1/avatars/generate", json=body, headers={**auth, "Idempotency-Key": "order-2"})
    assert retry.status_code == 202 and "idempotent-replayed" not in retry.headers

    # A burst of retries with one key through both ingress replicas creates exactly one job.
    burst = svc.parallel([lambda: svc.client.post("/v1/avatars/generate", json=body,
                                                  headers={**auth, "Idempotency-Key": "order-3"})] * 8)
    assert {r.status_code for r in burst} <= {202, 409}, [r.text for r in burst]
    created = {r.json()["id"] for r in burst if r.status_code == 202}
    assert len(created) == 1
    for r in burst:
        if r.status_code == 409:
            assert_error(r, 409, "idempotency_conflict", "Idempotency-Key")
    fresh = [r for r in burst if r.status_code == 202 and "idempotent-replayed" not in r.headers]
    assert len(fresh) == 1
    assert len(svc.store.list_avatars(acct.id).items) == 3
    assert svc.store.get_account(acct.id).credits == 100 - 3 * COST
    assert svc.store.get_account(other_acct.id).credits == 100 - COST


# ------------------------------------------------------------------------------------------
# Webhook destinations
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata (link-local)
    "http://10.0.0.7/hook",  # private
    "http://127.0.0.2/hook",  # loopback, but only 127.0.0.1 is allowlisted
    "http://[::1]/hook",  # IPv6 loopback
    "http://[::ffff:192.168.1.1]/hook",  # private IPv4 inside IPv6
    "file:///etc/passwd",
])
def test_ssrf_destination_is_refused(svc, url):
    acct, auth = svc.account(tier="enterprise")
    assert_error(svc.client.post("/v1/webhooks", json={"url": url}, headers=auth), 400, "invalid_request", "url")
    assert svc.store.list_endpoints(acct.id) == []


# ------------------------------------------------------------------------------------------
# Community
# ------------------------------------------------------------------------------------------
def _completed_public(svc, auth, prompt="community piece") -> dict:
    r = svc.client.post("/v1/avatars/generate", json={"prompt": prompt, "seed": 1, **FAST}, headers=auth)
    assert r.status_code == 202, r.text
    svc.wait(auth, [r.json()["id"]])
    pub = svc.client.post(f"/v1/avatars/{r.json()['id']}/publish", headers=auth)
    assert pub.status_code == 200, pub.text
    return pub.json()


def test_likes_from_twenty_parallel_clients_are_counted_exactly(svc):
    owner_acct, owner = svc.account()
    av = _completed_public(svc, owner)
    fans = [svc.account(tier="free")[1] for _ in range(20)]
    path = f"/v1/avatars/{av['id']}/like"
    # Every fan likes twice at the same moment: 40 requests, 20 likes.
    results = svc.parallel([lambda f=f: svc.client.post(path, headers=f) for f in fans + fans])
    assert {r.status_code for r in results} == {200}, [r.text for r in results if r.status_code != 200]
    assert all(r.json()["liked"] for r in results)
    assert svc.client.get(f"/v1/avatars/{av['id']}", headers=owner).json()["likes"] == 20
    results = svc.parallel([lambda f=f: svc.client.delete(path, headers=f) for f in fans[:10]])
    assert {r.status_code for r in results} == {200}
    got = svc.client.get(f"/v1/avatars/{av['id']}", headers=fans[0]).json()
    assert got["likes"] == 10
    feed = svc.client.get("/v1/feed", params={"sort": "mostLiked", "limit": 100}, headers=fans[0]).json()["avatars"]
    assert next(a["likes"] for a in feed if a["id"] == av["id"]) == 10


def test_remix_lineage(svc):
    _, alice = svc.account()
    _, bob = svc.account()
    _, carol = svc.account()
    src = _completed_public(svc, alice, "a lighthouse at dusk")
    private = svc.client.post("/v1/avatars/generate", json={"prompt": "secret", **FAST}, headers=alice).json()
    svc.wait(alice, [private["id"]])
    assert_error(svc.client.post(f"/v1/avatars/{private['id']}/remix", json={}, headers=bob), 403,
                 "unauthorized_access")
    rx = svc.client.post(f"/v1/avatars/{src['id']}/remix", headers=bob, json={
        "prompt": "a lighthouse in a storm", "strength": 0.5, "seed": 3, "steps": 4, "batchSize": 2})
    assert rx.status_code == 202, rx.text
    rx = rx.json()
    assert (rx["kind"], rx["remixedFrom"], rx["strength"], rx["seed"], rx["creditCost"]) == (
        "remix", src["id"], 0.5, 3, 2 * COST)
    rx = svc.wait(bob, [rx["id"]])[rx["id"]]
    assert rx["status"] == "completed" and [i["seed"] for i in rx["images"]] == [3, 4]
    png = svc.client.get(rx["images"][1]["url"], headers=bob)
    assert Image.open(io.BytesIO(png.content)).size == (rx["width"], rx["height"]) == (src["width"], src["height"])
    pub = svc.client.post(f"/v1/avatars/{rx['id']}/publish", headers=bob).json()
    rx2 = svc.client.post(f"/v1/avatars/{pub['id']}/remix", json={"strength": 0.8, **FAST}, headers=carol).json()
    assert rx2["remixedFrom"] == rx["id"] and rx2["prompt"] == "a lighthouse in a storm"
    svc.wait(carol, [rx2["id"]])
    counts = {i: svc.client.get(f"/v1/avatars/{i}", headers=carol).json()["remixes"]
              for i in (src["id"], rx["id"], rx2["id"])}
    assert counts == {src["id"]: 1, rx["id"]: 1, rx2["id"]: 0}


# ------------------------------------------------------------------------------------------
# Webhooks: every event exactly once across a restart mid-delivery (last: it restarts replicas)
# ------------------------------------------------------------------------------------------
class Receiver:
    """A webhook endpoint on 127.0.0.1: verifies every signature, answers 500 to the first
    `fail_first` tries of each message, de-duplicates by webhook-id, and holds the first message
    it accepts without answering until the sender's connection drops (`sender_gone`), so the
    service is provably killed while that delivery is in flight."""

    def __init__(self, fail_first: int = 2):
        self.secret: str | None = None
        self.fail_first = fail_first
        self.attempts: Counter = Counter()
        self.unique: dict[str, dict] = {}  # webhook-id -> body, first accepted copy
        self.bad: list[str] = []
        self.lock = threading.Lock()
        self.hold = True
        self.holding = threading.Event()
        self.sender_gone = threading.Event()
        self.release = threading.Event()
        self.held_id: str | None = None
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.handle(self, body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/avatar"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def handle(self, req, body: bytes) -> None:
        from serve.webhooks import SignatureError, verify_signature

        try:
            msg_id = verify_signature(self.secret or "", dict(req.headers), body)
        except (SignatureError, ValueError) as exc:
            with self.lock:
                self.bad.append(str(exc))
            return self._answer(req, 400)
        with self.lock:
            self.attempts[msg_id] += 1
            if self.attempts[msg_id] <= self.fail_first:
                return self._answer(req, 500)
            first = msg_id not in self.unique
            if first:
                self.unique[msg_id] = json.loads(body)
            hold = first and self.hold and self.held_id is None
            if hold:
                self.held_id = msg_id
        if hold:
            self.holding.set()
            self._wait_for_hangup(req.connection)
        self._answer(req, 204)

    def _wait_for_hangup(self, conn) -> None:
        deadline = time.monotonic() + WAIT_S
        while not self.release.is_set() and time.monotonic() < deadline:
            readable, _, _ = select.select([conn], [], [], 0.1)
            if not readable:
                continue
            try:
                data = conn.recv(1, socket.MSG_PEEK)
            except OSError:
                data = b""
            if not data:
                self.sender_gone.set()
                return

    @staticmethod
    def _answer(req, status: int) -> None:
        try:
            req.send_response(status)
            req.send_header("content-length", "0")
            req.end_headers()
        except OSError:
            pass  # the sender died while we held the request

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def _kill_ingress_replicas() -> int:
    """SIGKILL-equivalent for every ingress replica (Serve starts new ones)."""
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{APP}#AvatarIngress#")]
    for a in names:
        ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
    return len(names)


def test_webhooks_arrive_exactly_once_across_a_restart_mid_delivery(svc):
    receiver = Receiver(fail_first=2)
    try:
        owner_acct, owner = svc.account()
        fan_acct, fan = svc.account()
        r = svc.client.post("/v1/webhooks", json={"url": receiver.url, "events": [
            "avatar.completed", "avatar.failed", "avatar.published", "avatar.liked", "avatar.commented"],
            "description": "rules e2e"}, headers=owner)
        assert r.status_code == 201, r.text
        endpoint = r.json()
        receiver.secret = endpoint["secret"]
        assert endpoint["secret"].startswith("whsec_")
        listed = svc.client.get("/v1/webhooks", headers=owner).json()["webhooks"]
        assert [e["id"] for e in listed] == [endpoint["id"]] and listed[0]["secret"] is None

        job = svc.client.post("/v1/avatars/generate", json={"prompt": "hooked", **FAST}, headers=owner).json()
        assert receiver.holding.wait(WAIT_S), "avatar.completed never got past its failing tries"
        # The completed event is being delivered right now: queue a job that will fail, and
        # kill every ingress replica (and with them the webhook dispatchers) mid-delivery.
        bad = svc.client.post("/v1/avatars/percify-yourself", json={"photos": [no_face_png()], "steps": 2},
                              headers=owner).json()
        assert _kill_ingress_replicas() == 2
        assert receiver.sender_gone.wait(WAIT_S), "the delivering replica did not die"
        svc.healthy()

        assert svc.wait(owner, [bad["id"]])[bad["id"]]["status"] == "failed"
        assert svc.client.post(f"/v1/avatars/{job['id']}/publish", headers=owner).status_code == 200
        assert svc.client.post(f"/v1/avatars/{job['id']}/like", headers=fan).json()["likes"] == 1
        comment = svc.client.post(f"/v1/avatars/{job['id']}/comment", json={"text": "signed and sealed"},
                                  headers=fan).json()

        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            outbox = svc.store.list_deliveries(owner_acct.id)
            if len(receiver.unique) >= 5 and outbox and all(d.status == "delivered" for d in outbox):
                break
            time.sleep(0.3)
        assert receiver.bad == []
        outbox = svc.store.list_deliveries(owner_acct.id)
        assert sorted(d.status for d in outbox) == ["delivered"] * 5, [(d.event_type, d.status, d.last_error)
                                                                       for d in outbox]
        assert set(receiver.unique) == {d.id for d in outbox}  # nothing missing, nothing extra
        events = {b["type"]: b for b in receiver.unique.values()}
        assert sorted(events) == ["avatar.commented", "avatar.completed", "avatar.failed", "avatar.liked",
                                  "avatar.published"]
        assert len({b["id"] for b in receiver.unique.values()}) == 5  # five distinct events
        assert events["avatar.completed"]["data"]["object"]["id"] == job["id"]
        assert events["avatar.completed"]["data"]["object"]["status"] == "completed"
        assert events["avatar.failed"]["data"]["object"]["id"] == bad["id"]
        assert events["avatar.failed"]["data"]["object"]["error"]["code"] == "invalid_request"
        assert events["avatar.published"]["data"]["object"]["published"] is True
        assert events["avatar.liked"]["data"]["likedBy"] == fan_acct.id
        assert events["avatar.commented"]["data"]["comment"]["id"] == comment["id"]
        assert events["avatar.commented"]["data"]["comment"]["text"] == "signed and sealed"
        # Each message failed its first two tries; the held one was sent again after the restart.
        assert all(n >= 3 for n in receiver.attempts.values()), receiver.attempts
        assert receiver.attempts[receiver.held_id] >= 4, receiver.attempts
        assert svc.client.get(f"/v1/webhooks/{endpoint['id']}", headers=owner).json()["disabled"] is False
        assert svc.client.delete(f"/v1/webhooks/{endpoint['id']}", headers=owner).json()["deleted"] is True
        assert svc.client.get("/v1/webhooks", headers=owner).json()["webhooks"] == []
    finally:
        receiver.close()
