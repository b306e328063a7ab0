"""Reference photos of percify and cast, as the submission service takes them: fetched (URLs,
through the SSRF guard) or base64-decoded, decoded to images within the service's limits, checked
for a usable face before any credit is reserved, and — for a cast character given as one of the
caller's avatars — that avatar's reference photos. No HTTP types: `serve.api.forms` parses the
body and hands the raw photo bytes here."""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any

from avatar_engine.errors import AvatarEngineError, NoFaceError
from avatar_engine.faces import analyze_reference_photos
from avatar_engine.safety import ContentPolicyError

from .auth import Principal
from .destinations import FetchRefused, fetch_url
from .engine_client import ProfileInfo, face_analyzer_for
from .errors import ApiError, invalid_request, unauthorized_access
from .imaging import check_photos
from .services import Services, call
from .uploads import b64_to_bytes, decode_photo
from .vocab import JobKind, JobStatus


@dataclass
class PhotoRequest:
    """A percify or cast body with its photos decoded, and what its Idempotency-Key binds to."""

    body: Any
    canonical: dict[str, Any]
    images: list[Any] = field(default_factory=list)  # percify: the person's photos
    refs: list[dict[str, Any]] = field(default_factory=list)  # cast: per character {images, src, params}
    params: list[str] = field(default_factory=list)  # percify: how the request named each photo


async def photo_bytes_of(svc: Services, value: str, param: str) -> bytes:
    """A photo given as base64 / data: URL, or as an http(s) URL fetched through the webhooks'
    SSRF guard (`destinations.fetch_url`: DNS pinning, re-vetted redirects, size and time caps);
    the bytes are then checked and decoded like an upload (`decode`)."""
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, str) and text[:8].lower().startswith(("http://", "https://")):
        s = svc.settings
        try:
            return await call(fetch_url, text, max_bytes=s.max_photo_bytes, timeout_s=s.photo_fetch_timeout_s,
                              allow_private=s.photo_fetch_allow_private, allowlist=s.photo_fetch_allowlist)
        except FetchRefused as exc:
            raise invalid_request(f"{param}: the photo URL could not be fetched: {exc}", param) from None
    return b64_to_bytes(value, param)


def decode(svc: Services, data: bytes, param: str):
    s = svc.settings
    return decode_photo(data, param, max_bytes=s.max_photo_bytes, max_pixels=s.max_photo_pixels)


async def character_source(svc: Services, principal: Principal, i: int, avatar_id: str) -> list[str]:
    """Reference photo keys of a character given as one of the caller's completed avatars."""
    param = f"characters[{i}].avatarId"
    src = await call(svc.store.get_avatar, avatar_id)
    if src is None:
        raise ApiError(404, "avatar_not_found", f"No avatar with id {avatar_id!r}", param=param)
    if src.account_id != principal.id:
        raise unauthorized_access(f"characters[{i}].avatarId must be one of your own avatars")
    if src.status != JobStatus.COMPLETED or not (src.result or {}).get("images"):
        raise invalid_request("the referenced avatar is not completed", param)
    # A percify avatar whose reference photos are kept (`photo_retention: avatar`) lends those (the
    # real face); otherwise (photos deleted once its job ended) its first image is the reference.
    src_keys = list((src.params or {}).get("photos") or []) if src.kind == JobKind.PERCIFY else []
    if src_keys and not all(await call(lambda: [svc.assets.exists(k) for k in src_keys])):
        src_keys = []
    return src_keys or [src.result["images"][0]["key"]]


_FACE_LOCK = threading.Lock()  # one detection at a time per process (the analyzer is shared)


async def check_faces(svc: Services, profile: ProfileInfo, images: list[Any], params: list[str]) -> None:
    """Refuse at submit — before any credit is reserved — a photo in which the engine's own face
    analyzer (same backend and options, from the engine description) finds no usable face: a
    400 invalid_request whose `param` names the photo as the request gave it."""
    desc = await svc.engine.describe()
    if not svc.settings.face_check_at_submit or not desc.face or not images:
        return

    def run() -> None:
        analyzer = face_analyzer_for(desc.face)
        with _FACE_LOCK:
            analyze_reference_photos(analyzer, images, param="photos", min_face_size=profile.face_min_size)

    try:
        await call(run)
    except NoFaceError as exc:
        index = int(exc.param.split("[", 1)[1].rstrip("]")) if exc.param and "[" in exc.param else 0
        param = params[index] if index < len(params) else exc.param
        message = exc.message.replace(f"(photos[{index}])", f"({param})")
        raise invalid_request(message, param) from None


async def check_photo_safety(svc: Services, images: list[Any], params: list[str]) -> None:
    """Refuse at submit — before any credit is reserved — a reference photo the image safety
    check refuses: 400 content_policy_violation whose `param` names the photo as the request gave it."""
    try:
        await call(check_photos, svc.settings, images)
    except ContentPolicyError as exc:
        raise photo_error(exc, params) from None


def photo_error(exc: AvatarEngineError, params: list[str]) -> Exception:
    """An engine error naming `photos[i]` → the same error naming the photo as the request gave it
    (`photoUrl`, `photoUrls[0]`, `photo[1]`...); other errors unchanged."""
    match = re.fullmatch(r"photos\[(\d+)\]", exc.param or "")
    if not match or int(match.group(1)) >= len(params) or params[int(match.group(1))] == exc.param:
        return exc
    param = params[int(match.group(1))]
    status = 400 if exc.code in ("invalid_request", "content_policy_violation") else 500
    return ApiError(status, exc.code, exc.message.replace(exc.param, param), param=param)
