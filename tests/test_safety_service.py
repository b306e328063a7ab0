"""Image safety, provenance and photo retention through the real app (FastAPI TestClient, real
store, asset files and JobWorker; the fake engine paints solid images whose red channel is the
image's seed). An injected hook (`safety_checker: test_safety_service:odd_red_is_unsafe`) flags
the images with an odd seed, so one image of a two-image batch (seeds 42, 43) is flagged."""
from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from avatar_engine.provenance import verify_image
from avatar_engine.provenance.watermark import payload_matches

from helpers import assert_error, png_bytes
from test_api import Harness

HOOK = "test_safety_service:odd_red_is_unsafe"


def odd_red_is_unsafe(images):
    """Score 1.0 (unsafe) for an image whose top-left red value is odd, else 0.0."""
    return [1.0 if im.convert("RGB").getpixel((0, 0))[0] % 2 else 0.0 for im in images]


def red_is_unsafe(images):
    """Every image with a red top-left pixel is unsafe (the reference-photo test's photo)."""
    return [im.convert("RGB").getpixel((0, 0)) == (255, 0, 0) for im in images]


@pytest.fixture
def hk(tmp_path):
    harness = Harness(tmp_path, safety_checker=HOOK, provenance_credentials=False, provenance_watermark=False)
    yield harness
    harness.store.close()


def _ledger(h, auth):
    return h.client.get("/v1/user/credits/history", headers=auth).json()["transactions"]


def test_block_drops_the_flagged_image_and_refunds_its_share(hk):
    _, auth = hk.account(credits=100)
    av = hk.client.post("/v1/avatars/generate", json={"prompt": "x", "batchSize": 2, "seed": 42,
                                                      "visibility": "public"}, headers=auth).json()
    assert av["creditCost"] == 4
    assert hk.worker.run_once().completed == [av["id"]]
    got = hk.client.get(f"/v1/avatars/{av['id']}", headers=auth).json()
    assert got["status"] == "completed"
    assert [i["seed"] for i in got["images"]] == [42]
    assert got["images"][0]["safety"] == {"score": 0.0, "label": "safe", "checker": HOOK, "action": "pass"}
    assert hk.client.get("/v1/account", headers=auth).json()["credits"] == 98  # half of 4 back
    assert not hk.assets.exists(f"avatars/{av['id']}/1.png")
    assert got["visibility"] == "public"  # every delivered image passed
    # A retried completion cannot charge or refund twice: the job is no longer processing.
    assert hk.store.complete_job(av["id"], "stale-token", {"images": []}, refund=2) is False
    assert hk.client.get("/v1/account", headers=auth).json()["credits"] == 98


def test_every_image_blocked_fails_the_job_with_a_full_refund(hk):
    _, auth = hk.account(credits=100)
    av = hk.client.post("/v1/avatars/generate", json={"prompt": "x", "seed": 43}, headers=auth).json()
    assert hk.worker.run_once().failed == [av["id"]]
    got = hk.client.get(f"/v1/avatars/{av['id']}", headers=auth).json()
    assert got["status"] == "failed" and got["error"]["code"] == "content_policy_violation"
    assert hk.client.get("/v1/account", headers=auth).json()["credits"] == 100


def test_flag_delivers_and_marks_blur_stores_only_a_blurred_copy(tmp_path):
    for action in ("flag", "blur"):
        h = Harness(tmp_path / action, safety_checker=HOOK, safety_action=action, provenance_credentials=False,
                    provenance_watermark=False)
        _, auth = h.account(credits=100)
        av = h.client.post("/v1/avatars/generate", json={"prompt": "x", "seed": 43, "visibility": "public"},
                           headers=auth).json()
        h.worker.run_once()
        got = h.client.get(f"/v1/avatars/{av['id']}", headers=auth).json()
        assert got["status"] == "completed" and got["images"][0]["safety"]["action"] == action
        assert got["visibility"] == "private"  # made private at completion
        assert h.client.get("/v1/account", headers=auth).json()["credits"] == 98  # charged in full
        # A delivered image did not pass: the avatar cannot be public or published.
        assert_error(h.client.post(f"/v1/avatars/{av['id']}/publish", headers=auth), 409,
                     "content_policy_violation", "avatarId")
        assert_error(h.client.patch(f"/v1/avatars/{av['id']}", json={"visibility": "public"}, headers=auth), 409,
                     "content_policy_violation", "avatarId")
        h.store.close()


def test_a_flagged_reference_photo_is_refused_at_submit_naming_it(tmp_path):
    h = Harness(tmp_path, safety_checker="test_safety_service:red_is_unsafe", face_check_at_submit=False)
    _, auth = h.account(credits=100)
    files = [("photo", ("a.png", png_bytes(), "image/png")),
             ("photo", ("b.png", png_bytes(color=(255, 0, 0)), "image/png"))]
    r = h.client.post("/v1/avatars/percify-yourself", data={"prompt": "me"}, files=files, headers=auth)
    assert_error(r, 400, "content_policy_violation", "photo[1]")
    r = h.client.post("/v1/avatars/percify-yourself", headers=auth, json={"prompt": "me", "photos": [
        base64.b64encode(png_bytes()).decode(), base64.b64encode(png_bytes(color=(255, 0, 0))).decode()]})
    assert_error(r, 400, "content_policy_violation", "photos[1]")
    assert h.client.get("/v1/account", headers=auth).json()["credits"] == 100  # no credit moved
    assert not list((tmp_path / "assets").glob("uploads/*/*"))
    h.store.close()


@pytest.mark.parametrize("retention", ["job", "avatar"])
def test_reference_photos_are_deleted_once_the_job_ends_unless_kept(tmp_path, retention):
    h = Harness(tmp_path, safety_checker="none", face_check_at_submit=False, photo_retention=retention,
                provenance_credentials=False, provenance_watermark=False)
    _, auth = h.account(credits=100)
    r = h.client.post("/v1/avatars/percify-yourself", data={"prompt": "me"}, headers=auth,
                      files=[("photo", ("a.png", png_bytes(), "image/png"))])
    assert r.status_code == 202, r.text
    keys = h.store.get_avatar(r.json()["id"]).params["photos"]
    assert all(h.assets.exists(k) for k in keys)  # while it runs, retries read them
    report = h.worker.run_once()
    assert report.completed + report.failed == [r.json()["id"]]
    assert all(h.assets.exists(k) for k in keys) == (retention == "avatar")
    h.store.close()


def test_stored_png_and_thumbnail_carry_a_valid_manifest_and_the_avatar_watermark(tmp_path):
    h = Harness(tmp_path, safety_checker="none")
    h.engine.profiles["fake"].resolution = 256  # the watermark needs >= 256² pixels
    _, auth = h.account(credits=100)
    av = h.client.post("/v1/avatars/generate", json={"prompt": "a secret prompt", "seed": 5}, headers=auth).json()
    assert h.worker.run_once().completed == [av["id"]]
    png = h.assets.get_bytes(f"avatars/{av['id']}/0.png")
    report = verify_image(png)
    assert report.manifest.state == "valid" and report.watermark == "present"
    assert payload_matches(report.watermark_payload, av["id"])
    assert report.manifest.generation.get("avatarId") == av["id"]
    assert "a secret prompt" not in str(report.manifest.to_json())  # private avatar: no prompt
    assert Image.open(io.BytesIO(png)).size == (256, 256)
    thumb = verify_image(h.assets.get_bytes(f"avatars/{av['id']}/thumbnail.webp"))
    assert thumb.manifest.state == "valid"
    # The endpoint says the same, for the owner.
    prov = h.client.get(f"/v1/avatars/{av['id']}/provenance", headers=auth)
    assert prov.status_code == 200, prov.text
    body = prov.json()
    assert body["avatarId"] == av["id"] and body["trustedSigner"] is False
    assert [(i["file"], i["matches"]) for i in body["images"]] == [("image", True), ("thumbnail", True)]
    assert body["images"][0]["matchedBy"] == ["watermark", "manifest"]
    # One altered pixel byte: verification reports the manifest as tampered.
    pixels = Image.open(io.BytesIO(png)).convert("RGB")
    pixels.putpixel((10, 10), tuple((v + 1) % 256 for v in pixels.getpixel((10, 10))))
    altered = io.BytesIO()
    pixels.save(altered, format="PNG")
    assert verify_image(altered.getvalue()).manifest.state in ("absent", "tampered")
    h.store.close()


def test_provenance_endpoint_follows_the_avatar_visibility(tmp_path):
    h = Harness(tmp_path, safety_checker="none", provenance_watermark=False)
    _, owner = h.account(credits=100)
    _, other = h.account(credits=100)
    av = h.client.post("/v1/avatars/generate", json={"prompt": "x"}, headers=owner).json()
    h.worker.run_once()
    assert_error(h.client.get(f"/v1/avatars/{av['id']}/provenance", headers=other), 403, "unauthorized_access")
    assert_error(h.client.get("/v1/avatars/av_missing/provenance", headers=owner), 404, "avatar_not_found")
    assert h.client.get(f"/v1/avatars/{av['id']}/provenance").status_code == 401
    h.client.post(f"/v1/avatars/{av['id']}/publish", headers=owner)
    got = h.client.get(f"/v1/avatars/{av['id']}/provenance", headers=other)
    assert got.status_code == 200 and got.json()["images"][0]["manifest"]["state"] == "valid"
    h.store.close()
