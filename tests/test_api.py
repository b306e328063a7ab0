"""HTTP API behaviour through FastAPI's TestClient: real store, real asset files, real JobWorker;
the engine is injected (a small fake that paints solid images, unless the real `tiny-sd15`
engine is asked for) so each route's contract is checked in milliseconds.

Tests whose outcome depends on the store (credits, limits, idempotency, social counters, leases,
webhooks outbox) run on SQLite and on PostgreSQL (`db` / `h` fixtures; PostgreSQL from
AVATAR_TEST_POSTGRES_DSN, one schema per harness, skipped when unreachable unless CI=true).
Pure request-validation checks run on SQLite only (`hs`)."""
from __future__ import annotations

import base64
import json
import io
import logging
import time
from types import SimpleNamespace

import pg_support
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from avatar_engine.errors import RequestValidationError
from avatar_engine.requests import GenerationResult
from avatar_engine.styles import BUILTIN_STYLES
from serve.app import create_app, event_renderer
from serve.assets import AssetStore
from serve.engine_client import LocalEngineClient
from serve.policy import PolicyChecker, normalise
from serve.settings import ServiceSettings, TierLimits
from serve.store import open_store
from serve.worker import JobWorker

from helpers import BACKENDS, FakeClock, assert_error, make_account, png_bytes


class FakeEngine:
    """Implements the engine interface the service uses: profiles, default_model, generate()."""

    def __init__(self, fail_prompts: tuple[str, ...] = ()):
        self.profiles = {"fake": SimpleNamespace(name="fake", credit_cost=2, resolution=64, size_multiple=8,
                                                 steps=4, guidance_scale=5.0, styles=dict(BUILTIN_STYLES))}
        self.default_model = "fake"
        self.calls: list[int] = []
        self.fail_prompts = fail_prompts
        self.before_return = None

    def generate(self, requests, progress=None):
        self.calls.append(len(requests))
        if any(r.prompt in self.fail_prompts for r in requests):
            bad = next(r for r in requests if r.prompt in self.fail_prompts)
            raise RequestValidationError(f"cannot render {bad.prompt!r}", param="prompt")
        out = []
        for r in requests:
            r = r.resolve(self.profiles[r.model or self.default_model])
            seeds = r.image_seeds()
            imgs = [Image.new("RGB", (r.width, r.height), (s % 256, (s // 256) % 256, 128)) for s in seeds]
            out.append(GenerationResult(request=r, images=imgs, seeds=seeds, timings={"total": 0.01}))
        if progress:
            progress(1, 1)
        if self.before_return:
            self.before_return()
        return out


class Harness:
    def __init__(self, tmp_path, engine=None, store_kwargs=None, db_url=None, **overrides):
        base = {"data_dir": str(tmp_path), "lease_seconds": 30.0, **({"db_url": db_url} if db_url else {})}
        self.settings = ServiceSettings.from_dict({**base, **overrides}, env=False)
        tmp_path.mkdir(parents=True, exist_ok=True)
        # As in the deployment: outbox payloads carry the API's avatar object.
        self.store = open_store(self.settings.resolved_db_url,
                                **{"event_renderer": event_renderer(), **(store_kwargs or {})})
        self.engine = engine or FakeEngine()
        self.assets = AssetStore.from_url(self.settings.resolved_assets_url)
        self.worker = JobWorker(self.store, self.engine, self.assets, self.settings,
                                policy=PolicyChecker(self.settings.all_policy_words()))
        self.app = create_app(self.settings, self.store, LocalEngineClient(self.engine, self.worker),
                              assets=self.assets)
        self.client = TestClient(self.app, raise_server_exceptions=False)

    def account(self, tier="pro", credits=100):
        return make_account(self.store, tier, credits)


class Databases:
    """Fresh, isolated databases of one backend for a test; closed and dropped afterwards."""

    def __init__(self, backend: str):
        self.backend = backend
        self.urls: list[str] = []
        self.harnesses: list[Harness] = []

    def url(self) -> str | None:
        """None = the harness's own SQLite file; else a PostgreSQL URL with a new schema."""
        if self.backend == "sqlite":
            return None
        self.urls.append(pg_support.fresh_url("api"))
        return self.urls[-1]

    def harness(self, tmp_path, **kwargs) -> Harness:
        harness = Harness(tmp_path, db_url=self.url(), **kwargs)
        self.harnesses.append(harness)
        return harness

    def close(self) -> None:
        for harness in self.harnesses:
            harness.store.close()
        pg_support.drop_schemas(self.urls)


@pytest.fixture(params=BACKENDS)
def db(request):
    if request.param == "postgresql":
        pg_support.require_postgres()
    dbs = Databases(request.param)
    yield dbs
    dbs.close()


@pytest.fixture
def h(db, tmp_path):
    """A harness on each backend."""
    return db.harness(tmp_path)


@pytest.fixture
def hs(tmp_path):
    """A harness on SQLite only, for checks the store plays no part in."""
    harness = Harness(tmp_path)
    yield harness
    harness.store.close()


# ------------------------------------------------------------------------------------------
# Generate → worker → completed → download
# ------------------------------------------------------------------------------------------
def test_generate_persists_before_responding_then_completes_and_serves_png(h):
    acct, auth = h.account(credits=100)
    r = h.client.post("/v1/avatars/generate", json={"prompt": "portrait of an astronaut", "batchSize": 2,
                                                    "stylePreset": "anime", "seed": 42}, headers=auth)
    assert r.status_code == 202, r.text
    av = r.json()
    assert av["object"] == "avatar" and av["status"] == "queued" and av["kind"] == "generate"
    assert av["seed"] == 42 and av["width"] == 64 and av["height"] == 64 and av["model"] == "fake"
    assert av["creditCost"] == 4 and av["images"] == []
    assert r.headers["location"] == f"/v1/avatars/{av['id']}"
    # Durable before the response: the job is in the database, credits reserved.
    assert h.store.get_avatar(av["id"]).status == "queued"
    assert h.client.get("/v1/account", headers=auth).json()["credits"] == 96

    report = h.worker.run_once()
    assert report.completed == [av["id"]]
    got = h.client.get(f"/v1/avatars/{av['id']}", headers=auth).json()
    assert got["status"] == "completed" and got["completedAt"] and got["error"] is None
    assert [i["seed"] for i in got["images"]] == [42, 43]
    assert got["timings"]["generationMs"] is not None and got["timings"]["queuedMs"] is not None
    img = h.client.get(got["images"][1]["url"], headers=auth)
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    pil = Image.open(io.BytesIO(img.content))
    assert pil.format == "PNG" and pil.size == (64, 64) and pil.getpixel((0, 0))[0] == 43
    thumb = h.client.get(got["thumbnailUrl"], headers=auth)
    assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).format == "WEBP"
    webp = h.client.get(got["images"][0]["url"] + "&format=webp", headers=auth)  # signed link + a format
    assert Image.open(io.BytesIO(webp.content)).format == "WEBP"
    # Charged once: balance stays at the reserved amount, ledger has one charge.
    assert h.client.get("/v1/account", headers=auth).json()["credits"] == 96
    assert [e.kind for e in h.store.ledger(acct.id)].count("charge") == 1


def test_worker_batches_queued_jobs_into_one_engine_call(h):
    _, auth = h.account()
    ids = [h.client.post("/v1/avatars/generate", json={"prompt": f"p{i}"}, headers=auth).json()["id"] for i in range(3)]
    h.worker.run_once()
    assert h.engine.calls == [3]
    assert {h.store.get_avatar(i).status for i in ids} == {"completed"}


def test_failing_request_fails_alone_and_is_refunded(db, tmp_path):
    h = db.harness(tmp_path, engine=FakeEngine(fail_prompts=("boom",)))
    acct, auth = h.account(credits=20)
    good = h.client.post("/v1/avatars/generate", json={"prompt": "fine"}, headers=auth).json()
    bad = h.client.post("/v1/avatars/generate", json={"prompt": "boom"}, headers=auth).json()
    h.worker.run_once()
    assert h.engine.calls == [2, 1, 1]  # batch failed, then isolated
    assert h.store.get_avatar(good["id"]).status == "completed"
    failed = h.client.get(f"/v1/avatars/{bad['id']}", headers=auth).json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_request"
    assert h.store.get_account(acct.id).credits == 18  # only the good job is charged


def test_expired_lease_is_reclaimed_and_completed_once(db, tmp_path):
    clock = FakeClock()
    h = db.harness(tmp_path, store_kwargs={"clock": clock})
    acct, auth = h.account(credits=10)
    av = h.client.post("/v1/avatars/generate", json={"prompt": "x"}, headers=auth).json()
    # A worker claims the job and dies without heartbeating.
    dead = h.store.claim_jobs("dead-worker", limit=1, lease_seconds=20, models=["fake"])
    assert [j.id for j in dead] == [av["id"]]
    clock.advance(19.9)
    assert h.worker.run_once().claimed == 0  # lease still live: not stolen
    clock.advance(0.2)
    assert h.worker.run_once().completed == [av["id"]]
    # The dead worker's late completion is refused; charge happened exactly once.
    assert h.store.complete_job(av["id"], dead[0].lease_token, {"images": []}) is False
    assert [e.kind for e in h.store.ledger(acct.id)].count("charge") == 1
    assert h.store.get_account(acct.id).credits == 8


def test_delete_while_running_cancels_refunds_and_leaves_no_files(h):
    acct, auth = h.account(credits=10)
    av = h.client.post("/v1/avatars/generate", json={"prompt": "x"}, headers=auth).json()

    def delete_mid_generation():
        assert h.store.get_avatar(av["id"]).status == "processing"
        r = h.client.delete(f"/v1/avatars/{av['id']}", headers=auth)
        assert r.status_code == 200 and r.json() == {"id": av["id"], "object": "avatar", "deleted": True,
                                                      "status": "cancelled"}

    h.engine.before_return = delete_mid_generation
    report = h.worker.run_once()
    assert report.dropped == [av["id"]] and report.completed == []
    assert_error(h.client.get(f"/v1/avatars/{av['id']}", headers=auth), 404, "avatar_not_found", "avatarId")
    assert not h.assets.exists(f"avatars/{av['id']}/0.png")
    assert h.store.get_account(acct.id).credits == 10


def test_delete_completed_removes_files(h):
    _, auth = h.account()
    av = h.client.post("/v1/avatars/generate", json={"prompt": "x"}, headers=auth).json()
    h.worker.run_once()
    assert h.assets.exists(f"avatars/{av['id']}/0.png")
    assert h.client.delete(f"/v1/avatars/{av['id']}", headers=auth).json()["status"] == "completed"
    assert not h.assets.exists(f"avatars/{av['id']}/0.png")
    assert not h.assets.exists(f"avatars/{av['id']}/thumbnail.webp")


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "guidanceScale": 25}, "guidanceScale"),
    ({"prompt": "x", "batchSize": 5}, "batchSize"),
    ({"prompt": "x", "aspectRatio": "2:1"}, "aspectRatio"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "stylePreset": "vaporwave"}, "stylePreset"),
    ({"prompt": "x", "model": "nope"}, "model"),
    ({"prompt": "x", "colour": "red"}, "colour"),
    ({"prompt": ""}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x", "tags": ["a", "  "]}, "tags[1]"),
])
def test_invalid_generate_names_the_field(hs, body, param):
    _, auth = hs.account()
    assert_error(hs.client.post("/v1/avatars/generate", json=body, headers=auth), 400, "invalid_request", param)
    assert hs.store.list_avatars(hs.store.authenticate(auth["Authorization"][7:]).id).items == []


def test_bad_json_and_non_object_bodies(hs):
    _, auth = hs.account()
    r = hs.client.post("/v1/avatars/generate", content=b"{not json", headers={**auth, "content-type": "application/json"})
    assert_error(r, 400, "invalid_request")
    r = hs.client.post("/v1/avatars/generate", json=[1, 2], headers=auth)
    assert_error(r, 400, "invalid_request")


def test_auth_errors(h):
    assert_error(h.client.get("/v1/account"), 401, "authentication_required")
    assert_error(h.client.get("/v1/account", headers={"Authorization": "Bearer ak_live_nope"}), 401,
                 "authentication_required")
    assert_error(h.client.get("/v1/account", headers={"Authorization": "Basic abc"}), 401, "authentication_required")
    assert h.client.get("/v1/health").json()["status"] == "ok"


def test_unknown_route_wrong_method_and_oversize(tmp_path):
    h = Harness(tmp_path, max_body_bytes=2000)
    _, auth = h.account()
    assert_error(h.client.get("/v1/nope", headers=auth), 404, "not_found")
    assert_error(h.client.put("/v1/avatars/generate", headers=auth), 405, "method_not_allowed")
    big = {"prompt": "x" * 1500, "description": "y" * 1500}
    assert_error(h.client.post("/v1/avatars/generate", json=big, headers=auth), 413, "request_too_large")


def test_internal_error_is_logged_with_request_id_and_hides_traceback(hs, caplog):
    _, auth = hs.account()

    def broken(_id):
        raise RuntimeError("database on fire")

    hs.store.get_avatar = broken  # instance attribute shadows the method
    with caplog.at_level(logging.ERROR):
        r = hs.client.get("/v1/avatars/av_x", headers=auth)
    err = assert_error(r, 500, "internal_error")
    assert "on fire" not in r.text
    assert r.headers["x-request-id"] == err["requestId"]
    assert any(err["requestId"] in rec.getMessage() for rec in caplog.records)


def test_content_policy_on_prompt_and_metadata(hs):
    _, auth = hs.account()
    for prompt in ("a N4K3D person", "n.a.k.e.d", "Ｎａｋｅｄ statue", "nakéd"):
        assert_error(hs.client.post("/v1/avatars/generate", json={"prompt": prompt}, headers=auth), 400,
                     "content_policy_violation", "prompt")
    assert_error(hs.client.post("/v1/avatars/generate", json={"prompt": "ok", "title": "porn"}, headers=auth), 400,
                 "content_policy_violation", "title")
    # Word boundaries: innocent words containing a listed one pass; negative prompts are not policed.
    assert hs.client.post("/v1/avatars/generate", json={"prompt": "sailor with a sextant in Essex",
                                                       "negativePrompt": "nsfw, nude"}, headers=auth).status_code == 202


def test_policy_normalisation():
    assert normalise("Ｎ４ＫＥＤ") == "naked"
    assert normalise("$ex!") == "sex"
    p = PolicyChecker(["child abuse"])
    assert p.find("child-abuse scene") == "child abuse" and p.find("childish abuser") is None


def test_credits_and_concurrency_limits(db, tmp_path):
    h = db.harness(tmp_path, tiers={"free": {"requests_per_minute": 100, "concurrent_jobs": 1},
                                 "pro": TierLimits(100, 5)})
    _, poor = h.account(tier="pro", credits=3)
    assert_error(h.client.post("/v1/avatars/generate", json={"prompt": "x", "batchSize": 2}, headers=poor), 402,
                 "insufficient_credits")
    _, free = h.account(tier="free", credits=100)
    assert h.client.post("/v1/avatars/generate", json={"prompt": "x"}, headers=free).status_code == 202
    r = h.client.post("/v1/avatars/generate", json={"prompt": "y"}, headers=free)
    assert_error(r, 429, "rate_limit_exceeded")
    assert int(r.headers["retry-after"]) > 0
    h.worker.run_once()
    assert h.client.post("/v1/avatars/generate", json={"prompt": "y"}, headers=free).status_code == 202


def test_rate_limit_headers_and_429(db, tmp_path):
    h = db.harness(tmp_path, store_kwargs={"clock": FakeClock(1_800_000_000.0)},  # a window's start
                   tiers={"free": {"requests_per_minute": 3, "concurrent_jobs": 1}})
    _, auth = h.account(tier="free")
    for i in range(3):
        r = h.client.get("/v1/account", headers=auth)
        assert r.status_code == 200
        assert r.headers["ratelimit-policy"] == '"minute";q=3;w=60'
        assert r.headers["ratelimit"].startswith(f'"minute";r={2 - i};t=')
    r = h.client.get("/v1/account", headers=auth)
    assert_error(r, 429, "rate_limit_exceeded")
    assert int(r.headers["retry-after"]) >= 1 and "ratelimit" in r.headers


# ------------------------------------------------------------------------------------------
# Visibility, PATCH, list
# ------------------------------------------------------------------------------------------
def test_access_control_between_accounts(h):
    _, alice = h.account()
    _, bob = h.account()
    av = h.client.post("/v1/avatars/generate", json={"prompt": "x"}, headers=alice).json()
    h.worker.run_once()
    assert_error(h.client.get(f"/v1/avatars/{av['id']}", headers=bob), 403, "unauthorized_access")
    assert_error(h.client.get(f"/v1/avatars/{av['id']}/images/0", headers=bob), 403, "unauthorized_access")
    assert_error(h.client.patch(f"/v1/avatars/{av['id']}", json={"title": "mine"}, headers=bob), 403,
                 "unauthorized_access")
    assert_error(h.client.delete(f"/v1/avatars/{av['id']}", headers=bob), 403, "unauthorized_access")
    assert_error(h.client.get("/v1/avatars/av_doesnotexist", headers=bob), 404, "avatar_not_found", "avatarId")
    r = h.client.patch(f"/v1/avatars/{av['id']}", json={"visibility": "unlisted"}, headers=alice)
    assert r.json()["visibility"] == "unlisted"
    assert h.client.get(f"/v1/avatars/{av['id']}", headers=bob).status_code == 200
    assert h.client.get(f"/v1/avatars/{av['id']}/images/0", headers=bob).status_code == 200
    assert_error(h.client.patch(f"/v1/avatars/{av['id']}", json={"title": "mine"}, headers=bob), 403,
                 "unauthorized_access")
    assert_error(h.client.get(f"/v1/avatars/{av['id']}/images/7", headers=alice), 404, "not_found", "index")


def test_patch_updates_metadata_only(h):
    _, auth = h.account()
    av = h.client.post("/v1/avatars/generate", json={"prompt": "x"}, headers=auth).json()
    r = h.client.patch(f"/v1/avatars/{av['id']}", headers=auth, json={
        "title": "Hero", "description": "d", "tags": ["a", "b"], "metadata": {"k": [1, 2]}})
    body = r.json()
    assert (body["title"], body["description"], body["tags"]) == ("Hero", "d", ["a", "b"])
    assert body["metadata"] == {"k": [1, 2], "modelVersion": "fake"}  # the user's keys + the profile that ran it
    assert_error(h.client.patch(f"/v1/avatars/{av['id']}", json={"prompt": "y"}, headers=auth), 400,
                 "invalid_request", "prompt")
    assert_error(h.client.patch(f"/v1/avatars/{av['id']}", json={"visibility": "secret"}, headers=auth), 400,
                 "invalid_request", "visibility")
    assert h.client.get(f"/v1/avatars/{av['id']}", headers=auth).json()["title"] == "Hero"


def test_list_pagination_filters_and_query_validation(h):
    _, auth = h.account()
    _, other = h.account()
    ids = [h.client.post("/v1/avatars/generate", json={"prompt": f"cat {i}"}, headers=auth).json()["id"]
           for i in range(5)]
    h.client.post("/v1/avatars/generate", json={"prompt": "other"}, headers=other)
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = h.client.get("/v1/avatars", params=params, headers=auth).json()
        assert page["object"] == "list" and len(page["avatars"]) <= 2
        seen += [a["id"] for a in page["avatars"]]
        if not page["hasMore"]:
            break
        cursor = page["nextCursor"]
    assert sorted(seen) == sorted(ids) and len(seen) == 5
    assert seen == list(reversed(ids))  # newest first by default
    h.worker.run_once()
    h.client.patch(f"/v1/avatars/{ids[0]}", json={"visibility": "public"}, headers=auth)
    got = h.client.get("/v1/avatars", params={"visibility": "public"}, headers=auth).json()["avatars"]
    assert [a["id"] for a in got] == [ids[0]]
    got = h.client.get("/v1/avatars", params={"search": "CAT 3"}, headers=auth).json()["avatars"]
    assert [a["id"] for a in got] == [ids[3]]
    asc = h.client.get("/v1/avatars", params={"sortOrder": "asc", "status": "completed"}, headers=auth).json()["avatars"]
    assert [a["id"] for a in asc] == ids
    assert_error(h.client.get("/v1/avatars", params={"limit": 0}, headers=auth), 400, "invalid_request", "limit")
    assert_error(h.client.get("/v1/avatars", params={"limit": 101}, headers=auth), 400, "invalid_request", "limit")
    assert_error(h.client.get("/v1/avatars", params={"sortBy": "prompt"}, headers=auth), 400, "invalid_request", "sortBy")
    assert_error(h.client.get("/v1/avatars", params={"cursor": "garbage"}, headers=auth), 400, "invalid_request", "cursor")


# ------------------------------------------------------------------------------------------
# Percify-yourself and cast (ingress side: parsing, validation, stored references)
# ------------------------------------------------------------------------------------------
def test_percify_multipart_and_json_store_photos_as_assets(hs):
    _, auth = hs.account()
    files = [("photo", ("a.png", png_bytes(), "image/png")), ("photo", ("b.png", png_bytes(color=(1, 2, 3)), "image/png"))]
    r = hs.client.post("/v1/avatars/percify-yourself", data={"prompt": "me as a knight", "stylePreset": "fantasy",
                                                            "identityStrength": "0.8", "seed": "7"},
                      files=files, headers=auth)
    assert r.status_code == 202, r.text
    av = r.json()
    assert av["kind"] == "percify" and av["creditCost"] == 10 and av["seed"] == 7
    params = hs.store.get_avatar(av["id"]).params
    assert len(params["photos"]) == 2 and params["identityStrength"] == 0.8
    assert all(hs.assets.exists(k) for k in params["photos"])
    r = hs.client.post("/v1/avatars/percify-yourself", headers=auth,
                      json={"photos": ["data:image/png;base64," + base64.b64encode(png_bytes()).decode()]})
    assert r.status_code == 202, r.text
    # Deleting removes the uploaded photos too.
    hs.client.delete(f"/v1/avatars/{av['id']}", headers=auth)
    assert not any(hs.assets.exists(k) for k in params["photos"])


def test_percify_rejects_bad_photos(hs):
    _, auth = hs.account()
    bad = hs.client.post("/v1/avatars/percify-yourself", files=[("photo", ("x.png", b"not an image", "image/png"))],
                        headers=auth)
    assert_error(bad, 400, "invalid_request", "photo[0]")
    too_many = [("photo", (f"{i}.png", png_bytes(), "image/png")) for i in range(6)]
    assert_error(hs.client.post("/v1/avatars/percify-yourself", files=too_many, headers=auth), 400, "invalid_request",
                 "photos")
    assert_error(hs.client.post("/v1/avatars/percify-yourself", json={"photos": ["%%%"]}, headers=auth), 400,
                 "invalid_request", "photos[0]")
    assert_error(hs.client.post("/v1/avatars/percify-yourself", json={"photos": ["https://example.com/me.jpg"]},
                               headers=auth), 400, "invalid_request", "photos[0]")
    assert_error(hs.client.post("/v1/avatars/percify-yourself", json={"prompt": "x"}, headers=auth), 400,
                 "invalid_request", "photos")
    assert_error(hs.client.post("/v1/avatars/percify-yourself", content=b"x", headers={**auth, "content-type": "text/plain"}),
                 415, "invalid_request")
    assert hs.store.list_avatars(hs.store.authenticate(auth["Authorization"][7:]).id).items == []


def test_photos_of_two_people_are_refused_at_submit(hs):
    """The engine's one-person check runs in the ingress's validation: a 400 naming the photo,
    no job, no charge."""
    import os

    import numpy as np
    from skimage import data as skdata

    from face_support import require_dlib

    require_dlib()
    insightface = pytest.importorskip("insightface")
    _, auth = hs.account()
    me = Image.fromarray(np.asarray(skdata.astronaut()))
    group = Image.open(os.path.join(os.path.dirname(insightface.__file__), "data", "images", "t1.jpg")).convert("RGB")
    other = group.crop((850, 0, 1070, 260))
    files = [("photo", (f"{i}.jpg", _photo_bytes(img), "image/jpeg")) for i, img in enumerate([me, other])]
    r = hs.client.post("/v1/avatars/percify-yourself", files=files, data={"prompt": "me"}, headers=auth)
    assert_error(r, 400, "invalid_request", "photo[1]")  # named as the request gave it (the second `photo` part)
    assert "does not show the same person" in r.json()["error"]["message"]
    same = [("photo", (f"{i}.jpg", _photo_bytes(img), "image/jpeg")) for i, img in enumerate([me, me.resize((300, 300))])]
    assert hs.client.post("/v1/avatars/percify-yourself", files=same, data={"prompt": "me"}, headers=auth).status_code == 202
    b64 = [base64.b64encode(_photo_bytes(img)).decode() for img in (me, other)]
    r = hs.client.post("/v1/avatars/cast", headers=auth, json={"prompt": "friends", "characters": [
        {"prompt": "a"}, {"prompt": "b", "photos": b64}]})
    assert_error(r, 400, "invalid_request", "characters[1].photos[1]")


def test_cast_with_photos_and_own_avatar(hs):
    _, alice = hs.account()
    _, bob = hs.account()
    mine = hs.client.post("/v1/avatars/generate", json={"prompt": "hero"}, headers=alice).json()
    theirs = hs.client.post("/v1/avatars/generate", json={"prompt": "villain"}, headers=bob).json()
    hs.worker.run_once()
    b64 = base64.b64encode(png_bytes()).decode()
    body = {"prompt": "two friends at the beach", "characters": [
        {"prompt": "a knight", "photos": [b64]}, {"prompt": "a wizard", "avatarId": mine["id"]}]}
    r = hs.client.post("/v1/avatars/cast", json=body, headers=alice)
    assert r.status_code == 202, r.text
    av = r.json()
    assert av["kind"] == "cast" and av["creditCost"] == 30
    assert [c["avatarId"] for c in av["characters"]] == [None, mine["id"]]
    chars = hs.store.get_avatar(av["id"]).params["characters"]
    assert all(hs.assets.exists(k) for c in chars for k in c["photos"]) and len(chars[1]["photos"]) == 1
    assert_error(hs.client.post("/v1/avatars/cast", json={"prompt": "x", "characters": [{"prompt": "solo"}]},
                               headers=alice), 400, "invalid_request", "characters")
    foreign = {"prompt": "x", "characters": [{"prompt": "a"}, {"prompt": "b", "avatarId": theirs["id"]}]}
    assert_error(hs.client.post("/v1/avatars/cast", json=foreign, headers=alice), 403, "unauthorized_access")
    bad_prompt = {"prompt": "x", "characters": [{"prompt": "a"}, {"prompt": "a naked b"}]}
    assert_error(hs.client.post("/v1/avatars/cast", json=bad_prompt, headers=alice), 400, "content_policy_violation",
                 "characters[1].prompt")
    # Multipart: characters as JSON text, photos per character index.
    r = hs.client.post("/v1/avatars/cast", headers=alice,
                      data={"prompt": "duo", "characters": '[{"prompt": "a"}, {"prompt": "b"}]'},
                      files=[("photo1", ("p.png", png_bytes(), "image/png"))])
    assert r.status_code == 202, r.text
    assert len(hs.store.get_avatar(r.json()["id"]).params["characters"][1]["photos"]) == 1


# ------------------------------------------------------------------------------------------
# Idempotency, social, webhooks
# ------------------------------------------------------------------------------------------
def test_idempotency_key_replays_and_rejects_other_body(h):
    acct, auth = h.account(credits=100)
    hdr = {**auth, "Idempotency-Key": "k-1"}
    first = h.client.post("/v1/avatars/generate", json={"prompt": "x", "seed": 1}, headers=hdr)
    again = h.client.post("/v1/avatars/generate", json={"seed": 1, "prompt": "x"}, headers=hdr)
    assert first.status_code == again.status_code == 202
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert again.json()["id"] == first.json()["id"]
    assert len(h.store.list_avatars(acct.id).items) == 1 and h.store.get_account(acct.id).credits == 98
    other = h.client.post("/v1/avatars/generate", json={"prompt": "y"}, headers=hdr)
    assert_error(other, 422, "invalid_request", "Idempotency-Key")


def test_publish_like_comment_feed_remix(h):
    _, alice = h.account()
    _, bob = h.account()
    av = h.client.post("/v1/avatars/generate", json={"prompt": "dragon"}, headers=alice).json()
    assert_error(h.client.post(f"/v1/avatars/{av['id']}/publish", headers=alice), 400, "invalid_request")
    h.worker.run_once()
    assert_error(h.client.post(f"/v1/avatars/{av['id']}/publish", headers=bob), 403, "unauthorized_access")
    pub = h.client.post(f"/v1/avatars/{av['id']}/publish", headers=alice).json()
    assert pub["published"] and pub["visibility"] == "public" and pub["publishedAt"]
    assert [a["id"] for a in h.client.get("/v1/feed", headers=bob).json()["avatars"]] == [av["id"]]
    l1 = h.client.post(f"/v1/avatars/{av['id']}/like", headers=bob).json()
    l2 = h.client.post(f"/v1/avatars/{av['id']}/like", headers=bob).json()
    assert l1["likes"] == 1 and l2["likes"] == 1 and l2["liked"]
    assert h.client.delete(f"/v1/avatars/{av['id']}/like", headers=bob).json()["likes"] == 0
    c = h.client.post(f"/v1/avatars/{av['id']}/comment", json={"text": "wow"}, headers=bob)
    assert c.status_code == 201 and c.json()["text"] == "wow"
    assert_error(h.client.post(f"/v1/avatars/{av['id']}/comment", json={"text": ""}, headers=bob), 400,
                 "invalid_request", "text")
    assert [x["text"] for x in h.client.get(f"/v1/avatars/{av['id']}/comments", headers=alice).json()["comments"]] == ["wow"]
    rx = h.client.post(f"/v1/avatars/{av['id']}/remix", json={"prompt": "dragon in snow", "strength": 0.5, "seed": 3},
                       headers=bob)
    assert rx.status_code == 202, rx.text
    assert rx.json()["kind"] == "remix" and rx.json()["remixedFrom"] == av["id"] and rx.json()["strength"] == 0.5
    h.worker.run_once()
    assert h.client.get(f"/v1/avatars/{rx.json()['id']}", headers=bob).json()["status"] == "completed"
    assert h.client.get(f"/v1/avatars/{av['id']}", headers=alice).json()["remixes"] == 1
    got = h.client.get(f"/v1/avatars/{av['id']}", headers=alice).json()
    assert got["comments"] == 1 and got["likes"] == 0


def test_webhook_endpoints_crud_and_private_destinations(db, tmp_path):
    h = db.harness(tmp_path)
    _, auth = h.account()
    assert_error(h.client.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/hook"}, headers=auth), 400,
                 "invalid_request", "url")
    assert_error(h.client.post("/v1/webhooks", json={"url": "ftp://example.com"}, headers=auth), 400,
                 "invalid_request", "url")
    h2 = db.harness(tmp_path / "b", webhook_allow_private=True)
    _, auth2 = h2.account()
    r = h2.client.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/hook", "events": ["avatar.completed"]},
                       headers=auth2)
    assert r.status_code == 201 and r.json()["secret"].startswith("whsec_")
    listed = h2.client.get("/v1/webhooks", headers=auth2).json()["webhooks"]
    assert [e["id"] for e in listed] == [r.json()["id"]] and listed[0]["secret"] is None
    assert_error(h2.client.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/", "events": ["avatar.nope"]},
                                headers=auth2), 400, "invalid_request", "events[0]")
    assert h2.client.delete(f"/v1/webhooks/{r.json()['id']}", headers=auth2).json()["deleted"] is True
    assert_error(h2.client.get(f"/v1/webhooks/{r.json()['id']}", headers=auth2), 404, "webhook_not_found")


# ------------------------------------------------------------------------------------------
# OpenAPI matches the wire; metrics; settings; assets
# ------------------------------------------------------------------------------------------
def _resolve(spec, schema):
    if "$ref" in schema:
        return spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def test_openapi_documents_what_is_returned(hs):
    _, auth = hs.account()
    spec = hs.client.get("/v1/openapi.json").json()
    paths = spec["paths"]
    for path in ("/v1/avatars/generate", "/v1/avatars/percify-yourself", "/v1/avatars/cast", "/v1/avatars",
                 "/v1/avatars/{avatarId}", "/v1/account", "/v1/health", "/v1/feed", "/v1/webhooks"):
        assert path in paths, path
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.add(node["$ref"].rsplit("/", 1)[1])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(spec)
    assert refs and refs <= set(spec["components"]["schemas"]), refs - set(spec["components"]["schemas"])
    ok = paths["/v1/avatars/generate"]["post"]["responses"]
    assert "202" in ok and "400" in ok and "402" in ok
    assert "multipart/form-data" in paths["/v1/avatars/percify-yourself"]["post"]["requestBody"]["content"]
    for op in (m for p in paths.values() for m in p.values()):
        assert any(code.startswith("2") for code in op["responses"]), op["operationId"]
    av = hs.client.post("/v1/avatars/generate", json={"prompt": "x"}, headers=auth).json()
    hs.worker.run_once()
    got = hs.client.get(f"/v1/avatars/{av['id']}", headers=auth).json()
    schema = _resolve(spec, paths["/v1/avatars/{avatarId}"]["get"]["responses"]["200"]["content"]["application/json"]["schema"])
    assert set(got) == set(schema["properties"])
    assert set(schema["required"]) <= set(got)
    err_schema = spec["components"]["schemas"]["ErrorBody"]
    err = hs.client.get("/v1/avatars/av_none", headers=auth).json()["error"]
    assert set(err) == set(err_schema["properties"])
    acct_schema = _resolve(spec, paths["/v1/account"]["get"]["responses"]["200"]["content"]["application/json"]["schema"])
    assert set(hs.client.get("/v1/account", headers=auth).json()) == set(acct_schema["properties"])


def test_metrics_endpoint_reports_jobs_and_batches(hs):
    from serve.metrics import WorkerMetrics

    hs.worker.metrics = WorkerMetrics()
    _, auth = hs.account()
    hs.client.post("/v1/avatars/generate", json={"prompt": "x"}, headers=auth)
    hs.worker.run_once()
    text = hs.client.get("/metrics").text
    assert 'avatar_jobs_total{kind="generate",outcome="completed"} 1.0' in text
    assert "avatar_batch_size_count 1.0" in text
    assert "avatar_queue_depth 0.0" in text
    assert 'avatar_jobs_submitted_total{kind="generate"} 1.0' in text


def test_text_no_store_can_keep_is_invalid_request_on_every_store(h):
    """NUL (PostgreSQL's text refuses it) and unpaired surrogates (not UTF-8 at all): one
    check at the edge gives the same 400 naming the parameter on SQLite and PostgreSQL, in
    bodies, form fields, query parameters and path ids — and stores nothing."""
    acct, auth = h.account(credits=100)
    av = h.client.post("/v1/avatars/generate", json={"prompt": "a fox"}, headers=auth).json()
    h.worker.run_once()
    hook = h.client.post("/v1/webhooks", json={"url": "https://example.com/hook"}, headers=auth)
    before = h.store.get_account(acct.id).credits

    def raw(method, url, text):
        return h.client.request(method, url, content=text.encode(), headers={**auth, "content-type": "application/json"})

    cases = [
        (raw("POST", "/v1/avatars/generate", '{"prompt": "a\\\\u0000fox"}'), None),  # an escaped backslash: fine
        (raw("POST", "/v1/avatars/generate", '{"prompt": "a\\u0000fox"}'), "prompt"),
        (raw("POST", "/v1/avatars/generate", '{"prompt": "a\\ud800fox"}'), "prompt"),
        (raw("POST", "/v1/avatars/generate", '{"prompt": "ok", "metadata": {"k": "v\\u0000"}}'), "metadata.k"),
        (raw("POST", "/v1/avatars/cast", '{"prompt": "two", "characters": [{"prompt": "a"}, {"prompt": "\\u0000"}]}'),
         "characters[1].prompt"),
        (raw("PATCH", f"/v1/avatars/{av['id']}", '{"title": "t\\u0000"}'), "title"),
        (raw("PATCH", f"/v1/avatars/{av['id']}", '{"description": "\\udfff"}'), "description"),
        (raw("POST", f"/v1/avatars/{av['id']}/comment", '{"text": "hi\\u0000"}'), "text"),
        (raw("POST", "/v1/webhooks", '{"url": "https://example.com/h", "description": "\\u0000"}'), "description"),
        (h.client.get("/v1/avatars", params={"search": "fox\x00"}, headers=auth), "search"),
        (h.client.get("/v1/avatars", params={"model": "\x00"}, headers=auth), "model"),
        (h.client.get("/v1/avatars/av_%00x", headers=auth), "avatarId"),
        (h.client.delete("/v1/avatars/av_%00x", headers=auth), "avatarId"),
        (h.client.get("/v1/webhooks/wh_%00", headers=auth), "webhookId"),
        (h.client.post("/v1/avatars/percify-yourself", data={"prompt": "me\x00"},
                       files=[("photo", ("a.png", png_bytes(), "image/png"))], headers=auth), "prompt"),
    ]
    first, *bad = cases
    assert first[0].status_code == 202, first[0].text  # a literal backslash-u is ordinary text
    for resp, param in bad:
        body = assert_error(resp, 400, "invalid_request", param)
        assert "cannot be stored" in body["message"]
    assert h.store.get_account(acct.id).credits == before - first[0].json()["creditCost"]
    got = h.client.get(f"/v1/avatars/{av['id']}", headers=auth).json()
    assert got["title"] is None and got["comments"] == 0
    assert len(h.client.get("/v1/webhooks", headers=auth).json()["webhooks"]) == (1 if hook.status_code == 201 else 0)


def test_settings_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("AVATAR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("AVATAR_PORT", "9001")
    monkeypatch.setenv("AVATAR_POLICY_WORDS", "foo, bar")
    monkeypatch.setenv("AVATAR_WEBHOOK_ALLOW_PRIVATE", "true")
    monkeypatch.setenv("AVATAR_TIERS", '{"free": [5, 1], "pro": {"requests_per_minute": 50, "concurrent_jobs": 4}}')
    s = ServiceSettings.from_env(lease_seconds=5)
    assert s.port == 9001 and s.policy_words == ("foo", "bar") and s.webhooks.allow_private
    assert s.tiers["pro"] == TierLimits(50, 4) and s.tiers["free"] == TierLimits(5, 1)
    assert s.resolved_db_url == f"sqlite:///{tmp_path}/avatar.db" and s.lease_seconds == 5
    assert ServiceSettings.from_dict(s.to_dict(), env=False) == s
    with pytest.raises(ValueError, match="leese"):
        ServiceSettings.from_dict({"leese_seconds": 1})
    monkeypatch.setenv("AVATAR_PORT", "abc")
    with pytest.raises(ValueError, match="AVATAR_PORT"):
        ServiceSettings.from_env()


def test_cost_and_webhook_delivery_settings_reach_the_dispatcher(monkeypatch, tmp_path):
    from serve.webhooks import WebhookDispatcher

    monkeypatch.setenv("AVATAR_MODEL_COSTS", '{"tiny-sd15": 3, "sdxl": 8}')
    monkeypatch.setenv("AVATAR_WEBHOOK_RETRY_SCHEDULE", "1, 5,30")
    monkeypatch.setenv("AVATAR_WEBHOOK_LEASE_SECONDS", "4.5")
    monkeypatch.setenv("AVATAR_WEBHOOK_ALLOWLIST", "127.0.0.1,hooks.internal")
    s = ServiceSettings.from_env(webhook_base_backoff_s=0.5, webhook_max_backoff_s=2)
    assert s.model_costs == {"tiny-sd15": 3, "sdxl": 8}
    assert s.per_image_cost("sdxl", 2) == 8 and s.per_image_cost("other", 4) == 4 and s.per_image_cost("x", None) == 2
    assert ServiceSettings.from_dict(s.to_dict(), env=False) == s
    opts = WebhookDispatcher(open_store(f"sqlite:///{tmp_path}/d.db"), s.webhooks).options
    assert (opts.retry_schedule, opts.lease_seconds, opts.base_backoff_s, opts.max_backoff_s) == ((1.0, 5.0, 30.0), 4.5, 0.5, 2)
    assert opts.allowlist == ("127.0.0.1", "hooks.internal") and opts.allow_private is False
    assert ServiceSettings().webhooks.max_attempts == 8
    monkeypatch.setenv("AVATAR_WEBHOOK_ALLOWLIST", '["10.0.0.0/8"]')  # JSON lists work too
    assert ServiceSettings.from_env().webhooks.allowlist == ("10.0.0.0/8",)
    # The README's form, through the same path as the Serve builder (env → args → replicas).
    monkeypatch.setenv("AVATAR_WEBHOOK_ALLOWLIST", '["127.0.0.1"]')
    monkeypatch.setenv("AVATAR_MODELS", '["tiny-sd15", "sdxl"]')
    monkeypatch.setenv("AVATAR_POLICY_WORDS", ' ["foo", "bar baz"] ')
    replica = ServiceSettings.from_dict(ServiceSettings.from_dict({"data_dir": str(tmp_path)}).to_dict(), env=False)
    assert replica.webhooks.allowlist == ("127.0.0.1",) and replica.models == ("tiny-sd15", "sdxl")
    assert replica.policy_words == ("foo", "bar baz")
    monkeypatch.setenv("AVATAR_WEBHOOK_ALLOWLIST", "127.0.0.1")
    assert ServiceSettings.from_env().webhooks.allowlist == ("127.0.0.1",)
    with pytest.raises(ValueError, match=r"model_costs\['sdxl'\]"):
        ServiceSettings(model_costs={"sdxl": -1})
    with pytest.raises(ValueError, match=r"webhooks\.lease_seconds"):
        ServiceSettings(webhook_lease_seconds=0)
    monkeypatch.setenv("AVATAR_WEBHOOK_MAX_ATTEMPTS", "0")
    with pytest.raises(ValueError, match="AVATAR_WEBHOOK_MAX_ATTEMPTS"):
        ServiceSettings.from_env()


def test_fsspec_asset_backend_roundtrip():
    store = AssetStore.from_url("memory://avatar-test-assets")
    info = store.put_image("av_1", 0, Image.new("RGB", (32, 16), (9, 9, 9)))
    assert info.key == "avatars/av_1/0.png" and (info.width, info.height) == (32, 16)
    assert store.load_image(info.key).getpixel((0, 0)) == (9, 9, 9)
    assert store.exists("avatars/av_1/thumbnail.webp")
    store.put_image("av_1", 0, Image.new("RGB", (32, 16), (1, 1, 1)))  # re-run overwrites
    assert store.load_image(info.key).getpixel((0, 0)) == (1, 1, 1)
    store.delete_avatar("av_1")
    assert not store.exists(info.key)
    with pytest.raises(ValueError):
        store.get_bytes("../etc/passwd")


def test_completed_job_is_delivered_to_a_webhook_with_the_api_avatar(db, tmp_path):
    """End to end through the outbox: API-created endpoint, job completed by the worker, the
    dispatcher (serve.webhooks) POSTs a signed event whose data is the API's avatar object."""
    import http.server
    import threading

    from serve.app import event_renderer
    from standardwebhooks.webhooks import Webhook

    from serve.webhooks import WebhookDispatcher

    received = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            received.append((dict(self.headers), self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        h = db.harness(tmp_path, store_kwargs={"event_renderer": event_renderer()}, webhook_allow_private=True)
        acct, auth = h.account()
        ep = h.client.post("/v1/webhooks", json={"url": f"http://127.0.0.1:{srv.server_port}/hook",
                                                 "events": ["avatar.completed"]}, headers=auth).json()
        av = h.client.post("/v1/avatars/generate", json={"prompt": "x"}, headers=auth).json()
        h.worker.run_once()
        WebhookDispatcher(h.store, h.settings.webhooks).drain()
        assert len(received) == 1
        headers, body = received[0]
        assert Webhook(ep["secret"]).verify(body, headers) == json.loads(body)  # the reference verifier
        payload = json.loads(body)
        assert payload["type"] == "avatar.completed"
        assert payload["data"]["object"]["id"] == av["id"] and payload["data"]["object"]["status"] == "completed"
        assert payload["data"]["object"]["images"][0]["url"].endswith(f"/v1/avatars/{av['id']}/images/0")
    finally:
        srv.shutdown()


def test_idempotency_key_in_flight_is_409_and_5xx_is_not_stored(h):
    _, auth = h.account()
    hdr = {**auth, "Idempotency-Key": "same"}
    real_submit = h.store.submit_job
    nested = []

    def submit_and_retry(*a, **kw):
        # While the first request is inside submit_job, a retry with the same key arrives.
        nested.append(h.client.post("/v1/avatars/generate", json={"prompt": "x"}, headers=hdr))
        return real_submit(*a, **kw)

    h.store.submit_job = submit_and_retry
    first = h.client.post("/v1/avatars/generate", json={"prompt": "x"}, headers=hdr)
    assert first.status_code == 202
    assert_error(nested[0], 409, "idempotency_conflict", "Idempotency-Key")

    def broken(*a, **kw):
        raise RuntimeError("db down")

    h.store.submit_job = broken
    hdr2 = {**auth, "Idempotency-Key": "other"}
    assert_error(h.client.post("/v1/avatars/generate", json={"prompt": "y"}, headers=hdr2), 500, "internal_error")
    h.store.submit_job = real_submit
    retry = h.client.post("/v1/avatars/generate", json={"prompt": "y"}, headers=hdr2)
    assert retry.status_code == 202 and "idempotent-replayed" not in retry.headers


# ------------------------------------------------------------------------------------------
# The real tiny engine behind the same routes (percify-yourself and cast need real faces)
# ------------------------------------------------------------------------------------------
def _photo_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_percify_and_cast_with_the_real_tiny_engine(tmp_path, tiny_engine):
    import numpy as np
    from skimage import data as skdata

    face = Image.fromarray(np.asarray(skdata.astronaut())).resize((256, 256))
    # The cast below reuses the percify avatar as a character. With the default `photo_retention: job`
    # its reference photos are gone by then and the avatar's own image stands in, which from the tiny
    # model has no face; keeping the photos with the avatar lends the real face.
    h = Harness(tmp_path, engine=tiny_engine, photo_retention="avatar")
    _, auth = h.account(credits=200)
    r = h.client.post("/v1/avatars/percify-yourself", headers=auth,
                      data={"prompt": "portrait, knight armour", "seed": "5", "steps": "3", "identityStrength": "0.8"},
                      files=[("photo", ("me.jpg", _photo_bytes(face), "image/jpeg"))])
    assert r.status_code == 202, r.text
    percify_id = r.json()["id"]
    h.worker.drain()
    got = h.client.get(f"/v1/avatars/{percify_id}", headers=auth).json()
    assert got["status"] == "completed", got
    assert got["identity"]["faces"] == 1 and len(got["identity"]["perImage"]) == 1
    png = h.client.get(got["images"][0]["url"], headers=auth)
    assert Image.open(io.BytesIO(png.content)).size == (got["width"], got["height"])

    body = {"prompt": "two friends on a beach", "seed": 3, "steps": 3, "aspectRatio": "16:9", "characters": [
        {"prompt": "an astronaut", "photos": [base64.b64encode(_photo_bytes(face)).decode()]},
        {"prompt": "a knight", "avatarId": percify_id}]}
    r = h.client.post("/v1/avatars/cast", json=body, headers=auth)
    assert r.status_code == 202, r.text
    h.worker.drain()
    cast = h.client.get(f"/v1/avatars/{r.json()['id']}", headers=auth).json()
    assert cast["status"] == "completed", cast["error"]
    assert [c["hasIdentity"] for c in cast["characters"]] == [True, True]
    assert all(len(c["box"]) == 4 for c in cast["characters"])
    bad_box = {**body, "characters": [{"prompt": "a", "box": [0, 0, 0.6, 1]}, {"prompt": "b", "box": [0.4, 0, 1, 1]}]}
    assert_error(h.client.post("/v1/avatars/cast", json=bad_box, headers=auth), 400, "invalid_request",
                 "characters[1].box")


def test_output_safety_checker_fails_the_job_and_refunds(db, tmp_path):
    h = db.harness(tmp_path)
    h.worker.policy = PolicyChecker([], output_checker=lambda images: [True] * len(images))
    acct, auth = h.account(credits=10)
    av = h.client.post("/v1/avatars/generate", json={"prompt": "x"}, headers=auth).json()
    h.worker.run_once()
    got = h.client.get(f"/v1/avatars/{av['id']}", headers=auth).json()
    assert got["status"] == "failed" and got["error"]["code"] == "content_policy_violation" and got["images"] == []
    assert not h.assets.exists(f"avatars/{av['id']}/0.png")
    assert h.store.get_account(acct.id).credits == 10


def test_heartbeat_keeps_a_long_job_from_being_stolen(db, tmp_path):
    """The generation outlasts three lease lengths (on the store's fake clock); the worker's
    heartbeat thread keeps extending the lease, so a second worker cannot take the job."""
    clock = FakeClock()
    h = db.harness(tmp_path, store_kwargs={"clock": clock}, lease_seconds=10, heartbeat_seconds=0.02)
    _, auth = h.account()
    av = h.client.post("/v1/avatars/generate", json={"prompt": "x"}, headers=auth).json()
    stolen, beats = [], []

    def slow():
        for _ in range(3):  # 24 s of generation with a 10 s lease
            clock.advance(8)
            deadline = time.monotonic() + 30  # bound for a starved thread, never asserted
            while h.store.get_avatar(av["id"]).lease_expires_at < clock() + 9 and time.monotonic() < deadline:
                time.sleep(0.01)  # until the heartbeat has extended the lease from the new "now"
            beats.append(h.store.get_avatar(av["id"]).lease_expires_at - clock())
            stolen.extend(h.store.claim_jobs("thief", limit=1, lease_seconds=5, models=["fake"]))

    h.engine.before_return = slow
    assert h.worker.run_once().completed == [av["id"]]
    assert beats == [10, 10, 10]  # each extension reaches a full lease from the current time
    assert stolen == [] and h.store.get_avatar(av["id"]).attempts == 1


def test_without_heartbeats_an_overrunning_job_is_reclaimed(db, tmp_path):
    """The counter-check of the test above: the same overrun with a heartbeat too slow to fire
    loses the lease, the thief takes the job and the first worker's result is dropped."""
    clock = FakeClock()
    h = db.harness(tmp_path, store_kwargs={"clock": clock}, lease_seconds=10, heartbeat_seconds=3600)
    _, auth = h.account()
    av = h.client.post("/v1/avatars/generate", json={"prompt": "x"}, headers=auth).json()
    stolen = []

    def slow():
        clock.advance(11)
        stolen.extend(h.store.claim_jobs("thief", limit=1, lease_seconds=5, models=["fake"]))

    h.engine.before_return = slow
    report = h.worker.run_once()
    assert [j.id for j in stolen] == [av["id"]] and report.dropped == [av["id"]] and report.completed == []


def test_a_restarted_worker_reclaims_its_dead_predecessors_jobs_at_once(db, tmp_path):
    """The previous process on this host (same data) died holding jobs with long leases: the
    new worker sees on registering that the process is gone and takes the jobs immediately;
    each is completed and charged once."""
    import socket
    import subprocess
    import sys

    h = db.harness(tmp_path)
    acct, auth = h.account(credits=100)
    ids = [h.client.post("/v1/avatars/generate", json={"prompt": f"p{i}"}, headers=auth).json()["id"]
           for i in range(2)]
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    h.store.register_worker("previous-run", socket.gethostname(), gone.pid, "1")
    held = h.store.claim_jobs("previous-run", limit=2, lease_seconds=3600, models=["fake"])
    assert sorted(j.id for j in held) == sorted(ids)
    report = h.worker.run_once()
    assert sorted(report.completed) == sorted(ids)
    assert all(h.store.get_avatar(i).attempts == 2 for i in ids)
    assert not any(h.store.complete_job(j.id, j.lease_token, {"images": []}) for j in held)
    ledger = h.store.ledger(acct.id)
    assert all(sorted(e.kind for e in ledger if e.avatar_id == i) == ["charge", "reserve"] for i in ids)
    assert h.store.list_workers() == []  # run_once unregisters when it is done


class _SlowAssets:
    """The real asset store, with encoding/upload made slow and recorded."""

    def __init__(self, inner, delay, log):
        self._inner, self._delay, self._log = inner, delay, log

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def put_image(self, avatar_id, index, image, *args, **kwargs):
        t0 = time.monotonic()
        time.sleep(self._delay)
        info = self._inner.put_image(avatar_id, index, image, *args, **kwargs)
        self._log.append(("post", avatar_id, t0, time.monotonic()))
        return info


def test_the_worker_loop_overlaps_post_processing_with_the_next_generation(db, tmp_path):
    """Batch k's post-processing runs while batch k+1 generates, and the next claim is made
    while a generation is still running; every job is completed and charged exactly once."""
    h = db.harness(tmp_path, max_batch=1, poll_seconds=0.05)
    events: list[tuple] = []
    h.worker.assets = _SlowAssets(h.assets, 0.3, events)
    engine_generate = h.engine.generate

    def generate(requests, progress=None):
        t0 = time.monotonic()
        time.sleep(0.3)
        out = engine_generate(requests, progress)
        events.append(("gen", None, t0, time.monotonic()))
        return out

    h.engine.generate = generate
    store_claim = h.store.claim_jobs
    claims: list[float] = []

    def claim_jobs(*args, **kwargs):
        started = time.monotonic()
        got = store_claim(*args, **kwargs)
        if got:
            claims.append(started)
        return got

    h.store.claim_jobs = claim_jobs
    acct, auth = h.account(tier="enterprise", credits=100)
    ids = [h.client.post("/v1/avatars/generate", json={"prompt": f"job {i}"}, headers=auth).json()["id"]
           for i in range(4)]
    h.worker.start()
    try:
        deadline = time.monotonic() + 60  # bound for a starved box, never asserted
        while time.monotonic() < deadline and set(h.store.job_statuses(ids).values()) != {"completed"}:
            time.sleep(0.05)
    finally:
        h.worker.stop()
    assert set(h.store.job_statuses(ids).values()) == {"completed"}
    gens = sorted((t0, t1) for kind, _, t0, t1 in events if kind == "gen")
    posts = sorted((t0, t1) for kind, _, t0, t1 in events if kind == "post")
    assert len(gens) == 4 and len(posts) == 4
    # Overlap: some generation started before the previous batch's post-processing ended.
    assert any(gens[k + 1][0] < posts[k][1] for k in range(3)), (gens, posts)
    # Prefetch: the claim of batch k+1 began before batch k's generation ended.
    claims.sort()
    assert len(claims) == 4 and any(claims[k + 1] < gens[k][1] for k in range(3)), (claims, gens)
    ledger = h.store.ledger(acct.id)
    assert all(sorted(e.kind for e in ledger if e.avatar_id == i) == ["charge", "reserve"] for i in ids)
    assert h.store.list_workers() == [] and h.worker.held_jobs == 0  # stop() unregistered, nothing held


def test_cli_create_key_and_grant_credits(db, tmp_path, capsys):
    """The operator commands work on both stores (the API reads what they wrote)."""
    from serve.cli import main

    url = db.url() or f"sqlite:///{tmp_path}/avatar.db"
    where = ["--db", url]
    assert main(["create-key", "--tier", "pro", "--credits", "100", *where, "-q"]) == 0
    key = capsys.readouterr().out.strip()
    store = open_store(url)
    try:
        acct = store.authenticate(key)
        assert acct.tier == "pro" and acct.credits == 100
        assert main(["grant-credits", acct.id, "25", *where]) == 0
        assert store.get_account(acct.id).credits == 125
        assert [e.kind for e in store.ledger(acct.id)] == ["grant", "grant"]
        assert main(["grant-credits", "acct_missing", "5", *where]) == 2
        assert main(["set-tier", acct.id, "enterprise", *where]) == 0
        assert store.get_account(acct.id).tier == "enterprise"
        h = Harness(tmp_path / "api", db_url=url)
        got = h.client.get("/v1/account", headers={"Authorization": f"Bearer {key}"}).json()
        assert got["credits"] == 125 and got["tier"] == "enterprise"
        assert got["limits"] == {"requestsPerMinute": 300, "concurrentGenerations": 20}
        h.store.close()
    finally:
        store.close()


# ------------------------------------------------------------------------------------------
# Tier, credit, idempotency, webhook and community rules (both stores)
# ------------------------------------------------------------------------------------------

def _assert_rate_headers(resp, quota):
    assert resp.headers["ratelimit-policy"] == f'"minute";q={quota};w=60', resp.headers
    assert resp.headers["ratelimit"].startswith('"minute";r='), resp.headers


def test_every_refusal_has_the_error_shape_and_rate_limit_headers(db, tmp_path):
    h = db.harness(tmp_path, store_kwargs={"clock": FakeClock(1_800_000_000.0)},
                   tiers={"free": {"requests_per_minute": 4, "concurrent_jobs": 1}})
    _, auth = h.account(tier="free", credits=2)
    r = h.client.post("/v1/avatars/generate", json={"prompt": "x", "batchSize": 2}, headers=auth)
    err = assert_error(r, 402, "insufficient_credits")
    assert "costs 4 credits" in err["message"] and "has 2" in err["message"]
    _assert_rate_headers(r, 4)
    assert h.client.post("/v1/avatars/generate", json={"prompt": "x"}, headers=auth).status_code == 202
    r = h.client.post("/v1/avatars/generate", json={"prompt": "y"}, headers=auth)
    assert_error(r, 429, "rate_limit_exceeded")
    assert int(r.headers["retry-after"]) >= 1
    _assert_rate_headers(r, 4)
    h.client.get("/v1/account", headers=auth)
    r = h.client.get("/v1/account", headers=auth)  # 5th request in the window
    assert_error(r, 429, "rate_limit_exceeded")
    assert int(r.headers["retry-after"]) >= 1 and r.headers["ratelimit"].startswith('"minute";r=0;')
    assert h.client.get("/v1/health").status_code == 200  # unauthenticated health is not limited


def test_rate_limit_window_resets_and_is_per_account(db, tmp_path):
    clock = FakeClock(1_800_000_000.0)  # a window boundary
    h = db.harness(tmp_path, store_kwargs={"clock": clock},
                   tiers={"free": {"requests_per_minute": 2, "concurrent_jobs": 1}})
    _, a = h.account(tier="free")
    _, b = h.account(tier="free")
    assert [h.client.get("/v1/account", headers=a).status_code for _ in range(3)] == [200, 200, 429]
    assert h.client.get("/v1/account", headers=b).status_code == 200  # another account's own budget
    clock.t += 59.0
    r = h.client.get("/v1/account", headers=a)
    # 1 s to the window's end, then 30 s until one of the two requests has slid out.
    assert r.status_code == 429 and r.headers["retry-after"] == "31"
    clock.t += 30.0
    assert h.client.get("/v1/account", headers=a).status_code == 429
    clock.t += 1.0
    assert h.client.get("/v1/account", headers=a).status_code == 200


def test_rate_limited_submission_is_not_stored_under_its_idempotency_key(db, tmp_path):
    h = db.harness(tmp_path)
    _, auth = h.account(tier="free", credits=10)
    assert h.client.post("/v1/avatars/generate", json={"prompt": "first"}, headers=auth).status_code == 202
    hdr = {**auth, "Idempotency-Key": "retry-me"}
    assert_error(h.client.post("/v1/avatars/generate", json={"prompt": "second"}, headers=hdr), 429,
                 "rate_limit_exceeded")
    h.worker.run_once()  # the first job finishes: a slot is free again
    r = h.client.post("/v1/avatars/generate", json={"prompt": "second"}, headers=hdr)
    assert r.status_code == 202 and "idempotent-replayed" not in r.headers
    again = h.client.post("/v1/avatars/generate", json={"prompt": "second"}, headers=hdr)
    assert again.headers["idempotent-replayed"] == "true" and again.json()["id"] == r.json()["id"]


def test_insufficient_credits_is_replayed_under_its_key(db, tmp_path):
    """A 402 is the answer to that request (Stripe semantics): a replay returns it, and a new
    request after a top-up needs a new key."""
    h = db.harness(tmp_path)
    acct, auth = h.account(credits=1)
    hdr = {**auth, "Idempotency-Key": "poor"}
    first = h.client.post("/v1/avatars/generate", json={"prompt": "x", "batchSize": 2}, headers=hdr)
    assert_error(first, 402, "insufficient_credits")
    h.store.grant_credits(acct.id, 10)
    again = h.client.post("/v1/avatars/generate", json={"prompt": "x", "batchSize": 2}, headers=hdr)
    assert again.status_code == 402 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    fresh = h.client.post("/v1/avatars/generate", json={"prompt": "x", "batchSize": 2},
                          headers={**auth, "Idempotency-Key": "paid"})
    assert fresh.status_code == 202 and h.store.get_account(acct.id).credits == 11 - 4


def test_idempotency_is_scoped_per_account_and_lasts_24_hours(db, tmp_path):
    clock = FakeClock()
    h = db.harness(tmp_path, store_kwargs={"clock": clock})
    alice_acct, alice = h.account()
    bob_acct, bob = h.account()
    body = {"prompt": "same body", "seed": 5}
    a = h.client.post("/v1/avatars/generate", json=body, headers={**alice, "Idempotency-Key": "k"})
    b = h.client.post("/v1/avatars/generate", json=body, headers={**bob, "Idempotency-Key": "k"})
    assert a.status_code == b.status_code == 202 and "idempotent-replayed" not in b.headers
    assert a.json()["id"] != b.json()["id"]
    assert len(h.store.list_avatars(alice_acct.id).items) == len(h.store.list_avatars(bob_acct.id).items) == 1
    clock.t += 24 * 3600 - 1
    replay = h.client.post("/v1/avatars/generate", json=body, headers={**alice, "Idempotency-Key": "k"})
    assert replay.headers["idempotent-replayed"] == "true" and replay.json()["id"] == a.json()["id"]
    assert replay.headers["location"] == f"/v1/avatars/{a.json()['id']}"
    assert_error(h.client.post("/v1/avatars/generate", json={"prompt": "other"},
                               headers={**alice, "Idempotency-Key": "k"}), 422, "invalid_request", "Idempotency-Key")
    clock.t += 2  # past 24 h: the key is free again
    fresh = h.client.post("/v1/avatars/generate", json={"prompt": "other"}, headers={**alice, "Idempotency-Key": "k"})
    assert fresh.status_code == 202 and "idempotent-replayed" not in fresh.headers
    assert fresh.json()["id"] != a.json()["id"]


def test_idempotency_key_on_every_post(db, tmp_path):
    """publish, like, comment, remix and webhook creation replay too (and bind key to path)."""
    h = db.harness(tmp_path, webhook_allowlist=["127.0.0.1"])
    _, alice = h.account()
    acct_b, bob = h.account()
    av = h.client.post("/v1/avatars/generate", json={"prompt": "dragon"}, headers=alice).json()
    h.worker.run_once()

    def twice(path, headers, key, **kw):
        hdr = {**headers, "Idempotency-Key": key}
        first, second = h.client.post(path, headers=hdr, **kw), h.client.post(path, headers=hdr, **kw)
        assert first.status_code < 300, first.text
        assert second.status_code == first.status_code and second.headers["idempotent-replayed"] == "true"
        assert second.content == first.content
        return first.json()

    twice(f"/v1/avatars/{av['id']}/publish", alice, "pub")
    twice(f"/v1/avatars/{av['id']}/like", bob, "like")
    twice(f"/v1/avatars/{av['id']}/comment", bob, "cm", json={"text": "nice"})
    rx = twice(f"/v1/avatars/{av['id']}/remix", bob, "rx", json={"strength": 0.4})
    ep = twice("/v1/webhooks", alice, "wh", json={"url": "http://127.0.0.1:9/h"})
    got = h.client.get(f"/v1/avatars/{av['id']}", headers=alice).json()
    assert (got["likes"], got["comments"], got["remixes"]) == (1, 1, 1)
    assert len(h.store.list_avatars(acct_b.id).items) == 1 and rx["remixedFrom"] == av["id"]
    assert [e["id"] for e in h.client.get("/v1/webhooks", headers=alice).json()["webhooks"]] == [ep["id"]]
    # The same key on another route is another request: 422, not a replay of the first.
    assert_error(h.client.post(f"/v1/avatars/{av['id']}/like", headers={**bob, "Idempotency-Key": "cm"}), 422,
                 "invalid_request", "Idempotency-Key")
    assert_error(h.client.post("/v1/avatars/generate", json={"prompt": "x"}, headers={**bob, "Idempotency-Key": ""}),
                 400, "invalid_request", "Idempotency-Key")


def test_costs_are_configurable_per_model_and_operation(db, tmp_path):
    h = db.harness(tmp_path, model_costs={"fake": 5}, cost_percify=7, cost_cast=11)
    acct, auth = h.account(credits=1000)
    account = h.client.get("/v1/account", headers=auth).json()
    assert account["costs"] == {"generatePerImage": {"fake": 5}, "percify": 7, "cast": 11}
    assert account["credits"] == 1000 and account["tier"] == "pro"
    assert account["limits"] == {"requestsPerMinute": 60, "concurrentGenerations": 5}
    assert h.client.get("/v1/health").json()["models"][0]["creditCost"] == 5
    gen = h.client.post("/v1/avatars/generate", json={"prompt": "x", "batchSize": 3}, headers=auth).json()
    b64 = base64.b64encode(png_bytes()).decode()
    per = h.client.post("/v1/avatars/percify-yourself", json={"photos": [b64]}, headers=auth).json()
    cast = h.client.post("/v1/avatars/cast", headers=auth, json={
        "prompt": "duo", "characters": [{"prompt": "a"}, {"prompt": "b"}]}).json()
    assert (gen["creditCost"], per["creditCost"], cast["creditCost"]) == (15, 7, 11)
    h.worker.drain()
    rx = h.client.post(f"/v1/avatars/{gen['id']}/remix", json={"batchSize": 2}, headers=auth).json()
    assert rx["creditCost"] == 10  # remix = generate: per-model cost × images
    assert h.store.get_account(acct.id).credits == h.store.ledger_balance(acct.id)


def test_account_shows_the_balance_through_the_credit_lifecycle(db, tmp_path):
    """reserve on accept, charge on completion, release on failure and on cancellation."""
    h = db.harness(tmp_path, engine=FakeEngine(fail_prompts=("boom",)))
    acct, auth = h.account(credits=10)

    def credits():
        return h.client.get("/v1/account", headers=auth).json()["credits"]

    ok = h.client.post("/v1/avatars/generate", json={"prompt": "fine", "batchSize": 2}, headers=auth).json()
    bad = h.client.post("/v1/avatars/generate", json={"prompt": "boom"}, headers=auth).json()
    assert credits() == 10 - 4 - 2
    h.worker.run_once()
    assert credits() == 10 - 4
    gone = h.client.post("/v1/avatars/generate", json={"prompt": "later"}, headers=auth).json()
    assert credits() == 4
    h.client.delete(f"/v1/avatars/{gone['id']}", headers=auth)
    assert credits() == 6
    kinds = {i: sorted(e.kind for e in h.store.ledger(acct.id) if e.avatar_id == i)
             for i in (ok["id"], bad["id"], gone["id"])}
    assert kinds == {ok["id"]: ["charge", "reserve"], bad["id"]: ["release", "reserve"],
                     gone["id"]: ["release", "reserve"]}
    assert h.store.ledger_balance(acct.id) == 6


def test_publish_rules_and_feed_order_with_cursor(db, tmp_path):
    h = db.harness(tmp_path)
    _, alice = h.account()
    _, bob = h.account()
    fans = [h.account()[1] for _ in range(3)]
    ids = [h.client.post("/v1/avatars/generate", json={"prompt": f"p{i}"}, headers=alice).json()["id"] for i in range(3)]
    assert_error(h.client.post(f"/v1/avatars/{ids[0]}/publish", headers=alice), 400, "invalid_request", "avatarId")
    h.worker.run_once()
    hidden = h.client.post("/v1/avatars/generate", json={"prompt": "private one"}, headers=alice).json()["id"]
    h.worker.run_once()
    assert_error(h.client.post(f"/v1/avatars/{ids[0]}/publish", headers=bob), 403, "unauthorized_access")
    for i in ids:
        pub = h.client.post(f"/v1/avatars/{i}/publish", headers=alice).json()
        assert pub["published"] and pub["visibility"] == "public" and pub["publishedAt"]
    for n, i in enumerate(ids):  # ids[0]: 0 likes, ids[1]: 1, ids[2]: 2
        for fan in fans[:n]:
            h.client.post(f"/v1/avatars/{i}/like", headers=fan)
    newest = [a["id"] for a in h.client.get("/v1/feed", headers=bob).json()["avatars"]]
    assert newest == ids[::-1] and hidden not in newest
    liked, cursor = [], None
    while True:
        page = h.client.get("/v1/feed", params={"sort": "mostLiked", "limit": 1, **({"cursor": cursor} if cursor else {})},
                            headers=bob).json()
        liked += [(a["id"], a["likes"]) for a in page["avatars"]]
        if not page["hasMore"]:
            break
        cursor = page["nextCursor"]
    assert liked == [(ids[2], 2), (ids[1], 1), (ids[0], 0)]
    h.client.patch(f"/v1/avatars/{ids[2]}", json={"visibility": "private"}, headers=alice)
    assert [a["id"] for a in h.client.get("/v1/feed", headers=bob).json()["avatars"]] == [ids[1], ids[0]]
    assert_error(h.client.get("/v1/feed", params={"sort": "oldest"}, headers=bob), 400, "invalid_request", "sort")


def test_likes_comments_and_their_webhooks_go_to_the_owner(db, tmp_path):
    h = db.harness(tmp_path, webhook_allowlist=["127.0.0.1"])
    owner_acct, owner = h.account()
    fan_acct, fan = h.account()
    h.client.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/owner"}, headers=owner)
    h.client.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/fan"}, headers=fan)
    av = h.client.post("/v1/avatars/generate", json={"prompt": "x"}, headers=owner).json()
    h.worker.run_once()
    h.client.post(f"/v1/avatars/{av['id']}/publish", headers=owner)
    for _ in range(2):  # the second like is a no-op: no second event
        assert h.client.post(f"/v1/avatars/{av['id']}/like", headers=fan).json() == {
            "object": "like", "avatarId": av["id"], "liked": True, "likes": 1}
    c = h.client.post(f"/v1/avatars/{av['id']}/comment", json={"text": "great work"}, headers=fan).json()
    assert h.client.delete(f"/v1/avatars/{av['id']}/like", headers=fan).json()["likes"] == 0
    assert h.client.delete(f"/v1/avatars/{av['id']}/like", headers=fan).json() == {
        "object": "like", "avatarId": av["id"], "liked": False, "likes": 0}
    events = {d.event_type: d.payload for d in h.store.list_deliveries(owner_acct.id)}
    assert sorted(events) == ["avatar.commented", "avatar.completed", "avatar.liked", "avatar.published"]
    liked = events["avatar.liked"]["data"]
    assert liked["likedBy"] == fan_acct.id and liked["object"]["id"] == av["id"] and liked["object"]["likes"] == 1
    comment = events["avatar.commented"]["data"]["comment"]
    assert comment == {**c, "object": "comment"} and comment["text"] == "great work"
    assert comment["avatarId"] == av["id"] and comment["accountId"] == fan_acct.id
    assert h.store.list_deliveries(fan_acct.id) == []  # the actor's own endpoints hear nothing


def test_comments_length_and_content_policy(db, tmp_path):
    h = db.harness(tmp_path)
    _, alice = h.account()
    av = h.client.post("/v1/avatars/generate", json={"prompt": "x", "visibility": "unlisted"}, headers=alice).json()
    path = f"/v1/avatars/{av['id']}/comment"
    assert_error(h.client.post(path, json={"text": "so NSFW lol"}, headers=alice), 400, "content_policy_violation", "text")
    assert_error(h.client.post(path, json={"text": "x" * 2001}, headers=alice), 400, "invalid_request", "text")
    assert_error(h.client.post(path, json={"text": "   "}, headers=alice), 400, "invalid_request", "text")
    assert_error(h.client.post(path, json={}, headers=alice), 400, "invalid_request", "text")
    assert h.client.post(path, json={"text": "y" * 2000}, headers=alice).status_code == 201
    listed = h.client.get(f"/v1/avatars/{av['id']}/comments", headers=alice).json()
    assert [len(c["text"]) for c in listed["comments"]] == [2000]


def test_remix_lineage_visibility_and_source_image(db, tmp_path):
    h = db.harness(tmp_path)
    _, alice = h.account()
    _, bob = h.account()
    src = h.client.post("/v1/avatars/generate", json={"prompt": "a red fox", "seed": 11, "stylePreset": "anime"},
                        headers=alice).json()
    assert_error(h.client.post(f"/v1/avatars/{src['id']}/remix", json={}, headers=alice), 400, "invalid_request",
                 "avatarId")  # not completed yet
    h.worker.run_once()
    assert_error(h.client.post(f"/v1/avatars/{src['id']}/remix", json={}, headers=bob), 403, "unauthorized_access")
    h.client.post(f"/v1/avatars/{src['id']}/publish", headers=alice)
    assert_error(h.client.post(f"/v1/avatars/{src['id']}/remix", json={"strength": 0}, headers=bob), 400,
                 "invalid_request", "strength")
    rx = h.client.post(f"/v1/avatars/{src['id']}/remix", json={"strength": 0.5, "seed": 3}, headers=bob).json()
    assert (rx["kind"], rx["remixedFrom"], rx["prompt"], rx["stylePreset"], rx["seed"], rx["strength"]) == (
        "remix", src["id"], "a red fox", "anime", 3, 0.5)
    stored = h.store.get_avatar(rx["id"]).params
    assert h.assets.get_bytes(stored["initImage"]) == h.assets.get_bytes(h.store.get_avatar(src["id"]).result["images"][0]["key"])
    h.worker.run_once()
    h.client.post(f"/v1/avatars/{rx['id']}/publish", headers=bob)
    rx2 = h.client.post(f"/v1/avatars/{rx['id']}/remix", json={"prompt": "a blue fox"}, headers=alice).json()
    assert rx2["remixedFrom"] == rx["id"] and rx2["prompt"] == "a blue fox"
    h.worker.run_once()
    counts = {i: h.client.get(f"/v1/avatars/{i}", headers=alice).json()["remixes"] for i in (src["id"], rx["id"], rx2["id"])}
    assert counts == {src["id"]: 1, rx["id"]: 1, rx2["id"]: 0}
    assert h.client.get(f"/v1/avatars/{rx2['id']}", headers=alice).json()["status"] == "completed"


def test_storage_error_on_one_result_neither_loses_its_batch_mates_nor_sticks_the_job(db, tmp_path):
    """Saving one job's images fails: the other job of the batch still completes; the failing job
    goes back to the queue, and once its attempts are used it fails with its credits released."""
    h = db.harness(tmp_path)
    acct, auth = h.account(credits=10)
    good = h.client.post("/v1/avatars/generate", json={"prompt": "fine"}, headers=auth).json()["id"]
    bad = h.client.post("/v1/avatars/generate", json={"prompt": "doomed"}, headers=auth).json()["id"]
    put_image = h.assets.put_image

    def flaky_put(avatar_id, index, image, *args, **kwargs):
        if avatar_id == bad:
            raise OSError("disk full")
        return put_image(avatar_id, index, image, *args, **kwargs)

    h.assets.put_image = flaky_put
    report = h.worker.run_once()
    assert report.completed == [good] and report.retried == [bad]
    assert h.store.get_avatar(bad).status == "queued"
    for _ in range(h.settings.max_attempts - 1):
        h.worker.run_once()
    got = h.client.get(f"/v1/avatars/{bad}", headers=auth).json()
    assert got["status"] == "failed" and got["error"]["code"] == "internal_error"
    assert h.store.get_account(acct.id).credits == 8  # only the good job is charged


def test_store_blip_when_completing_is_retried_and_charged_once(db, tmp_path):
    h = db.harness(tmp_path)
    acct, auth = h.account(credits=10)
    av = h.client.post("/v1/avatars/generate", json={"prompt": "x"}, headers=auth).json()["id"]
    complete = h.store.complete_job
    blips = [ConnectionError("database restarting")]

    def blip_once(*args, **kwargs):
        if blips:
            raise blips.pop()
        return complete(*args, **kwargs)

    h.store.complete_job = blip_once
    assert h.worker.run_once().retried == [av]
    assert h.worker.run_once().completed == [av]
    assert [e.kind for e in h.store.ledger(acct.id)].count("charge") == 1
    assert h.store.get_account(acct.id).credits == 8


def test_private_avatar_of_another_account_is_closed_to_every_route(h):
    _, alice = h.account()
    _, bob = h.account()
    av = h.client.post("/v1/avatars/generate", json={"prompt": "x"}, headers=alice).json()["id"]
    h.worker.run_once()
    assert h.client.post(f"/v1/avatars/{av}/comment", json={"text": "mine"}, headers=alice).status_code == 201
    for method, path, body in [
        ("get", f"/v1/avatars/{av}/thumbnail", None), ("get", f"/v1/avatars/{av}/comments", None),
        ("post", f"/v1/avatars/{av}/like", None), ("delete", f"/v1/avatars/{av}/like", None),
        ("post", f"/v1/avatars/{av}/comment", {"text": "hi"}), ("post", f"/v1/avatars/{av}/remix", {}),
        ("post", f"/v1/avatars/{av}/publish", None),
    ]:
        assert_error(h.client.request(method, path, json=body, headers=bob), 403, "unauthorized_access")
    cast = {"prompt": "two friends", "characters": [{"prompt": "a", "avatarId": av}, {"prompt": "b", "avatarId": av}]}
    assert_error(h.client.post("/v1/avatars/cast", json=cast, headers=bob), 403, "unauthorized_access")
    got = h.store.get_avatar(av)
    assert (got.likes, got.comments, got.remixes) == (0, 1, 0)


def test_metrics_token_protects_the_scrape_endpoint(tmp_path):
    harness = Harness(tmp_path, metrics_token="s3cret-scrape")
    try:
        assert_error(harness.client.get("/metrics"), 401, "authentication_required")
        assert_error(harness.client.get("/metrics", headers={"Authorization": "Bearer wrong"}), 401,
                     "authentication_required")
        ok = harness.client.get("/metrics", headers={"Authorization": "Bearer s3cret-scrape"})
        assert ok.status_code == 200 and "avatar_http_requests_total" in ok.text
    finally:
        harness.store.close()


def test_every_log_line_of_a_job_names_the_request_that_started_it(tmp_path, caplog):
    """Ingress (accepted), worker (claimed, completed) and webhook dispatcher (delivery attempt)
    log under the submitting request's id, although they run in other threads (or processes)."""
    from serve.webhooks import WebhookDispatcher

    h = Harness(tmp_path, webhook_allow_private=True)
    try:
        _, auth = h.account()
        h.client.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/hook"}, headers=auth)
        with caplog.at_level(logging.INFO, logger="serve"):
            r = h.client.post("/v1/avatars/generate", json={"prompt": "x"}, headers=auth)
            rid, av = r.headers["x-request-id"], r.json()["id"]
            other = h.client.get("/v1/account", headers=auth).headers["x-request-id"]
            h.worker.run_once()
            WebhookDispatcher(h.store, h.settings.webhooks, retry_schedule=(60,)).run_once()
        about_job = [rec.getMessage() for rec in caplog.records if av in rec.getMessage()]
        assert len(about_job) >= 3 and all(m.startswith(f"[{rid}] ") for m in about_job), about_job
        tagged = {rec.name: rec.getMessage() for rec in caplog.records if rec.getMessage().startswith(f"[{rid}] ")}
        assert set(tagged) >= {"serve.submissions", "serve.worker", "serve.webhooks"}, tagged
        assert "avatar.completed" in tagged["serve.webhooks"]
        assert any("claimed" in m for m in about_job) and any("completed" in m for m in about_job)
        assert not any(other in rec.getMessage() for rec in caplog.records if rec.name != "serve.errors")
    finally:
        h.store.close()


def test_identity_method_is_checked_at_submit_stored_and_reported(tmp_path, tiny_engine):
    """identityMethod: a method the model does not offer (or no method at all) is a 400 naming
    it before any credit is reserved; an offered one is stored with the job, runs, and is
    reported on the avatar and in its identity report."""
    import numpy as np
    from skimage import data as skdata

    face = Image.fromarray(np.asarray(skdata.astronaut())).resize((256, 256))
    h = Harness(tmp_path, engine=tiny_engine)
    acct, auth = h.account(credits=200)
    health = h.client.get("/v1/health").json()
    assert health["models"][0]["identityMethods"] == ["faceid", "faceid-plus-v2"]
    photo = [("photo", ("me.jpg", _photo_bytes(face), "image/jpeg"))]
    for method in ("instantid", "photomaker"):
        r = h.client.post("/v1/avatars/percify-yourself", headers=auth, files=photo,
                          data={"identityMethod": method, "steps": "2"})
        assert_error(r, 400, "invalid_request", "identityMethod")
    cast_body = {"prompt": "two friends", "identityMethod": "instantid", "characters": [
        {"prompt": "a", "photos": [base64.b64encode(_photo_bytes(face)).decode()]}, {"prompt": "b"}]}
    assert_error(h.client.post("/v1/avatars/cast", json=cast_body, headers=auth), 400, "invalid_request",
                 "identityMethod")
    assert h.store.get_account(acct.id).credits == 200 and h.store.list_avatars(acct.id).items == []

    r = h.client.post("/v1/avatars/percify-yourself", headers=auth, files=photo,
                      data={"identityMethod": "faceid-plus-v2", "steps": "2", "seed": "3"})
    assert r.status_code == 202, r.text
    assert h.store.get_avatar(r.json()["id"]).params["identityMethod"] == "faceid-plus-v2"
    default = h.client.post("/v1/avatars/percify-yourself", headers=auth, files=photo, data={"steps": "2"})
    assert h.store.get_avatar(default.json()["id"]).params["identityMethod"] == "faceid"
    h.worker.drain()
    got = h.client.get(f"/v1/avatars/{r.json()['id']}", headers=auth).json()
    assert got["status"] == "completed", got
    assert got["identityMethod"] == "faceid-plus-v2" and got["identity"]["method"] == "faceid-plus-v2"
    assert h.client.get(f"/v1/avatars/{default.json()['id']}", headers=auth).json()["identity"]["method"] == "faceid"
