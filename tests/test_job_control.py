"""Job control for people watching their jobs (issue 23): `POST /v1/avatars/{id}/cancel`, the
queue position (Avatar and event stream), `creditsUsed` on every Avatar, preview frames in the
event stream, `imageUrl` as Percify's other name for `photoUrl`, and the studio/docs pages'
headers. Store-dependent checks run on SQLite and PostgreSQL (`h`)."""
from __future__ import annotations

import json

import pytest

from serve.store import InvalidArgument, InvalidState

from helpers import assert_error
from test_api import FakeEngine, Harness, db, h  # noqa: F401  (fixtures)
from test_photo_intake import FaceEngine, face, server  # noqa: F401  (the loopback photo server)


def _events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if "event" in fields:
            out.append((fields["event"], json.loads(fields["data"])))
    return out


def _submit(h, auth, prompt="a fox", **extra):
    r = h.client.post("/v1/avatars/generate", headers=auth, json={"prompt": prompt, **extra})
    assert r.status_code == 202, r.text
    return r.json()


def test_cancel_queued_refunds_now_and_keeps_the_record(h):
    acct, auth = h.account(credits=100)
    av = _submit(h, auth, batchSize=2)
    assert h.client.get("/v1/account", headers=auth).json()["credits"] == 100 - av["creditsUsed"]
    r = h.client.post(f"/v1/avatars/{av['id']}/cancel", headers=auth)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["status"], body["creditsUsed"], body["cancelRequested"], body["queuePosition"]) == ("cancelled", 0, False, None)
    assert body["error"]["code"] == "cancelled"
    assert h.client.get("/v1/account", headers=auth).json()["credits"] == 100
    assert h.client.get(f"/v1/avatars/{av['id']}", headers=auth).json()["status"] == "cancelled"  # record kept
    kinds = [t["type"] for t in h.client.get("/v1/user/credits/history", headers=auth).json()["transactions"]]
    assert kinds == ["release", "reserve", "grant"]
    assert h.worker.run_once().claimed == 0  # nothing left to run
    assert_error(h.client.post(f"/v1/avatars/{av['id']}/cancel", headers=auth), 409, "invalid_state", "avatarId")


def test_cancel_processing_is_requested_then_finished_by_the_lease_holder(h):
    acct, auth = h.account(credits=100)
    av = _submit(h, auth)
    (job,) = h.store.claim_jobs("w1", limit=1, lease_seconds=30, models=["fake"])
    r = h.client.post(f"/v1/avatars/{av['id']}/cancel", headers=auth)
    assert r.status_code == 202 and r.json()["status"] == "processing" and r.json()["cancelRequested"] is True
    assert h.client.post(f"/v1/avatars/{av['id']}/cancel", headers=auth).status_code == 202  # repeat: harmless
    assert h.client.get("/v1/account", headers=auth).json()["credits"] == 100 - av["creditsUsed"]  # still held
    assert h.store.cancel_requested([av["id"], "av_other"]) == {av["id"]}
    assert h.store.finish_cancelled(av["id"], "not-the-token") is None
    done = h.store.finish_cancelled(av["id"], job.lease_token)
    assert done.status == "cancelled"
    assert h.store.finish_cancelled(av["id"], job.lease_token) is None  # once only: one refund
    assert h.client.get("/v1/account", headers=auth).json()["credits"] == 100
    assert h.store.cancel_requested([av["id"]]) == set()


def test_cancel_authorization_and_ended_jobs(h):
    _, alice = h.account()
    _, bob = h.account()
    av = _submit(h, alice)
    assert_error(h.client.post(f"/v1/avatars/{av['id']}/cancel"), 401, "authentication_required")
    assert_error(h.client.post(f"/v1/avatars/{av['id']}/cancel", headers=bob), 403, "unauthorized_access")
    assert_error(h.client.post("/v1/avatars/av_missing/cancel", headers=alice), 404, "avatar_not_found")
    h.worker.run_once()
    done = h.client.get(f"/v1/avatars/{av['id']}", headers=alice).json()
    assert done["status"] == "completed" and done["creditsUsed"] == done["creditCost"] > 0
    assert_error(h.client.post(f"/v1/avatars/{av['id']}/cancel", headers=alice), 409, "invalid_state", "avatarId")
    with pytest.raises(InvalidState):
        h.store.request_cancel(av["id"], h.store.get_avatar(av["id"]).account_id)


def test_queue_position_counts_the_jobs_queued_before(h):
    _, alice = h.account(credits=100)
    _, bob = h.account(credits=100)
    first, second = _submit(h, alice, "one"), _submit(h, bob, "two")
    third = _submit(h, alice, "three")
    pos = lambda av, auth: h.client.get(f"/v1/avatars/{av['id']}", headers=auth).json()["queuePosition"]  # noqa: E731
    assert (pos(first, alice), pos(second, bob), pos(third, alice)) == (1, 2, 3)
    h.client.post(f"/v1/avatars/{second['id']}/cancel", headers=bob)
    assert (pos(first, alice), pos(third, alice)) == (1, 2)
    h.worker.drain()
    assert pos(first, alice) is None and pos(third, alice) is None  # completed: no position


class _Stream:
    """Reads an event stream incrementally (TestClient streams block until the server writes)."""

    def __init__(self, response):
        self.chunks = response.iter_text()
        self.buf = ""

    def until(self, predicate) -> list[tuple[str, dict]]:
        for chunk in self.chunks:
            self.buf += chunk
            events = _events(self.buf.rsplit("\n\n", 1)[0]) if "\n\n" in self.buf else []
            if predicate(events):
                return events
        return _events(self.buf)


def test_event_stream_carries_the_queue_position(h):
    _, auth = h.account(credits=100)
    _submit(h, auth, "ahead")
    av = _submit(h, auth)
    with h.client.stream("GET", f"/v1/avatars/{av['id']}/events", headers=auth) as r:
        s = _Stream(r)
        events = s.until(lambda ev: len(ev) >= 1)
        assert events[0][0] == "status" and events[0][1]["queuePosition"] == 2
        h.client.post(f"/v1/avatars/{av['id']}/cancel", headers=auth)
        events = s.until(lambda ev: False)
    assert events[-1][0] == "status" and events[-1][1]["status"] == "cancelled"
    assert events[-1][1]["queuePosition"] is None and events[-1][1]["creditsUsed"] == 0


def test_event_stream_sends_each_preview_frame_once(h):
    _, auth = h.account(credits=100)
    av = _submit(h, auth, "previewed")
    (job,) = h.store.claim_jobs("w1", limit=1, lease_seconds=30, models=["fake"])
    frame = {"imageIndex": 0, "step": 2, "dataUrl": "data:image/png;base64,iVBORw0KGgo="}
    assert h.store.set_progress("w1", {job.id: job.lease_token}, 2, 4, previews={job.id: [frame]}) == 1
    shown = h.client.get(f"/v1/avatars/{job.id}", headers=auth).json()
    assert shown["progress"] == {"step": 2, "totalSteps": 4}  # frames stay out of the Avatar object
    with h.client.stream("GET", f"/v1/avatars/{av['id']}/events", headers=auth) as r:
        s = _Stream(r)
        events = s.until(lambda ev: any(k == "preview" for k, _ in ev))
        assert [k for k, _ in events] == ["status", "progress", "preview"]
        assert events[1][1] == {"id": av["id"], "status": "processing", "step": 2, "totalSteps": 4}
        assert events[2][1] == {"id": av["id"], **frame}
        # A new step with the same frame: progress only; then a new frame: one more preview.
        h.store.set_progress("w1", {job.id: job.lease_token}, 3, 4, previews={job.id: [frame]})
        s.until(lambda ev: len(ev) >= 4)
        newer = {**frame, "step": 3}
        h.store.set_progress("w1", {job.id: job.lease_token}, 3, 4, previews={job.id: [newer]})
        s.until(lambda ev: len(ev) >= 6)
        h.store.finish_cancelled(job.id, job.lease_token)
        events = s.until(lambda ev: False)
    kinds = [k for k, _ in events]
    assert kinds == ["status", "progress", "preview", "progress", "progress", "preview", "status"]
    assert events[5][1]["step"] == 3 and events[-1][1]["status"] == "cancelled"


def test_preview_frames_are_bounded(h):
    _, auth = h.account(credits=100)
    _submit(h, auth)
    (job,) = h.store.claim_jobs("w1", limit=1, lease_seconds=30, models=["fake"])
    leases = {job.id: job.lease_token}
    ok = {"imageIndex": 0, "step": 1, "dataUrl": "data:image/png;base64,AAAA"}
    for bad in ([ok] * 5, [{**ok, "dataUrl": "https://example.com/x.png"}],
                [{**ok, "dataUrl": "data:image/png;base64," + "A" * 60_000}], [{**ok, "step": "1"}], "frames"):
        with pytest.raises(InvalidArgument):
            h.store.set_progress("w1", leases, 1, 4, previews={job.id: bad})


def test_image_url_is_photo_url_under_percify_s_name(tmp_path, server):  # noqa: F811
    base, _ = server
    h = Harness(tmp_path, engine=FaceEngine(), photo_fetch_allowlist=["127.0.0.1"])
    _, auth = h.account(credits=100)
    r = h.client.post("/v1/avatars/percify-yourself", headers=auth,
                      json={"prompt": "me as a knight", "imageUrl": f"{base}/face.png"})
    assert r.status_code == 202, r.text
    assert len(h.store.get_avatar(r.json()["id"]).params["photos"]) == 1
    assert_error(h.client.post("/v1/avatars/percify-yourself", headers=auth,
                               json={"imageUrl": f"{base}/face.png", "photoUrl": f"{base}/face.png"}),
                 400, "invalid_request", "imageUrl")
    guarded = Harness(tmp_path / "b", engine=FaceEngine())  # loopback not allowed: the same guard refuses it
    _, auth2 = guarded.account(credits=100)
    err = assert_error(guarded.client.post("/v1/avatars/percify-yourself", headers=auth2,
                                           json={"imageUrl": f"{base}/face.png"}), 400, "invalid_request", "photoUrl")
    assert "loopback" in err["message"]
    assert guarded.client.get("/v1/account", headers=auth2).json()["credits"] == 100


def test_studio_and_docs_pages_are_served_offline(tmp_path):
    h = Harness(tmp_path)
    page = h.client.get("/studio")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "'unsafe-inline'" not in csp and "frame-ancestors 'none'" in csp
    for asset in ("/studio/static/studio.css", "/studio/static/js/main.js", "/studio/static/js/api.js"):
        r = h.client.get(asset)
        assert r.status_code == 200 and r.headers["content-security-policy"] == csp, asset
    assert h.client.get("/studio/static/missing.js").status_code == 404
    docs = h.client.get("/v1/docs")
    assert docs.status_code == 200 and "https://" not in docs.text and "/v1/docs/assets/swagger-ui-bundle.js" in docs.text
    assert h.client.get("/v1/docs/assets/swagger-ui-bundle.js").status_code == 200
    assert h.client.get("/v1/docs/assets/swagger-ui.css").status_code == 200
    assert "content-security-policy" not in h.client.get("/v1/health").headers  # the API itself is unchanged
