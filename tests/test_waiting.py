"""Results without polling, through the TestClient on SQLite with the real store and JobWorker:
`Prefer: wait[=N]` on create requests, the `progress` field (throttled worker writes) and the
per-avatar event stream (SSE). Engines are fakes whose steps the test releases, so nothing here
depends on timing except bounded waits for a stuck job."""
from __future__ import annotations

import json
import threading

import pytest
from PIL import Image

from avatar_engine.requests import GenerationResult
from serve.settings import ServiceSettings
from serve.waiting import Waiters, parse_prefer_wait

from helpers import assert_error, png_bytes
from test_api import FakeEngine, Harness

LIMIT_S = 60  # bound for a stuck job on a busy machine, never an assertion on speed


class SteppedEngine(FakeEngine):
    """Reports step 1 of 4, then blocks until `release` is set (or `gate` returns), then 4 of 4."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()
        self.started = threading.Event()
        self.gate = None

    def generate(self, requests, progress=None):
        self.started.set()
        if progress:
            progress(1, 4)
        assert self.release.wait(LIMIT_S), "the test never released the engine"
        if progress:
            progress(4, 4)
        out = []
        for r in requests:
            r = r.resolve(self.profiles["fake"])
            out.append(GenerationResult(request=r, images=[Image.new("RGB", (r.width, r.height), (9, 9, 9))
                                                           for _ in r.image_seeds()],
                                        seeds=r.image_seeds(), timings={"total": 0.01}))
        return out


@pytest.fixture
def running(tmp_path):
    """A harness whose worker loop runs in the background (as in a deployment)."""
    made = []

    def make(engine=None, **overrides):
        h = Harness(tmp_path / f"h{len(made)}", engine=engine, poll_seconds=0.05, progress_interval_s=0.0,
                    wait_poll_min_s=0.02, wait_poll_max_s=0.1, **overrides)
        h.worker.start()
        made.append(h)
        return h

    yield make
    for h in made:
        if isinstance(h.engine, SteppedEngine):
            h.engine.release.set()
        h.worker.stop(timeout=10)


def test_parse_prefer_wait():
    assert parse_prefer_wait(None, 60) is None
    assert parse_prefer_wait("wait", 60) == 60
    assert parse_prefer_wait("wait=5", 60) == 5
    assert parse_prefer_wait("respond-async, wait=90", 60) == 60  # capped
    assert parse_prefer_wait("return=minimal", 60) is None
    assert parse_prefer_wait("wait=soon", 60) is None  # malformed preferences are ignored (RFC 7240)
    assert parse_prefer_wait('wait="7"; foo', 60) == 7


def test_waiters_bound_per_account_and_per_process():
    w = Waiters(ServiceSettings.from_dict({"max_waiters": 3}, env=False))
    assert w.try_acquire("a", 2) and w.try_acquire("a", 2)
    assert not w.try_acquire("a", 2)  # the account's tier concurrency
    assert w.try_acquire("b", 5)
    assert not w.try_acquire("c", 5)  # the process-wide cap
    w.release("a")
    assert w.try_acquire("c", 5) and w.active == 3


def test_prefer_wait_returns_the_completed_avatar(running):
    h = running()
    _, alice = h.account()
    r = h.client.post("/v1/avatars/generate", headers={**alice, "Prefer": "wait=30"},
                      json={"prompt": "a fox", "seed": 1, "batchSize": 2})
    assert r.status_code == 201, r.text
    assert r.headers["preference-applied"] == "wait=30"
    av = r.json()
    assert av["status"] == "completed" and len(av["images"]) == 2 and av["progress"] is None
    assert r.headers["location"] == f"/v1/avatars/{av['id']}"
    assert h.client.get(av["images"][0]["url"].replace("http://testserver", "")).status_code == 200
    # Without the header: 202 at once, as before.
    plain = h.client.post("/v1/avatars/generate", headers=alice, json={"prompt": "a fox"})
    assert plain.status_code == 202 and "preference-applied" not in plain.headers


def test_prefer_wait_on_remix_and_idempotent_replay(running):
    h = running()
    _, alice = h.account()
    src = h.client.post("/v1/avatars/generate", headers={**alice, "Prefer": "wait"}, json={"prompt": "a fox"}).json()
    assert src["status"] == "completed"
    key = {"Idempotency-Key": "remix-1"}
    r = h.client.post(f"/v1/avatars/{src['id']}/remix", headers={**alice, **key, "Prefer": "wait=20"}, json={})
    assert r.status_code == 201 and r.json()["status"] == "completed" and r.json()["remixedFrom"] == src["id"]
    again = h.client.post(f"/v1/avatars/{src['id']}/remix", headers={**alice, **key, "Prefer": "wait=20"}, json={})
    assert again.status_code == 201 and again.json()["id"] == r.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"


def test_prefer_wait_times_out_with_202_and_the_current_state(tmp_path):
    h = Harness(tmp_path, wait_poll_min_s=0.05, wait_poll_max_s=0.2)  # no worker running: the job stays queued
    _, alice = h.account()
    r = h.client.post("/v1/avatars/generate", headers={**alice, "Prefer": "wait=1"}, json={"prompt": "a fox"})
    assert r.status_code == 202 and r.headers["preference-applied"] == "wait=1"
    assert r.json()["status"] == "queued"


def test_prefer_wait_over_the_waiter_bound_answers_at_once(tmp_path):
    h = Harness(tmp_path)
    acct, auth = h.account(tier="free")  # concurrency 1: one waiter
    waiters = h.app.state.services.waiters
    assert waiters.try_acquire(acct.id, 1)  # an open stream/wait of this account
    try:
        r = h.client.post("/v1/avatars/generate", headers={**auth, "Prefer": "wait=30"}, json={"prompt": "a fox"})
        assert r.status_code == 202 and "preference-applied" not in r.headers  # not honoured, not held
        av = r.json()["id"]
        assert_error(h.client.get(f"/v1/avatars/{av}/events", headers=auth), 429, "rate_limit_exceeded")
    finally:
        waiters.release(acct.id)
    assert waiters.active == 0


def test_progress_is_persisted_while_processing_and_cleared_after(running):
    engine = SteppedEngine()
    h = running(engine)
    _, alice = h.account()
    av = h.client.post("/v1/avatars/generate", headers=alice, json={"prompt": "a fox"}).json()
    assert av["progress"] is None
    assert engine.started.wait(LIMIT_S)
    seen = None
    for _ in range(int(LIMIT_S / 0.05)):
        seen = h.client.get(f"/v1/avatars/{av['id']}", headers=alice).json()
        if seen["progress"]:
            break
        threading.Event().wait(0.05)
    assert seen["status"] == "processing" and seen["progress"] == {"step": 1, "totalSteps": 4}
    engine.release.set()
    done = h.client.post("/v1/avatars/generate", headers={**alice, "Prefer": "wait=30"}, json={"prompt": "b"}).json()
    assert done["status"] == "completed"
    final = h.client.get(f"/v1/avatars/{av['id']}", headers=alice).json()
    assert final["status"] == "completed" and final["progress"] is None


def _events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if "event" in fields:
            out.append((fields["event"], json.loads(fields["data"])))
    return out


def test_event_stream_shows_status_then_progress_then_completed(running):
    engine = SteppedEngine()
    h = running(engine)
    _, alice = h.account()
    store = h.store
    real_watch = store.watch_rows

    def watch_rows(ids):  # release the engine once the stream has observed step 1 (no timing)
        rows = real_watch(ids)
        if any(p and p.get("step") == 1 for _, p in rows.values()):
            engine.release.set()
        return rows

    store.watch_rows = watch_rows
    av = h.client.post("/v1/avatars/generate", headers=alice, json={"prompt": "a fox"}).json()
    r = h.client.get(f"/v1/avatars/{av['id']}/events", headers=alice)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r.text)
    kinds = [k for k, _ in events]
    assert kinds[0] == "status" and events[0][1]["id"] == av["id"]
    progress = [d for k, d in events if k == "progress"]
    assert progress and progress[0] == {"id": av["id"], "status": "processing", "step": 1, "totalSteps": 4}
    assert kinds.index("progress") < len(kinds) - 1
    last_kind, last = events[-1]
    assert last_kind == "status" and last["status"] == "completed" and last["images"]
    assert h.app.state.services.waiters.active == 0  # the stream's slot was given back


def test_event_stream_authorization_and_terminal_avatars(tmp_path):
    h = Harness(tmp_path)
    _, alice = h.account()
    _, bob = h.account()
    av = h.client.post("/v1/avatars/generate", headers=alice, json={"prompt": "a fox"}).json()
    assert_error(h.client.get(f"/v1/avatars/{av['id']}/events"), 401, "authentication_required")
    assert_error(h.client.get(f"/v1/avatars/{av['id']}/events", headers=bob), 403, "unauthorized_access")
    assert_error(h.client.get("/v1/avatars/av_missing/events", headers=alice), 404, "avatar_not_found")
    h.worker.run_once()
    events = _events(h.client.get(f"/v1/avatars/{av['id']}/events", headers=alice).text)
    assert [k for k, _ in events] == ["status"] and events[0][1]["status"] == "completed"  # ends at once


def test_waiting_holds_no_database_connection(tmp_path):
    """A store with ONE pooled connection: while a `Prefer: wait` request waits, other requests
    still get the connection (the waiter only borrows it for each short poll)."""
    h = Harness(tmp_path, store_kwargs={"pool_size": 1}, wait_poll_min_s=0.05, wait_poll_max_s=0.1)
    _, alice = h.account()
    result = {}

    def wait_request():
        result["r"] = h.client.post("/v1/avatars/generate", headers={**alice, "Prefer": "wait=30"},
                                    json={"prompt": "a fox"})

    t = threading.Thread(target=wait_request)
    t.start()
    try:
        for _ in range(20):  # each needs the single connection several times
            assert h.client.get("/v1/account", headers=alice).status_code == 200
        assert t.is_alive()  # ...all served while the waiter still waits
        h.worker.run_once()
    finally:
        t.join(LIMIT_S)
    assert result["r"].status_code == 201 and result["r"].json()["status"] == "completed"


def test_percify_and_cast_accept_prefer_wait(running):
    h = running()
    _, alice = h.account()
    import base64

    photo = base64.b64encode(png_bytes()).decode()
    r = h.client.post("/v1/avatars/percify-yourself", headers={**alice, "Prefer": "wait=30"}, json={"photos": [photo]})
    assert r.status_code == 201 and r.headers["preference-applied"] == "wait=30", r.text


def test_progress_writes_are_throttled_not_per_step(tmp_path):
    class ManySteps(FakeEngine):
        def generate(self, requests, progress=None):
            for i in range(1, 201):
                progress(i, 200)
            return super().generate(requests, None)

    h = Harness(tmp_path, engine=ManySteps(), progress_interval_s=1.0)
    _, alice = h.account()
    writes = []
    real = h.store.set_progress
    h.store.set_progress = lambda *a, **k: writes.append(a[2]) or real(*a, **k)
    h.client.post("/v1/avatars/generate", headers=alice, json={"prompt": "a fox"})
    assert h.worker.run_once().completed
    assert len(writes) <= 10, writes  # 200 engine steps, a write at most once a second (none if < 1 s)
