"""The wire format, pinned: one scripted session (every endpoint family, success and error
answers, idempotent replays, rate limits) replayed through the app, its responses normalised
(random ids → `av_#n` in order of appearance, timings → N) and compared line by line with
`fixtures/wire_transcript.txt`, which the app before the serve/ refactor (b0cb314) produced
(plus `"engine":null` in `/v1/health`'s models, which the engine-speed work added since), and
which issue 11 changed on purpose: absolute image URLs, signed for private avatars (normalised
to `expires=E&signature=S`), `progress` on the Avatar, image GETs without a header, the event
stream and `Prefer: wait`; selectable identity methods added `"identityMethods":[]` to
`/v1/health`'s models and `"identityMethod":null` to avatars; and the Percify-compatible shapes
(`userId`, `imageUrl`, `modelProfile`, `creditsUsed`, `metadata.modelVersion`/`generationTime`,
list envelopes with `pagination`, credits endpoints, strict types, the schema's `Allow`); the
PNG encoder's change (libpng with zlib's RLE strategy) changed the images' byte counts only.
The studio's job control (issue 23) added `creditsUsed`, `queuePosition` and `cancelRequested` to
every Avatar object (19 lines; nothing else changed). Style packs (issue 24) added `styleStrength`
and `style` (both null here: the fake engine reports no style) beside `stylePreset` on every Avatar
object (the same 19 lines), and `/v1/health`'s models list their `styles` (the fake engine's: the six
built-ins); nothing else changed. Marked PNGs going through the service's libpng encoder (they went
through Pillow's) changed the three image answers' byte counts only.
A change to any status, header or body byte of these answers fails here.

Regenerate deliberately: `python tests/test_wire.py > tests/fixtures/wire_transcript.txt`.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "fixtures" / "wire_transcript.txt"
_HEADERS = ("content-type", "location", "retry-after", "ratelimit", "ratelimit-policy", "idempotent-replayed",
            "cache-control", "etag", "www-authenticate", "allow", "preference-applied")


def _png(color=(10, 20, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (96, 96), color).save(buf, format="PNG")
    return buf.getvalue()


def transcript(tmp: Path) -> list[str]:
    sys.path.insert(0, str(HERE))
    from test_api import Harness
    try:
        from helpers import FakeClock
    except ImportError:  # the tree before the refactor
        from fakes import FakeClock

    clock = FakeClock(1_800_000_000.0)
    # Content Credentials carry a fresh signature and certificate per run (their byte count varies
    # by a byte or two); the transcript pins the HTTP contract, marking is tested in test_provenance
    # and test_safety_service.
    h = Harness(tmp, store_kwargs={"clock": clock}, webhook_allow_private=True, provenance_credentials=False,
                tiers={"free": {"requests_per_minute": 3, "concurrent_jobs": 1}, "pro": [1000, 100]})
    out: list[str] = []
    ids: dict[str, str] = {}

    def norm(text: str) -> str:
        text = re.sub(r"\b(av|cm|wh|acct|req|key|up|msg|evt)_[A-Za-z0-9]{8,}",
                      lambda m: ids.setdefault(m.group(0), f"{m.group(1)}_#{len(ids)}"), text)
        text = re.sub(r'"(generationMs|queuedMs)":\d+', r'"\1":N', text)
        text = re.sub(r'"generationTime":[0-9.]+', '"generationTime":N', text)
        text = re.sub(r"whsec_[A-Za-z0-9+/=]+", "whsec_S", text)
        text = re.sub(r"expires=\d+&signature=[0-9a-f]{64}", "expires=E&signature=S", text)  # signed image links
        return re.sub(r'"nextCursor":"[^"]+"', '"nextCursor":"C"', text)

    def rec(label, r):
        clock.advance(1)  # distinct timestamps: list orders never hinge on random ids
        hdr = {k: v for k, v in r.headers.items() if k in _HEADERS}
        ctype = r.headers.get("content-type", "")
        textual = "json" in ctype or "event-stream" in ctype  # streams normalised like JSON (timings vary)
        body = r.content.decode().replace("\n", "\\n") if textual else f"<{ctype} {len(r.content)} bytes>"
        out.append(norm(f"{label} {r.status_code} {json.dumps(hdr, sort_keys=True)} {body}"))

    c = h.client
    _, alice = h.account(credits=100)
    _, bob = h.account(credits=5)
    _, free = h.account(tier="free", credits=10)
    rec("health", c.get("/v1/health"))
    rec("account", c.get("/v1/account", headers=alice))
    rec("no-auth", c.get("/v1/account"))
    rec("generate", c.post("/v1/avatars/generate", headers=alice, json={
        "prompt": "a fox", "seed": 1, "batchSize": 2, "stylePreset": "anime", "tags": ["x"]}))
    av = re.search(r'"id":"(av_\w+)"', c.get("/v1/avatars", headers=alice).text).group(1)
    rec("get-queued", c.get(f"/v1/avatars/{av}", headers=alice))
    h.worker.run_once()
    rec("get-completed", c.get(f"/v1/avatars/{av}", headers=alice))
    rec("image", c.get(f"/v1/avatars/{av}/images/0", headers=alice))
    rec("image-webp", c.get(f"/v1/avatars/{av}/images/1?format=webp", headers=alice))
    rec("image-404", c.get(f"/v1/avatars/{av}/images/9", headers=alice))
    signed = c.get(f"/v1/avatars/{av}", headers=alice).json()["images"][0]["url"].replace("http://testserver", "")
    rec("image-signed-no-header", c.get(signed))
    rec("image-no-header", c.get(f"/v1/avatars/{av}/images/0"))
    rec("events-completed", c.get(f"/v1/avatars/{av}/events", headers=alice))
    rec("thumbnail", c.get(f"/v1/avatars/{av}/thumbnail", headers=alice))
    rec("other-get", c.get(f"/v1/avatars/{av}", headers=bob))
    rec("other-patch", c.patch(f"/v1/avatars/{av}", json={"title": "t"}, headers=bob))
    rec("other-delete", c.delete(f"/v1/avatars/{av}", headers=bob))
    rec("other-publish", c.post(f"/v1/avatars/{av}/publish", headers=bob))
    rec("missing", c.get("/v1/avatars/av_nope", headers=alice))
    rec("missing-patch", c.patch("/v1/avatars/av_nope", json={"title": "t"}, headers=alice))
    rec("patch", c.patch(f"/v1/avatars/{av}", json={"title": "Hero", "tags": ["a"], "metadata": {"k": 1}}, headers=alice))
    rec("patch-null", c.patch(f"/v1/avatars/{av}", json={"tags": None}, headers=alice))
    rec("patch-unknown", c.patch(f"/v1/avatars/{av}", json={"prompt": "y"}, headers=alice))
    rec("publish", c.post(f"/v1/avatars/{av}/publish", headers={**alice, "Idempotency-Key": "p1"}))
    rec("publish-replay", c.post(f"/v1/avatars/{av}/publish", headers={**alice, "Idempotency-Key": "p1"}))
    rec("image-public-no-header", c.get(f"/v1/avatars/{av}/images/0"))
    rec("like", c.post(f"/v1/avatars/{av}/like", headers=bob))
    rec("like-again", c.post(f"/v1/avatars/{av}/like", headers=bob))
    rec("comment", c.post(f"/v1/avatars/{av}/comment", json={"text": "nice"}, headers=bob))
    rec("comment-policy", c.post(f"/v1/avatars/{av}/comment", json={"text": "so nsfw"}, headers=bob))
    rec("comments", c.get(f"/v1/avatars/{av}/comments", headers=bob))
    rec("unlike", c.delete(f"/v1/avatars/{av}/like", headers=bob))
    rec("feed", c.get("/v1/feed", params={"sort": "mostLiked"}, headers=bob))
    rec("remix", c.post(f"/v1/avatars/{av}/remix", json={"strength": 0.5, "seed": 3}, headers=bob))
    rec("insufficient", c.post("/v1/avatars/generate", json={"prompt": "x", "batchSize": 4, "seed": 2}, headers=bob))
    rec("invalid", c.post("/v1/avatars/generate", json={"prompt": "x", "guidanceScale": 99}, headers=alice))
    rec("unknown-field", c.post("/v1/avatars/generate", json={"prompt": "x", "colour": "red"}, headers=alice))
    rec("bad-json", c.post("/v1/avatars/generate", content=b"{", headers={**alice, "content-type": "application/json"}))
    rec("policy", c.post("/v1/avatars/generate", json={"prompt": "a naked man"}, headers=alice))
    rec("idem-first", c.post("/v1/avatars/generate", json={"prompt": "y", "seed": 5}, headers={**alice, "Idempotency-Key": "k"}))
    rec("idem-replay", c.post("/v1/avatars/generate", json={"seed": 5, "prompt": "y"}, headers={**alice, "Idempotency-Key": "k"}))
    rec("idem-other", c.post("/v1/avatars/generate", json={"prompt": "z", "seed": 5}, headers={**alice, "Idempotency-Key": "k"}))
    b64 = base64.b64encode(_png()).decode()
    rec("percify-json", c.post("/v1/avatars/percify-yourself", json={"photos": [b64], "seed": 4}, headers=alice))
    rec("percify-multipart", c.post("/v1/avatars/percify-yourself", data={"seed": "4", "identityStrength": "0.5"},
                                    files=[("photo", ("a.png", _png(), "image/png"))], headers=alice))
    rec("percify-bad-photo", c.post("/v1/avatars/percify-yourself", files=[("photo", ("a.png", b"no", "image/png"))],
                                    headers=alice))
    rec("percify-415", c.post("/v1/avatars/percify-yourself", content=b"x", headers={**alice, "content-type": "text/plain"}))
    rec("cast", c.post("/v1/avatars/cast", headers=alice, json={
        "prompt": "duo", "seed": 6, "characters": [{"prompt": "a", "photos": [b64]}, {"prompt": "b", "avatarId": av}]}))
    rec("cast-one", c.post("/v1/avatars/cast", json={"prompt": "duo", "characters": [{"prompt": "a"}]}, headers=alice))
    h.worker.drain()
    rec("list", c.get("/v1/avatars", params={"limit": 3, "sortOrder": "asc"}, headers=alice))
    rec("list-filtered", c.get("/v1/avatars", params={"kind": "percify", "sortOrder": "asc"}, headers=alice))
    rec("list-bad-cursor", c.get("/v1/avatars", params={"cursor": "x"}, headers=alice))
    rec("webhook", c.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/h", "events": ["avatar.completed"]}, headers=alice))
    rec("webhooks", c.get("/v1/webhooks", headers=alice))
    rec("webhook-404", c.get("/v1/webhooks/wh_nope", headers=alice))
    rec("webhook-refused", c.post("/v1/webhooks", json={"url": "ftp://example.com"}, headers=alice))
    rec("list-offset", c.get("/v1/avatars", params={"limit": 2, "offset": 1, "sortOrder": "asc"}, headers=alice))
    after_first = c.get("/v1/avatars", params={"limit": 1, "sortOrder": "asc"}, headers=alice).json()["nextCursor"]
    rec("list-cursor-and-offset", c.get("/v1/avatars", params={"limit": 1, "offset": 1, "cursor": after_first},
                                        headers=alice))
    rec("credits-balance", c.get("/v1/user/credits/balance", headers=alice))
    # the oldest entries: the order of charges within one worker batch is not fixed
    rec("credits-history", c.get("/v1/user/credits/history", params={"limit": 3, "offset": 8}, headers=alice))
    rec("strict-types", c.post("/v1/avatars/generate", json={"prompt": "x", "seed": "7"}, headers=alice))
    rec("405", c.put("/v1/avatars/generate", headers=alice))
    rec("405-avatar", c.put(f"/v1/avatars/{av}", headers=alice))
    rec("404", c.get("/v1/nope", headers=alice))
    for i in range(4):
        rec(f"free-{i}", c.get("/v1/account", headers=free))
    rec("generate-wait-1s", c.post("/v1/avatars/generate", json={"prompt": "w", "seed": 8},
                                   headers={**alice, "Prefer": "wait=1"}))
    rec("delete", c.delete(f"/v1/avatars/{av}", headers=alice))
    rec("image-after-delete", c.get(signed))
    rec("deleted", c.get(f"/v1/avatars/{av}", headers=alice))
    h.store.close()
    return out


def test_responses_match_the_pinned_transcript(tmp_path):
    got = transcript(tmp_path)
    want = GOLDEN.read_text(encoding="utf-8").splitlines()
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"line {i + 1} differs:\n got: {g}\nwant: {w}"
    assert len(got) == len(want)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print("\n".join(transcript(Path(tempfile.mkdtemp()))))
