"""A client written only from Percify's documented API shapes (docs/api.md, "Percify
compatibility"), run unchanged against the app: generate → poll → read `imageUrl`, list with
`offset` and `pagination.total`, patch, publish, like, comment, remix, delete, errors, credits.

It reads only documented field names, never our own extras (`data`, `object`, `images`...), so a
rename on our side that a Percify client would notice fails here. The app is the real one
(TestClient, real SQLite store, real worker) with the fake painting engine of `test_api`, whose
profile declares Percify's model names as aliases, as the embedded models.yaml does for `tiny-sd15`.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from test_api import FakeEngine, Harness


class PercifyClient:
    """What a user migrating from Percify writes: bearer key, JSON, the docs' field names."""

    def __init__(self, http, api_key_header: dict[str, str]):
        self.http, self.auth = http, api_key_header

    def _call(self, method: str, path: str, **kw):
        r = self.http.request(method, f"/v1{path}", headers=self.auth, **kw)
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else None
        if r.status_code >= 400:
            raise PercifyError(r.status_code, body["error"]["code"], body["error"].get("param"))
        return body

    def generate(self, **params):
        return self._call("POST", "/avatars/generate", json=params)

    def get(self, avatar_id):
        return self._call("GET", f"/avatars/{avatar_id}")

    def list(self, **params):
        return self._call("GET", "/avatars", params=params)

    def update(self, avatar_id, **fields):
        return self._call("PATCH", f"/avatars/{avatar_id}", json=fields)

    def publish(self, avatar_id):
        return self._call("POST", f"/avatars/{avatar_id}/publish")

    def like(self, avatar_id):
        return self._call("POST", f"/avatars/{avatar_id}/like")

    def comment(self, avatar_id, text):
        return self._call("POST", f"/avatars/{avatar_id}/comment", json={"text": text})

    def remix(self, avatar_id, **params):
        return self._call("POST", f"/avatars/{avatar_id}/remix", json=params)

    def delete(self, avatar_id):
        return self._call("DELETE", f"/avatars/{avatar_id}")

    def balance(self):
        return self._call("GET", "/user/credits/balance")

    def history(self, **params):
        return self._call("GET", "/user/credits/history", params=params)


class PercifyError(Exception):
    def __init__(self, status: int, code: str, param: str | None):
        super().__init__(f"{status} {code} ({param})")
        self.status, self.code, self.param = status, code, param


class AliasedEngine(FakeEngine):
    """The fake engine with Percify's model names declared as aliases of its one profile."""

    def __init__(self):
        super().__init__()
        p = self.profiles["fake"]
        self.profiles["fake"] = SimpleNamespace(**vars(p), aliases=["flux", "imagen3", "reality4"])


@pytest.fixture
def world(tmp_path):
    h = Harness(tmp_path, engine=AliasedEngine(), low_balance_threshold=0)
    yield h
    h.store.close()


def poll(client: PercifyClient, avatar_id: str, worker) -> dict:
    """The docs' polling loop; the worker steps in between instead of wall-clock sleeps."""
    for _ in range(10):
        av = client.get(avatar_id)
        if av["status"] in ("completed", "failed"):
            return av
        worker.run_once()
    raise AssertionError("never finished")


def test_a_client_written_from_percifys_docs_runs_unchanged(world):
    _, key = world.account(credits=100)
    _, other_key = world.account(credits=100)
    me, fan = PercifyClient(world.client, key), PercifyClient(world.client, other_key)

    # Generate with the docs' default model name and parameters.
    created = me.generate(prompt="a portrait of a fox", model="flux", aspectRatio="1:1", guidanceScale=10, seed=7,
                          batchSize=2, stylePreset="anime", negativePrompt="blurry")
    assert created["status"] == "queued" and created["id"].startswith("av_")
    assert created["creditsUsed"] == created["creditCost"] == 4 and created["model"] == "flux"
    assert created["userId"] and created["imageUrl"] is None
    done = poll(me, created["id"], world.worker)
    assert done["status"] == "completed" and done["userId"] == created["userId"]
    assert done["imageUrl"] and done["thumbnailUrl"] and done["seed"] == 7
    assert done["metadata"]["modelVersion"] and isinstance(done["metadata"]["generationTime"], (int, float))
    assert world.client.get(done["imageUrl"], headers=me.auth).headers["content-type"] == "image/png"
    spent = created["creditsUsed"]
    for name in ("imagen3", "reality4"):
        other = me.generate(prompt="x", model=name, seed=1)
        assert other["model"] == name and other["metadata"]["modelVersion"] == done["metadata"]["modelVersion"]
        spent += other["creditsUsed"]

    # List with offset, read pagination.total.
    first = me.list(limit=2, offset=0, sortBy="createdAt", sortOrder="asc")
    second = me.list(limit=2, offset=2, sortBy="createdAt", sortOrder="asc")
    assert first["pagination"]["total"] == second["pagination"]["total"] == 3
    assert first["pagination"]["hasMore"] and not second["pagination"]["hasMore"]
    assert [a["id"] for a in first["avatars"]][0] == created["id"] and len(second["avatars"]) == 1
    assert {a["id"] for a in first["avatars"]}.isdisjoint(a["id"] for a in second["avatars"])
    assert me.list(status="completed")["pagination"]["total"] == 1

    # Patch, publish, like, comment, remix, delete.
    patched = me.update(created["id"], title="Fox", tags=["fox"], metadata={"campaign": "spring"})
    assert patched["title"] == "Fox" and patched["metadata"]["campaign"] == "spring"
    published = me.publish(created["id"])
    assert published["published"] and published["publishedAt"] and published["visibility"] == "public"
    assert fan.like(created["id"])["likes"] == 1
    assert fan.comment(created["id"], "love it")["text"] == "love it"
    remix = fan.remix(created["id"], prompt="a fox in winter", seed=3)
    assert remix["status"] == "queued" and remix["remixedFrom"] == created["id"] and remix["creditsUsed"] >= 1
    assert fan.get(created["id"])["remixes"] == 1

    # Credits, Percify's user API.
    bal = me.balance()
    assert bal["balance"] == 100 - spent and bal["tier"] == "pro"
    assert bal["lifetime"] == created["creditsUsed"] and bal["usage"]["generate"]["count"] == 1
    history = me.history(limit=2)
    assert history["pagination"]["total"] == 5  # grant, 3 reserves, 1 charge
    assert history["transactions"][0]["type"] in ("reserve", "charge", "grant")

    # Errors as the docs list them.
    with pytest.raises(PercifyError) as e:
        me.generate(prompt="x", model="dall-e-9")
    assert (e.value.status, e.value.code, e.value.param) == (400, "invalid_request", "model")
    with pytest.raises(PercifyError) as e:
        me.get("av_doesnotexist")
    assert (e.value.status, e.value.code) == (404, "avatar_not_found")
    with pytest.raises(PercifyError) as e:
        fan.update(created["id"], title="mine now")
    assert (e.value.status, e.value.code) == (403, "unauthorized_access")
    with pytest.raises(PercifyError) as e:
        PercifyClient(world.client, {"Authorization": "Bearer nope"}).list()
    assert (e.value.status, e.value.code) == (401, "authentication_required")

    assert me.delete(created["id"])["deleted"] is True
    with pytest.raises(PercifyError) as e:
        me.get(created["id"])
    assert e.value.code == "avatar_not_found"
