"""Image links that work where images are used: absolute URLs, signed expiring links for private
avatars (a plain GET, no header), stable public links for public ones, store-presigned URLs
when the asset store can sign, and links that stop working on delete and unpublish."""
from __future__ import annotations

import os
import stat
import time
from urllib.parse import parse_qs, urlsplit

import pytest

from serve.links import ImageLinks, load_or_create_secret
from serve.settings import ServiceSettings

from helpers import assert_error
from test_api import Harness


def completed(h, auth, **body):
    r = h.client.post("/v1/avatars/generate", headers=auth, json={"prompt": "a fox", "seed": 3, **body})
    assert r.status_code == 202, r.text
    h.worker.run_once()
    av = h.client.get(f"/v1/avatars/{r.json()['id']}", headers=auth).json()
    assert av["status"] == "completed"
    return av


def path_of(url: str) -> str:
    """The URL as TestClient requests it (path + query), checked to be absolute first."""
    parts = urlsplit(url)
    assert parts.scheme in ("http", "https") and parts.netloc, url
    return parts.path + (f"?{parts.query}" if parts.query else "")


@pytest.fixture
def h(tmp_path):
    return Harness(tmp_path)


def test_private_image_links_are_absolute_signed_and_open_without_a_header(h):
    _, alice = h.account()
    av = completed(h, alice, batchSize=2)
    url = av["images"][1]["url"]
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == "http://testserver"  # the request's base URL (no setting)
    assert parts.path == f"/v1/avatars/{av['id']}/images/1"
    q = parse_qs(parts.query)
    assert set(q) == {"expires", "signature"} and len(q["signature"][0]) == 64
    assert int(q["expires"][0]) > time.time()
    r = h.client.get(path_of(url))  # no Authorization header
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    scope, max_age = r.headers["cache-control"].split(", ")
    assert scope == "private" and 0 < int(max_age.split("=")[1]) <= h.settings.signed_url_ttl_s
    assert r.content[:8] == b"\x89PNG\r\n\x1a\n"
    again = h.client.get(path_of(url), headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    thumb = h.client.get(path_of(av["thumbnailUrl"]))
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/webp"
    webp = h.client.get(path_of(url) + "&format=webp")
    assert webp.status_code == 200 and webp.headers["content-type"] == "image/webp"
    # The authenticated route keeps working, and keeps refusing other accounts' private avatars.
    assert h.client.get(f"/v1/avatars/{av['id']}/images/0", headers=alice).status_code == 200
    _, bob = h.account()
    assert_error(h.client.get(f"/v1/avatars/{av['id']}/images/0", headers=bob), 403, "unauthorized_access")
    assert_error(h.client.get(f"/v1/avatars/{av['id']}/images/0"), 403, "unauthorized_access")  # no key, no link


def test_altered_expired_and_cross_image_links_are_refused(h):
    _, alice = h.account()
    av = completed(h, alice, batchSize=2)
    url = path_of(av["images"][0]["url"])
    q = parse_qs(urlsplit(url).query)
    exp, sig = q["expires"][0], q["signature"][0]
    base = f"/v1/avatars/{av['id']}/images/0"
    flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
    assert_error(h.client.get(f"{base}?expires={exp}&signature={flipped}"), 403, "unauthorized_access", "signature")
    later = int(exp) + 3600  # a longer life is not for the taking
    assert_error(h.client.get(f"{base}?expires={later}&signature={sig}"), 403, "unauthorized_access", "signature")
    other = f"/v1/avatars/{av['id']}/images/1?expires={exp}&signature={sig}"  # image 0's link on image 1
    assert_error(h.client.get(other), 403, "unauthorized_access", "signature")
    links = h.app.state.services.links
    past = int(time.time()) - 5
    expired = f"{base}?expires={past}&signature={links.signature(base, past)}"
    err = assert_error(h.client.get(expired), 403, "unauthorized_access", "expires")
    assert "expired" in err["message"]
    assert_error(h.client.get(f"{base}?expires=12x&signature={sig}"), 400, "invalid_request", "expires")


def test_public_base_url_setting_prefixes_every_link(tmp_path):
    h = Harness(tmp_path, public_base_url="https://img.example.com/avatar-api/")
    _, alice = h.account()
    av = completed(h, alice)
    assert av["images"][0]["url"].startswith(f"https://img.example.com/avatar-api/v1/avatars/{av['id']}/images/0?")
    assert av["thumbnailUrl"].startswith("https://img.example.com/avatar-api/v1/avatars/")


def test_published_links_are_stable_public_and_die_on_unpublish(h):
    _, alice = h.account()
    av = completed(h, alice)
    signed_before = path_of(av["images"][0]["url"])
    pub = h.client.post(f"/v1/avatars/{av['id']}/publish", headers=alice).json()
    public_url = pub["images"][0]["url"]
    assert public_url == f"http://testserver/v1/avatars/{av['id']}/images/0"  # no expiry, no signature
    assert h.client.get(f"/v1/avatars/{av['id']}", headers=alice).json()["images"][0]["url"] == public_url  # stable
    r = h.client.get(path_of(public_url))
    assert r.status_code == 200 and r.headers["cache-control"].startswith("public") and r.headers["etag"]
    assert h.client.get(path_of(pub["thumbnailUrl"])).status_code == 200
    assert h.client.get(signed_before).status_code == 200  # a private-time link still works while published
    # Unpublish (visibility away from public): its public link and every older signed link stop working.
    h.client.patch(f"/v1/avatars/{av['id']}", headers=alice, json={"visibility": "private"})
    assert_error(h.client.get(path_of(public_url)), 403, "unauthorized_access")
    assert_error(h.client.get(signed_before), 403, "unauthorized_access", "signature")
    fresh = h.client.get(f"/v1/avatars/{av['id']}", headers=alice).json()["images"][0]["url"]
    assert "signature=" in fresh and h.client.get(path_of(fresh)).status_code == 200


def test_deleting_an_avatar_kills_its_signed_and_public_links(h):
    _, alice = h.account()
    private = completed(h, alice)
    public = completed(h, alice)
    pub = h.client.post(f"/v1/avatars/{public['id']}/publish", headers=alice).json()
    links = [path_of(private["images"][0]["url"]), path_of(private["thumbnailUrl"]), path_of(pub["images"][0]["url"])]
    assert all(h.client.get(u).status_code == 200 for u in links)
    for av in (private, public):
        assert h.client.delete(f"/v1/avatars/{av['id']}", headers=alice).status_code == 200
    for u in links:
        assert_error(h.client.get(u), 404, "avatar_not_found")


def test_signing_key_is_created_once_and_survives_a_restart(tmp_path):
    key = load_or_create_secret(str(tmp_path))
    assert len(key) == 32 and load_or_create_secret(str(tmp_path)) == key
    assert stat.S_IMODE(os.stat(tmp_path / "url-signing.key").st_mode) == 0o600
    settings = ServiceSettings.from_dict({"data_dir": str(tmp_path)}, env=False)
    a, b = ImageLinks.from_settings(settings), ImageLinks.from_settings(settings)
    assert a.signature("/v1/x", 100) == b.signature("/v1/x", 100)
    explicit = ImageLinks.from_settings(settings.replace(url_signing_secret="s3cret"))
    assert explicit.signature("/v1/x", 100) != a.signature("/v1/x", 100)
    # After a restart (a new app on the same data_dir), a link made before still opens.
    h1 = Harness(tmp_path / "svc")
    _, alice = h1.account()
    url = path_of(completed(h1, alice)["images"][0]["url"])
    h1.store.close()
    h2 = Harness(tmp_path / "svc")
    assert h2.client.get(url).status_code == 200


def test_store_presigned_urls_are_used_when_the_asset_store_can_sign(tmp_path, monkeypatch):
    h = Harness(tmp_path, assets_url=f"memory://presign-{os.getpid()}-{time.time_ns()}")
    fs = h.assets.backend.fs
    with pytest.raises(NotImplementedError):  # fsspec's memory filesystem cannot sign: the service signs
        fs.sign("x")
    _, alice = h.account()
    av = completed(h, alice)
    assert urlsplit(av["images"][0]["url"]).netloc == "testserver" and h.client.get(path_of(av["images"][0]["url"])).status_code == 200
    calls = []

    def sign(path, expiration=100, **kwargs):  # what s3fs/gcsfs return: the store's own presigned URL
        calls.append((path, expiration))
        return f"https://bucket.example/{path}?X-Amz-Expires={expiration}&X-Amz-Signature=abc"

    monkeypatch.setattr(fs, "sign", sign, raising=False)
    av = h.client.get(f"/v1/avatars/{av['id']}", headers=alice).json()
    assert av["images"][0]["url"].startswith("https://bucket.example/")
    assert av["images"][0]["url"].endswith(f"avatars/{av['id']}/0.png?X-Amz-Expires={h.settings.signed_url_ttl_s}&X-Amz-Signature=abc")
    assert av["thumbnailUrl"].startswith("https://bucket.example/") and "thumbnail.webp" in av["thumbnailUrl"]
    h.client.post(f"/v1/avatars/{av['id']}/publish", headers=alice)
    pub = h.client.get(f"/v1/avatars/{av['id']}", headers=alice).json()
    assert pub["images"][0]["url"] == f"http://testserver/v1/avatars/{av['id']}/images/0"  # public: stable route
    h.client.patch(f"/v1/avatars/{av['id']}", headers=alice, json={"visibility": "private"})
    off = Harness(tmp_path / "off", assets_url=h.settings.assets_url, presign_asset_urls=False)
    url = off.app.state.services.links.image_url(h.store.get_avatar(av["id"]), 0, "http://x")
    assert url.startswith(f"http://x/v1/avatars/{av['id']}/images/0?expires=")  # presigning turned off


def test_webhook_payloads_carry_absolute_signed_links(tmp_path):
    from serve.app import event_renderer

    settings = ServiceSettings.from_dict({"data_dir": str(tmp_path)}, env=False)
    links = ImageLinks.from_settings(settings)
    h = Harness(tmp_path, store_kwargs={"event_renderer": event_renderer("https://api.example.com", links)})
    _, alice = h.account()
    av = completed(h, alice)
    row = h.store.get_avatar(av["id"])
    payload = event_renderer("https://api.example.com", links)("avatar.completed", row, {})
    url = payload["data"]["object"]["images"][0]["url"]
    assert url.startswith(f"https://api.example.com/v1/avatars/{av['id']}/images/0?expires=")
    assert h.client.get(path_of(url)).status_code == 200  # the app signs with the same persisted key
