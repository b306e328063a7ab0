"""The contract details of issue 11 through the TestClient app: list envelopes with offset,
cursor and total (both stores), strict request types, `Allow` on 405, the declared bearer auth,
model aliases, the credits endpoints and the low-balance event, multipart forms as the schema
describes them."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from helpers import assert_error, png_bytes
from test_api import FakeEngine, Harness, db, h, hs  # noqa: F401  (fixtures)


def test_offset_and_cursor_pages_agree_and_total_counts_the_filtered_rows(h):
    _, auth = h.account(tier="enterprise", credits=1000)
    ids = [h.client.post("/v1/avatars/generate", json={"prompt": f"cat {i}", "seed": i}, headers=auth).json()["id"]
           for i in range(7)]
    h.client.post("/v1/avatars/generate", json={"prompt": "dog", "seed": 9}, headers=auth)
    by_offset = []
    for offset in (0, 3, 6):
        page = h.client.get("/v1/avatars", params={"limit": 3, "offset": offset, "search": "cat", "sortOrder": "asc"},
                            headers=auth).json()
        assert page["pagination"]["total"] == 7 and page["pagination"]["offset"] == offset
        assert page["pagination"]["limit"] == 3 and page["hasMore"] == page["pagination"]["hasMore"]
        by_offset += [a["id"] for a in page["avatars"]]
    assert by_offset == ids and not page["pagination"]["hasMore"]
    by_cursor, cursor, offsets = [], None, []
    while True:
        params = {"limit": 3, "search": "cat", "sortOrder": "asc", **({"cursor": cursor} if cursor else {})}
        page = h.client.get("/v1/avatars", params=params, headers=auth).json()
        offsets.append(page["pagination"]["offset"])
        by_cursor += [a["id"] for a in page["avatars"]]
        cursor = page["pagination"]["nextCursor"]
        if cursor is None:
            break
    assert by_cursor == ids and offsets == [0, 3, 6]
    # offset after a cursor skips further; a cursor continues its own order whatever sortOrder says
    first = h.client.get("/v1/avatars", params={"limit": 1, "sortOrder": "asc", "search": "cat"}, headers=auth).json()
    after = h.client.get("/v1/avatars", params={"limit": 2, "offset": 2, "cursor": first["nextCursor"],
                                                 "sortOrder": "desc", "search": "cat"}, headers=auth).json()
    assert [a["id"] for a in after["avatars"]] == ids[3:5] and after["pagination"]["offset"] == 3
    past = h.client.get("/v1/avatars", params={"offset": 50}, headers=auth).json()
    assert past["avatars"] == [] and past["pagination"]["total"] == 8 and not past["hasMore"]
    assert_error(h.client.get("/v1/avatars", params={"offset": -1}, headers=auth), 400, "invalid_request", "offset")
    assert_error(h.client.get("/v1/avatars", params={"cursor": "likes~desc~x~av_1"}, headers=auth), 400,
                 "invalid_request", "cursor")


def test_every_list_has_the_envelope(tmp_path):
    hs = Harness(tmp_path, webhook_allow_private=True)
    _, auth = hs.account(credits=100)
    av = hs.client.post("/v1/avatars/generate", json={"prompt": "x"}, headers=auth).json()
    hs.worker.run_once()
    hs.client.post(f"/v1/avatars/{av['id']}/publish", headers=auth)
    for i in range(3):
        hs.client.post(f"/v1/avatars/{av['id']}/comment", json={"text": f"c{i}"}, headers=auth)
    hs.client.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/h"}, headers=auth)
    for path, key, total in (("/v1/avatars", "avatars", 1), ("/v1/feed", "avatars", 1),
                             (f"/v1/avatars/{av['id']}/comments", "comments", 3), ("/v1/webhooks", "webhooks", 1),
                             ("/v1/user/credits/history", "transactions", 3)):
        body = hs.client.get(path, params={"limit": 2}, headers=auth).json()
        assert set(body) == {"object", key, "pagination", "hasMore", "nextCursor"}, path
        assert body["pagination"]["total"] == total and len(body[key]) == min(2, total), path
        if total > 2:
            rest = hs.client.get(path, params={"limit": 2, "cursor": body["nextCursor"]}, headers=auth).json()
            assert len(rest[key]) == total - 2 and rest["pagination"]["offset"] == 2, path
    hs.store.close()


@pytest.mark.parametrize("field, value", [("seed", "7"), ("batchSize", "2"), ("guidanceScale", True),
                                          ("seed", 7.5), ("steps", False), ("prompt", 5)])
def test_types_are_strict_and_name_the_field(hs, field, value):
    _, auth = hs.account()
    r = hs.client.post("/v1/avatars/generate", json={"prompt": "x", field: value}, headers=auth)
    assert_error(r, 400, "invalid_request", field)


def test_integers_written_as_whole_floats_are_integers(hs):
    _, auth = hs.account()
    r = hs.client.post("/v1/avatars/generate", json={"prompt": "x", "seed": 7.0, "batchSize": 2.0}, headers=auth)
    assert r.status_code == 202 and r.json()["seed"] == 7 and r.json()["batchSize"] == 2


def test_405_allow_is_the_schemas_methods(hs):
    _, auth = hs.account()
    spec = hs.client.get("/v1/openapi.json").json()
    for path, probe in (("/v1/avatars/generate", "/v1/avatars/generate"), ("/v1/avatars/{avatarId}", "/v1/avatars/av_x"),
                        ("/v1/avatars/{avatarId}/like", "/v1/avatars/av_x/like"), ("/v1/webhooks", "/v1/webhooks")):
        documented = {m.upper() for m in spec["paths"][path]}
        r = hs.client.put(probe, headers=auth)
        assert_error(r, 405, "method_not_allowed")
        assert set(r.headers["allow"].split(", ")) == documented, path
    # a concrete path wins over the template that would also match it
    r = hs.client.get("/v1/avatars/generate", headers=auth)
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_bearer_auth_is_declared_except_on_health(hs):
    spec = hs.client.get("/v1/openapi.json").json()
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "An API key: `Authorization: Bearer ak_live_…`"}
    assert spec["security"] == [{"bearerAuth": []}]
    assert spec["paths"]["/v1/health"]["get"]["security"] == []
    assert "security" not in spec["paths"]["/v1/avatars"]["get"]  # inherits the document's


def aliased_engine() -> FakeEngine:
    engine = FakeEngine()
    engine.profiles["fake"] = SimpleNamespace(**vars(engine.profiles["fake"]), aliases=["flux", "imagen3"])
    return engine


def test_aliases_resolve_report_both_names_and_filter(tmp_path):
    h = Harness(tmp_path, engine=aliased_engine())
    try:
        _, auth = h.account(credits=100)
        spec = h.client.get("/v1/openapi.json").json()
        assert spec["components"]["schemas"]["GenerateRequest"]["properties"]["model"]["anyOf"][0]["enum"] == [
            "fake", "flux", "imagen3"]
        health = h.client.get("/v1/health").json()
        assert health["models"][0]["aliases"] == ["flux", "imagen3"]
        av = h.client.post("/v1/avatars/generate", json={"prompt": "x", "model": "flux"}, headers=auth).json()
        assert (av["model"], av["modelProfile"], av["metadata"]["modelVersion"]) == ("flux", "fake", "fake")
        h.worker.run_once()
        done = h.client.get(f"/v1/avatars/{av['id']}", headers=auth).json()
        assert done["status"] == "completed" and done["model"] == "flux"
        assert h.client.get("/v1/avatars", params={"model": "imagen3"}, headers=auth).json()["pagination"]["total"] == 1
        plain = h.client.post("/v1/avatars/generate", json={"prompt": "x"}, headers=auth).json()
        assert plain["model"] == plain["modelProfile"] == "fake"
        err = assert_error(h.client.post("/v1/avatars/generate", json={"prompt": "x", "model": "dall-e"}, headers=auth),
                           400, "invalid_request", "model")
        assert "flux" in err["message"] and "fake" in err["message"]
    finally:
        h.store.close()


def test_credits_balance_history_and_low_balance_event_through_the_api(tmp_path):
    h = Harness(tmp_path, low_balance_threshold=5, webhook_allow_private=True)
    try:
        acct, auth = h.account(credits=8)
        h.client.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/h", "events": ["credits.low_balance"]},
                      headers=auth)
        a = h.client.post("/v1/avatars/generate", json={"prompt": "x"}, headers=auth).json()  # 8 -> 6
        h.worker.run_once()
        b = h.client.post("/v1/avatars/generate", json={"prompt": "y"}, headers=auth).json()  # 6 -> 4: crosses
        bal = h.client.get("/v1/user/credits/balance", headers=auth).json()
        assert bal == {"object": "credit_balance", "balance": 4, "reserved": 2, "lifetime": 2, "currentMonth": 2,
                       "granted": 8, "tier": "pro", "nextRefill": None, "lowBalanceThreshold": 5,
                       "usage": {"generate": {"count": 1, "credits": 2}}}
        assert bal["balance"] == h.client.get("/v1/account", headers=auth).json()["credits"]
        hist = h.client.get("/v1/user/credits/history", headers=auth).json()
        assert [(t["type"], t["operation"], t["avatarId"]) for t in hist["transactions"]] == [
            ("reserve", "generate", b["id"]), ("charge", "generate", a["id"]), ("reserve", "generate", a["id"]),
            ("grant", None, None)]
        assert sum(t["delta"] for t in hist["transactions"]) == 4
        events = [d for d in h.store.list_deliveries(acct.id) if d.event_type == "credits.low_balance"]
        assert len(events) == 1 and events[0].payload["data"]["object"]["balance"] == 4
        h.client.post("/v1/avatars/generate", json={"prompt": "z"}, headers=auth)  # 4 -> 2: no second event
        assert len([d for d in h.store.list_deliveries(acct.id) if d.event_type == "credits.low_balance"]) == 1
    finally:
        h.store.close()


def test_multipart_forms_take_what_their_schema_says(hs):
    _, auth = hs.account(credits=100)
    photo = png_bytes()
    # tags comma-separated, metadata a JSON part, a photo part without a filename
    body = (b"--B\r\nContent-Disposition: form-data; name=\"photo\"\r\nContent-Type: image/png\r\n\r\n" + photo +
            b"\r\n--B\r\nContent-Disposition: form-data; name=\"tags\"\r\n\r\na, b,,c\r\n"
            b"--B\r\nContent-Disposition: form-data; name=\"metadata\"\r\nContent-Type: application/json\r\n\r\n"
            b"{\"k\": 1}\r\n--B--\r\n")
    r = hs.client.post("/v1/avatars/percify-yourself", content=body,
                       headers={**auth, "content-type": "multipart/form-data; boundary=B"})
    assert r.status_code == 202, r.text
    assert r.json()["tags"] == ["a", "b", "c"] and r.json()["metadata"]["k"] == 1
    r = hs.client.post("/v1/avatars/percify-yourself", data={"tags": ",".join(["t"] * 21)},
                       files=[("photo", ("a.png", photo, "image/png"))], headers=auth)
    assert_error(r, 400, "invalid_request", "tags")
    spec = hs.client.get("/v1/openapi.json").json()
    form = spec["paths"]["/v1/avatars/percify-yourself"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert form["schema"]["additionalProperties"] is False and form["schema"]["properties"]["tags"]["type"] == "string"
    assert json.dumps(form["schema"]["properties"]["visibility"]).count("unlisted") == 1  # enums kept from the model


def test_unknown_query_parameters_and_nul_text_are_refused_as_the_schema_says(hs):
    _, auth = hs.account()
    err = assert_error(hs.client.get("/v1/avatars", params={"limt": 5}, headers=auth), 400, "invalid_request", "limt")
    assert "limit" in err["message"]
    assert hs.client.get("/v1/avatars", params={"limit": 5}, headers=auth).status_code == 200
    assert_error(hs.client.post("/v1/avatars/generate", json={"prompt": "a\u0000b"}, headers=auth), 400,
                 "invalid_request", "prompt")
    spec = hs.client.get("/v1/openapi.json").json()
    prompt = spec["components"]["schemas"]["GenerateRequest"]["properties"]["prompt"]
    assert {"pattern": "^[^\\x00]*$"} in prompt["allOf"]
