"""Schema fuzzing (marker `schema`, `make test-schema`): schemathesis generates requests from the
served `/v1/openapi.json` (valid ones, and for the negative checks invalid ones) and sends them
over HTTP to the app on 127.0.0.1, with the standard checks: no 5xx, status codes and content
types the schema declares, response bodies valid against it, schema-violating requests refused,
schema-valid ones accepted.

The app is the real one (FastAPI served by uvicorn on a free loopback port, SQLite store, asset
files, the real engine's profile table with the tiny model's aliases) without Ray: starting Ray
would only add minutes, and the HTTP contract is the same app's. No worker runs, so submissions
stay queued; the account is rich and its tier's limits are high so that credits and rate limits
do not hide other answers (both are covered in `test_api`). Webhook destinations: private ones
are allowed and host names resolve without DNS (`hermetic_resolver`), so nothing leaves 127.0.0.1;
no dispatcher runs, so nothing is delivered. Examples per operation are bounded
(`AVATAR_SCHEMA_EXAMPLES`, default 25) to keep the run to a few minutes on 2 cores; the schema
declares no examples, so only hypothesis' generate phase runs.

What a JSON Schema cannot state is supplied by the generator, never by loosening a check: real
face photos (the app checks for a usable face at submit; schemathesis' own image sample is a 1x1
PNG) for file parts and base64 photos, photo URLs pointing at a loopback server that serves one
(`real_photos`), at most 5 photos in all, and for cast, boxes that tile the frame and photo parts
only for existing characters (`_realistic_cast`). They rewrite only schema-valid values.
`Prefer: wait` is capped at 1 s here (no worker runs, so a waited job never ends).
"""
from __future__ import annotations

import base64
import os
import re
import socket
import tempfile
import threading
import time

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra (make install)")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

pytestmark = pytest.mark.schema

EXAMPLES = int(os.environ.get("AVATAR_SCHEMA_EXAMPLES", "25"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackServer:
    """The app under uvicorn on 127.0.0.1 in a background thread, with one rich account."""

    def __init__(self) -> None:
        import uvicorn

        from avatar_engine import AvatarEngine, EngineConfig
        from serve.app import create_app, event_renderer
        from serve.engine_client import LocalEngineClient
        from serve.settings import ServiceSettings
        from serve.store import open_store

        self.tmp = tempfile.mkdtemp(prefix="ae-schema-")
        settings_ = ServiceSettings.from_dict({
            "data_dir": self.tmp, "tiers": {"free": [10, 1], "pro": [60, 5], "enterprise": [1_000_000, 1_000_000]},
            "webhook_allow_private": True, "photo_fetch_allow_private": True, "max_wait_s": 1.0}, env=False)
        self.store = open_store(settings_.resolved_db_url, event_renderer=event_renderer())
        engine = AvatarEngine(EngineConfig(device="cpu"))  # profiles only: nothing is loaded or run
        app = create_app(settings_, self.store, LocalEngineClient(engine, None))
        acct = self.store.create_account("enterprise", 10**12)
        _, key = self.store.create_api_key(acct.id)
        self.auth = {"Authorization": f"Bearer {key}"}
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.store.close()


def published_schema() -> dict:
    """The document `GET /v1/openapi.json` serves (with the embedded default's model names),
    built without a database or a server (routes, wire models and the engine's profile table
    define it), so collecting this module starts nothing; a test checks the served one is equal."""
    import asyncio
    from types import SimpleNamespace

    from avatar_engine import AvatarEngine, EngineConfig
    from serve.api.openapi import served_document
    from serve.app import create_app
    from serve.engine_client import LocalEngineClient
    from serve.settings import ServiceSettings

    app = create_app(ServiceSettings.from_dict({"data_dir": tempfile.gettempdir()}, env=False), store=None,
                     engine_client=LocalEngineClient(AvatarEngine(EngineConfig(device="cpu")), None),
                     assets=SimpleNamespace(backend=None))
    return asyncio.run(served_document(app))


def face_photos() -> list[bytes]:
    """Real photos of a face (scikit-image's astronaut), a few crops and sizes, as PNG: what the
    schema cannot say about a photo (an image with a usable face, each side >= 64 px) is supplied
    as the generator of image parts and base64 photos instead of random bytes."""
    import io

    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.astronaut())
    out = []
    for box, side in (((0, 0, 512, 512), 256), ((60, 0, 420, 360), 256)):
        buf = io.BytesIO()
        img.crop(box).resize((side, side)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


PHOTOS = face_photos()


SPEC = published_schema()
schema = schemathesis.openapi.from_dict(SPEC)


def _box_ok(box) -> bool:
    return (isinstance(box, list) and len(box) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in box))


def _realistic_cast(body) -> None:
    """Cast bodies: what the schema cannot state across fields — boxes that tile the frame
    without overlapping (all characters or none; only with `auto`/`custom` layouts) and photo
    parts only for existing characters — is made so. Only schema-valid boxes are rewritten, so a
    negative case stays negative."""
    if not isinstance(body, dict) or not isinstance(body.get("characters"), list):
        return
    chars = body["characters"]
    if not all(isinstance(c, dict) for c in chars) or not 2 <= len(chars) <= 4:
        return
    boxes = [c.get("box") for c in chars if c.get("box") is not None]
    if not all(_box_ok(b) for b in boxes):
        return
    wants_boxes = bool(boxes) or body.get("layout") == "custom"
    if wants_boxes and body.get("layout") in ("columns", "rows"):
        wants_boxes = False
    n = len(chars)
    for i, c in enumerate(chars):
        if wants_boxes:
            c["box"] = [i / n, 0.0, (i + 1) / n, 1.0]  # columns: no overlap, each side >= 1/4
        else:
            c.pop("box", None)
    for key in [k for k in body if re.fullmatch(r"photo[0-9]+", k) and int(k[5:]) >= n]:
        del body[key]


@schema.hook("map_body")
def real_photos(context, body):
    """Photos as the app needs them and the schema cannot say (an image with a usable face):
    generated file parts become face photos, base64/URL strings in `photos` become a base64 face
    photo, `photoUrl`/`imageUrl`/`photoUrls` the loopback photo server's URL, at most 5 photos in all. Only
    schema-valid values are rewritten, so a negative case stays negative."""
    from schemathesis.transport.serialization import Binary

    def real(i: int, v):
        return PHOTOS[i % len(PHOTOS)] if isinstance(v, (bytes, bytearray, Binary)) else v

    def b64(v):
        return base64.b64encode(PHOTOS[0]).decode() if isinstance(v, str) else v

    def url(v):
        return PHOTO_SERVER.url if isinstance(v, str) and PHOTO_SERVER is not None else v

    if not isinstance(body, dict):
        return body
    _realistic_cast(body)
    for key, value in list(body.items()):
        if re.fullmatch(r"photo[0-9]*", key):
            body[key] = [real(i, v) for i, v in enumerate(value)] if isinstance(value, list) else real(0, value)
        elif key == "photos" and isinstance(value, list) and len(value) <= 5:
            body[key] = [b64(v) for v in value]
        elif key in ("photoUrl", "imageUrl") and isinstance(value, str) and 1 <= len(value) <= 2000:
            body[key] = url(value)
        elif key == "photoUrls" and isinstance(value, list) and len(value) <= 5:
            body[key] = [url(v) for v in value]
    for c in body.get("characters") or []:
        if isinstance(c, dict) and isinstance(c.get("photos"), list) and len(c["photos"]) <= 5:
            c["photos"] = [b64(v) for v in c["photos"]]
    def total() -> int:
        return sum(len(body[k]) if isinstance(body.get(k), list) else int(k in body)
                   for k in ("photo", "photos", "photoUrl", "imageUrl", "photoUrls"))

    for key in ("photoUrls", "photoUrl", "imageUrl", "photos", "photo"):  # at most 5 photos in all
        while total() > 5 and key in body:
            if isinstance(body[key], list) and len(body[key]) > 1:
                body[key].pop()
            else:
                del body[key]
    return body


def hermetic_resolver(host: str, port: int) -> list[str]:
    """Every host "resolves" to 127.0.0.1 without a DNS query: fuzzed host names never leave the
    machine. Webhook endpoints are only created (no dispatcher runs); photo URLs are rewritten to
    the loopback photo server before they are sent (`real_photos`). (Destination policy — DNS,
    private ranges — is deployment configuration the schema cannot state; `test_webhooks`,
    `test_api` and `test_photo_intake` cover the refusals.)"""
    return ["127.0.0.1"]


class PhotoServer:
    """Serves a face photo on 127.0.0.1 for every GET: the target of fuzzed photo URLs."""

    def __init__(self) -> None:
        import http.server

        photo = PHOTOS[0]

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_response(200)
                self.send_header("content-type", "image/png")
                self.send_header("content-length", str(len(photo)))
                self.end_headers()
                self.wfile.write(photo)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/face.png"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


PHOTO_SERVER: PhotoServer | None = None


@pytest.fixture(scope="module")
def server():
    mp = pytest.MonkeyPatch()
    mp.setattr("serve.destinations._default_resolver", hermetic_resolver)
    global PHOTO_SERVER
    PHOTO_SERVER = PhotoServer()
    srv = LoopbackServer()
    yield srv
    srv.close()
    PHOTO_SERVER.close()
    mp.undo()


def test_the_served_document_is_the_one_fuzzed(server):
    import httpx

    assert httpx.get(f"{server.url}/v1/openapi.json").json() == SPEC


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck), phases=[Phase.generate])
def test_the_app_keeps_the_contract_it_publishes(case, server):
    case.call_and_validate(base_url=server.url, headers=server.auth)


def test_the_standard_checks_and_both_generation_modes_are_on():
    from schemathesis.checks import CHECKS, load_all_checks

    load_all_checks()
    op = schema["/v1/avatars/generate"]["POST"]
    config = op.schema.config.checks_config_for(operation=op, phase=None)
    enabled = {n for n in CHECKS.get_all_names() if config.get_by_name(name=n).enabled}
    assert enabled >= {"not_a_server_error", "status_code_conformance", "content_type_conformance",
                       "response_schema_conformance", "negative_data_rejection", "positive_data_acceptance",
                       "allow_header_conformance", "unsupported_method", "ignored_auth"}
    modes = {m.value for m in op.schema.config.generation_for(operation=op).modes}
    assert modes == {"positive", "negative"}
