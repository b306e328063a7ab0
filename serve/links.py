"""Image links that work where images are used (an `<img src>`, a share link, a webhook payload).

Every image URL the API hands out is absolute and opens with a plain GET, no header:

- **public** avatars (visibility `public`, which published ones are): the stable route itself,
  `{base}/v1/avatars/{id}/images/{i}`, no expiry, `Cache-Control: public`. The route serves it to
  anyone only while the avatar is public, so unpublishing (any visibility change away from
  `public`) or deleting it stops the link.
- **private and unlisted** avatars: the same route signed like an S3/GCS presigned URL,
  `...?expires=<epoch s>&signature=<hex>`, where the signature is HMAC-SHA256 (server secret) of
  the path, the expiry and the avatar's link epoch (bumped when it stops being public, so links
  handed out while it was published die too). Checked in constant time; an expired link is a 403.
  When the asset store can presign its own URLs (fsspec `sign()`: s3fs, gcsfs) and
  `presign_asset_urls` is on, private image links are the store's presigned URLs instead (the
  bytes then never pass through the service; deleting the avatar deletes the objects).

`ImageLinks.image_url` / `thumbnail_url` are the only place these URLs are built.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable

from .store import Avatar
from .vocab import Visibility

SECRET_FILE = "url-signing.key"

#: The current request's base URL (`scheme://host[:port][root_path]`, set by the outer middleware):
#: the default for absolute links when `public_base_url` is not configured.
REQUEST_BASE_URL: ContextVar[str] = ContextVar("request_base_url", default="")


def request_base_url(scope: dict) -> str:
    """`scheme://host[root_path]` of an ASGI request as the service sees it (the `Host` header,
    else the server address)."""
    headers = {k: v for k, v in scope.get("headers", [])}
    host = headers.get(b"host", b"").decode("latin-1")
    if not host:
        server = scope.get("server") or ("localhost", 80)
        host = f"{server[0]}:{server[1]}"
    return f"{scope.get('scheme', 'http')}://{host}{scope.get('root_path', '')}".rstrip("/")


def image_path(avatar_id: str, index: int) -> str:
    return f"/v1/avatars/{avatar_id}/images/{int(index)}"


def thumbnail_path(avatar_id: str) -> str:
    return f"/v1/avatars/{avatar_id}/thumbnail"


def is_public(av: Avatar) -> bool:
    """Public avatars get stable, unsigned links (anyone may fetch them)."""
    return av.visibility == Visibility.PUBLIC


def load_or_create_secret(data_dir: str) -> bytes:
    """The embedded default's URL-signing key: `<data_dir>/url-signing.key`, created once (0600,
    32 random bytes, hex) so links survive a restart. Several processes may race to create it:
    O_EXCL lets exactly one write, the others read what it wrote."""
    path = os.path.join(os.path.abspath(data_dir), SECRET_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # the creator may not have written yet
            with open(path, encoding="ascii") as fh:
                text = fh.read().strip()
            if text:
                return bytes.fromhex(text)
            time.sleep(0.02)
        raise RuntimeError(f"{path} is empty; delete it or set url_signing_secret")
    key = secrets.token_bytes(32)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(key.hex())
    return key


@dataclass(frozen=True)
class LinkCheck:
    """The outcome of checking `expires`/`signature` query parameters."""

    ok: bool
    reason: str = ""  # missing | expired | invalid
    expires: int = 0


class ImageLinks:
    """Builds and verifies image links. `secret` signs the service's own links; `presign`
    (optional) turns an asset key into the store's presigned URL or None."""

    def __init__(self, secret: bytes, ttl_s: int = 3600, *, presign: Callable[[str, int], str | None] | None = None,
                 clock: Callable[[], float] = time.time):
        if not secret:
            raise ValueError("url signing secret must not be empty")
        self.secret, self.ttl_s, self.presign, self.clock = secret, int(ttl_s), presign, clock

    @classmethod
    def from_settings(cls, settings: Any, assets: Any = None) -> "ImageLinks":
        secret = settings.url_signing_secret
        key = secret.encode("utf-8") if secret else load_or_create_secret(settings.data_dir)
        presign = None
        if assets is not None and settings.presign_asset_urls:
            presign = getattr(assets.backend, "presign", None)
        return cls(key, settings.signed_url_ttl_s, presign=presign)

    # -- building ----------------------------------------------------------------------------
    def expiry(self) -> int:
        """Now + ttl, rounded up to a step of ttl/8 (≥ 1 s): repeated reads within a step return
        the same URL, so browsers and CDNs can cache it."""
        step = max(1, self.ttl_s // 8)
        return int(math.ceil((self.clock() + self.ttl_s) / step) * step)

    def signature(self, path: str, expires: int, epoch: int = 0) -> str:
        msg = f"{path}\n{int(expires)}\n{int(epoch)}".encode("utf-8")
        return hmac.new(self.secret, msg, hashlib.sha256).hexdigest()

    def signed(self, base_url: str, path: str, epoch: int = 0) -> str:
        exp = self.expiry()
        return f"{base_url}{path}?expires={exp}&signature={self.signature(path, exp, epoch)}"

    def _url(self, av: Avatar, base_url: str, path: str, key: str | None) -> str:
        if is_public(av):
            return f"{base_url}{path}"
        if self.presign is not None and key:
            url = self.presign(key, self.ttl_s)
            if url:
                return url
        return self.signed(base_url, path, link_epoch(av))

    def image_url(self, av: Avatar, index: int, base_url: str = "") -> str:
        """The absolute URL of image `index` of `av` (public, signed or presigned, see module doc)."""
        imgs = (av.result or {}).get("images") or []
        key = imgs[index].get("key") if index < len(imgs) else None
        return self._url(av, base_url, image_path(av.id, index), key)

    def thumbnail_url(self, av: Avatar, base_url: str = "") -> str:
        return self._url(av, base_url, thumbnail_path(av.id), (av.result or {}).get("thumbnailKey"))

    # -- checking ----------------------------------------------------------------------------
    def check(self, path: str, expires: str | None, signature: str | None, epoch: int = 0) -> LinkCheck:
        """Verify a signed link's query parameters (constant-time comparison)."""
        if not expires or not signature:
            return LinkCheck(False, "missing")
        try:
            exp = int(expires)
        except ValueError:
            return LinkCheck(False, "invalid")
        expected = self.signature(path, exp, epoch)
        if not hmac.compare_digest(signature.encode("ascii", "replace"), expected.encode("ascii")):
            return LinkCheck(False, "invalid", exp)
        if exp <= self.clock():
            return LinkCheck(False, "expired", exp)
        return LinkCheck(True, "", exp)


def link_epoch(av: Avatar) -> int:
    return int(getattr(av, "link_epoch", 0) or 0)

