"""Percify-yourself intake like Percify's docs: photos by URL, fetched through the webhooks' SSRF
guard (a loopback image server, allowed by `photo_fetch_allowlist` as the webhook tests allow
theirs), and photos without a usable face refused at submit — 400 naming the photo, before any
credit is reserved — by the engine's own face analyzer (the real embedded one)."""
from __future__ import annotations

import base64
import contextlib
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from serve.destinations import FetchRefused, fetch_url

from helpers import assert_error, png_bytes
from test_api import FakeEngine, Harness


def face_png() -> bytes:
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((256, 256)).save(buf, format="PNG")  # small: detection is the cost
    return buf.getvalue()


class FaceEngine(FakeEngine):
    """The fake engine, describing the real embedded face analyzer as its own (as AvatarEngine does)."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(face_backend="embedded")


@contextlib.contextmanager
def image_server(routes: dict):
    """127.0.0.1 HTTP server: path → (status, headers, body)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            status, headers, body = routes.get(self.path, (404, {}, b""))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v.format(port=self.server.server_address[1]))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def face():
    return face_png()


@pytest.fixture
def server(face):
    png = {"Content-Type": "image/png"}
    routes = {
        "/face.png": (200, png, face),
        "/blank.png": (200, png, png_bytes((128, 128))),
        "/page.html": (200, {"Content-Type": "text/html"}, b"<html>not an image</html>"),
        "/to-face": (302, {"Location": "/face.png"}, b""),
        "/to-private": (302, {"Location": "http://127.0.0.1:{port}/face.png"}, b""),
        "/missing.png": (404, {}, b""),
    }
    with image_server(routes) as (base, port):
        yield base, port


def test_fetch_url_guard(server, face):
    base, port = server
    allowed = dict(max_bytes=10_000_000, timeout_s=10, allowlist=["127.0.0.1"])
    assert fetch_url(f"{base}/face.png", **allowed) == face
    assert fetch_url(f"{base}/to-face", **allowed) == face  # a redirect, re-vetted
    with pytest.raises(FetchRefused, match="loopback"):
        fetch_url(f"{base}/face.png", max_bytes=10_000_000, timeout_s=10)  # loopback not allowed by default
    # A redirect from an allowed host name to an address that is not allowed is refused.
    with pytest.raises(FetchRefused, match="127.0.0.1"):
        fetch_url(f"http://localhost:{port}/to-private", max_bytes=10_000_000, timeout_s=10,
                  allowlist=["localhost"], resolver=lambda host, p: ["127.0.0.1"])
    with pytest.raises(FetchRefused, match="limit"):
        fetch_url(f"{base}/face.png", max_bytes=1000, timeout_s=10, allowlist=["127.0.0.1"])
    with pytest.raises(FetchRefused, match="not an image"):
        fetch_url(f"{base}/page.html", **allowed)
    with pytest.raises(FetchRefused, match="HTTP 404"):
        fetch_url(f"{base}/missing.png", **allowed)
    with pytest.raises(FetchRefused, match="scheme"):
        fetch_url("file:///etc/passwd", **allowed)
    with pytest.raises(FetchRefused, match="private"):
        fetch_url("http://10.0.0.1/x.png", max_bytes=10, timeout_s=1, resolver=lambda host, p: ["10.0.0.1"])


def test_percify_with_photo_urls(tmp_path, server):
    base, _ = server
    h = Harness(tmp_path, engine=FaceEngine(), photo_fetch_allowlist=["127.0.0.1"])
    acct, auth = h.account(credits=100)
    r = h.client.post("/v1/avatars/percify-yourself", headers=auth,
                      json={"prompt": "me as a knight", "photoUrl": f"{base}/face.png"})
    assert r.status_code == 202, r.text
    av = h.store.get_avatar(r.json()["id"])
    assert len(av.params["photos"]) == 1 and h.assets.exists(av.params["photos"][0])  # stored as an upload
    r = h.client.post("/v1/avatars/percify-yourself", headers=auth,
                      json={"photos": [f"{base}/to-face"], "photoUrls": [f"{base}/face.png"]})
    assert r.status_code == 202, r.text
    assert len(h.store.get_avatar(r.json()["id"]).params["photos"]) == 2
    r = h.client.post("/v1/avatars/percify-yourself", headers=auth,
                      files=[("photoUrl", (None, f"{base}/face.png")), ("prompt", (None, "me"))])
    assert r.status_code == 202, r.text  # multipart with a URL field and no file part


def test_photo_urls_refused_through_the_guard_before_credits(tmp_path, server):
    base, _ = server
    h = Harness(tmp_path, engine=FaceEngine())  # loopback not allowed
    acct, auth = h.account(credits=100)
    err = assert_error(h.client.post("/v1/avatars/percify-yourself", headers=auth,
                                     json={"photoUrl": f"{base}/face.png"}), 400, "invalid_request", "photoUrl")
    assert "loopback" in err["message"]
    h2 = Harness(tmp_path / "b", engine=FaceEngine(), photo_fetch_allowlist=["127.0.0.1"], max_photo_bytes=2000)
    _, auth2 = h2.account(credits=100)
    assert_error(h2.client.post("/v1/avatars/percify-yourself", headers=auth2,
                                json={"photoUrls": [f"{base}/face.png"]}), 400, "invalid_request", "photoUrls[0]")
    assert_error(h2.client.post("/v1/avatars/percify-yourself", headers=auth2,
                                json={"photos": [f"{base}/page.html"]}), 400, "invalid_request", "photos[0]")
    assert_error(h2.client.post("/v1/avatars/percify-yourself", headers=auth2, json={}), 400, "invalid_request",
                 "photos")
    assert h.store.get_account(acct.id).credits == 100


def test_photo_without_a_face_is_refused_at_submit_before_credits(tmp_path, server, face):
    base, _ = server
    h = Harness(tmp_path, engine=FaceEngine(), photo_fetch_allowlist=["127.0.0.1"])
    acct, auth = h.account(credits=100)
    blank = base64.b64encode(png_bytes((128, 128))).decode()
    good = base64.b64encode(face).decode()
    err = assert_error(h.client.post("/v1/avatars/percify-yourself", headers=auth, json={"photos": [good, blank]}),
                       400, "invalid_request", "photos[1]")
    assert "no face" in err["message"]
    assert_error(h.client.post("/v1/avatars/percify-yourself", headers=auth,
                               json={"photos": [good], "photoUrl": f"{base}/blank.png"}), 400, "invalid_request",
                 "photoUrl")
    assert_error(h.client.post("/v1/avatars/percify-yourself", headers=auth,
                               files=[("photo", ("a.png", face, "image/png")), ("photo", ("b.png", png_bytes((128, 128)), "image/png"))]),
                 400, "invalid_request", "photo[1]")
    # Nothing reserved, nothing queued, no upload left behind.
    assert h.store.get_account(acct.id).credits == 100
    assert h.store.list_avatars(acct.id).items == []
    assert "reserve" not in [e.kind for e in h.store.ledger(acct.id)]
    assert not (tmp_path / "assets" / "uploads").exists() or not any((tmp_path / "assets" / "uploads").iterdir())
    ok = h.client.post("/v1/avatars/percify-yourself", headers=auth, json={"photos": [good]})
    assert ok.status_code == 202
    assert h.store.get_account(acct.id).credits == 100 - h.settings.cost_percify  # reserved once, for the good one
    assert [e.kind for e in h.store.ledger(acct.id)].count("reserve") == 1


def test_cast_character_photo_without_a_face_is_refused_at_submit(tmp_path, server, face):
    """Cast checks each character's photos as percify does: the 400 names the character's photo
    as the request gave it (JSON field, URL or file part), before any credit is reserved."""
    base, _ = server
    h = Harness(tmp_path, engine=FaceEngine(), photo_fetch_allowlist=["127.0.0.1"])
    acct, auth = h.account(credits=100)
    good = base64.b64encode(face).decode()
    blank = base64.b64encode(png_bytes((128, 128))).decode()
    chars = [{"prompt": "a knight", "photos": [good]}, {"prompt": "a wizard", "photos": [good, blank]}]
    err = assert_error(h.client.post("/v1/avatars/cast", headers=auth, json={"prompt": "duel", "characters": chars}),
                       400, "invalid_request", "characters[1].photos[1]")
    assert "no face" in err["message"]
    chars = [{"prompt": "a knight", "photos": [f"{base}/blank.png"]}, {"prompt": "a wizard"}]
    assert_error(h.client.post("/v1/avatars/cast", headers=auth, json={"prompt": "duel", "characters": chars}),
                 400, "invalid_request", "characters[0].photos[0]")
    form = {"prompt": "duel", "characters": json.dumps([{"prompt": "a knight"}, {"prompt": "a wizard"}])}
    assert_error(h.client.post("/v1/avatars/cast", headers=auth, data=form, files=[
        ("photo0", ("a.png", face, "image/png")), ("photo1", ("b.png", png_bytes((128, 128)), "image/png"))]),
        400, "invalid_request", "photo1[0]")
    assert h.store.get_account(acct.id).credits == 100
    assert "reserve" not in [e.kind for e in h.store.ledger(acct.id)]
    ok = h.client.post("/v1/avatars/cast", headers=auth, json={"prompt": "duel", "characters": [
        {"prompt": "a knight", "photos": [good]}, {"prompt": "a wizard"}]})
    assert ok.status_code == 202, ok.text
