"""Watching and stopping a running job (issue 23 phase 2): the worker passes the engine's preview
images on as small data: URLs in the progress row (→ SSE `preview` events), each job only its own
images; a cancel request on a processing job stops the engine call at the next step boundary,
ends the job `cancelled` with its credits released once, and its batch-mates still complete."""
from __future__ import annotations

import base64
import io
import json
import threading
import time

from PIL import Image

from serve.store.jobs import MAX_PREVIEW_DATA_URL
from serve.worker.previews import MAX_PREVIEW_SIDE, PreviewFrames, preview_data_url
from test_api import FakeEngine, db  # noqa: F401 - `db`: the SQLite / PostgreSQL harness fixture


def decode(url: str) -> Image.Image:
    head, _, data = url.partition(",")
    assert head == "data:image/jpeg;base64"
    return Image.open(io.BytesIO(base64.b64decode(data)))


class SteppingEngine(FakeEngine):
    """A fake engine whose first call denoises step by step (a few ms each) until its progress
    callback stops it, asking `on_step(step)` what to do at each step; later calls finish at once."""

    def __init__(self, on_step, max_steps: int = 3000):
        super().__init__()
        self.on_step, self.max_steps, self.steps_run = on_step, max_steps, 0

    def generate(self, requests, progress=None, preview=None):
        if len(self.calls) == 0:
            self.calls.append(len(requests))
            for step in range(1, self.max_steps + 1):
                progress(step, self.max_steps)
                self.steps_run = step
                self.on_step(step)
                time.sleep(0.005)
            self.calls.pop()
        return super().generate(requests, progress)


def test_preview_data_url_is_small_and_bounded():
    url = preview_data_url(Image.new("RGB", (768, 512), (200, 10, 10)))
    assert len(url) <= MAX_PREVIEW_DATA_URL
    img = decode(url)
    assert max(img.size) == MAX_PREVIEW_SIDE and img.size == (128, 85)


def test_preview_frames_are_rate_bounded_per_job():
    frames = PreviewFrames(["a", "b"], min_interval_s=0.5)
    red, blue = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")
    frames.offer(0, 0, 5, red)
    frames.offer(1, 1, 5, blue)
    frames.offer(7, 0, 5, red)  # no such request: ignored
    changed, out = frames.frames_due(now=100.0)
    assert changed and set(out) == {"a", "b"}
    assert [(f["imageIndex"], f["step"]) for f in out["a"]] == [(0, 5)]
    assert [(f["imageIndex"], f["step"]) for f in out["b"]] == [(1, 5)]
    frames.offer(0, 0, 10, blue)
    changed, again = frames.frames_due(now=100.2)  # too soon: the step-5 frame is kept, not replaced
    assert not changed and again == out
    changed, later = frames.frames_due(now=100.6)
    assert changed and later["a"][0]["step"] == 10 and later["b"] == out["b"]
    assert decode(later["a"][0]["dataUrl"]).getpixel((3, 3))[2] > 200  # the blue frame now


def test_tiny_engine_previews_reach_the_event_stream_per_job(db, tmp_path, tiny_engine):  # noqa: F811
    """The embedded default's previews: two jobs in one engine call, each stored with its own
    images' frames only, and streamed as `event: preview` while the job runs."""
    h = db.harness(tmp_path, engine=tiny_engine, progress_interval_s=0.05)
    stored: list[dict] = []
    set_progress = h.store.set_progress

    def spy(worker_id, leases, step, total, previews=None):
        stored.append({a: list(f) for a, f in (previews or {}).items()})
        return set_progress(worker_id, leases, step, total, previews=previews)

    h.store.set_progress = spy
    _, auth = h.account()
    one = h.client.post("/v1/avatars/generate", json={"prompt": "a knight", "seed": 1}, headers=auth).json()
    two = h.client.post("/v1/avatars/generate", json={"prompt": "a chef", "seed": 2, "batchSize": 2},
                        headers=auth).json()
    events: list[tuple[str, dict]] = []
    seen_preview = threading.Event()
    original = tiny_engine.generate

    def gated(requests, progress=None, preview=None):
        assert len(requests) == 2  # both jobs in one engine call

        def hold_last_step(done, total):
            if done == total - 1:  # let the stream see a preview before the job completes
                seen_preview.wait(timeout=120)
            progress(done, total)

        return original(requests, progress=hold_last_step, preview=preview)

    def watch():
        with h.client.stream("GET", f"/v1/avatars/{one['id']}/events", headers=auth) as r:
            name = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[6:])))
                    if name == "preview":
                        seen_preview.set()
                    if name == "status" and events[-1][1]["status"] == "completed":
                        return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    tiny_engine.generate = gated
    try:
        report = h.worker.run_once()
    finally:
        del tiny_engine.generate
        seen_preview.set()
    watcher.join(timeout=60)
    assert sorted(report.completed) == sorted([one["id"], two["id"]])
    previews = [d for n, d in events if n == "preview"]
    assert previews and all(p["id"] == one["id"] and p["imageIndex"] == 0 for p in previews)
    assert max(decode(previews[0]["dataUrl"]).size) <= MAX_PREVIEW_SIDE
    assert {p["step"] for p in previews} <= {5, 10, 15, 20}  # preview_every 5 of 20 steps; 20 may race the completion
    written = [w for w in stored if w]
    assert written, "the worker stored no preview frames"
    for w in written:
        assert {f["imageIndex"] for f in w.get(one["id"], [])} <= {0}
        assert {f["imageIndex"] for f in w.get(two["id"], [])} <= {0, 1}
    assert {f["imageIndex"] for f in written[-1][two["id"]]} == {0, 1}


def test_cancel_stops_a_processing_job_refunds_once_and_keeps_its_batch_mates(db, tmp_path):  # noqa: F811
    answers = []

    def on_step(step):
        if step == 3:
            r = h.client.post(f"/v1/avatars/{mine['id']}/cancel", headers=auth)
            answers.append(r.json())
            # Not the owner: refused, and the request changes nothing.
            answers.append(h.client.post(f"/v1/avatars/{theirs['id']}/cancel", headers=auth).status_code)

    engine = SteppingEngine(on_step)
    h = db.harness(tmp_path, engine=engine, progress_interval_s=0.02)
    acct, auth = h.account(credits=20)
    other_acct, other_auth = h.account(credits=20)
    mine = h.client.post("/v1/avatars/generate", json={"prompt": "stop me", "batchSize": 2}, headers=auth).json()
    theirs = h.client.post("/v1/avatars/generate", json={"prompt": "keep me"}, headers=other_auth).json()
    report = h.worker.run_once()
    assert answers[0]["status"] == "processing" and answers[0]["cancelRequested"] is True
    assert answers[1] in (403, 404)
    assert engine.steps_run < engine.max_steps  # stopped at a step boundary, not run to the end
    assert report.cancelled == [mine["id"]] and report.completed == [theirs["id"]]
    got = h.client.get(f"/v1/avatars/{mine['id']}", headers=auth).json()
    assert got["status"] == "cancelled" and got["images"] == []
    assert h.store.get_account(acct.id).credits == 20
    assert [e.kind for e in h.store.ledger(acct.id)].count("release") == 1
    assert h.store.get_account(other_acct.id).credits == 20 - theirs["creditCost"]
    # Asking again after the end is refused, and refunds nothing more.
    assert h.client.post(f"/v1/avatars/{mine['id']}/cancel", headers=auth).status_code == 409
    assert h.store.get_account(acct.id).credits == 20
