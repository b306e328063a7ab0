"""Your avatars: list, read, update metadata, delete; image and thumbnail bytes."""
from __future__ import annotations

import io
import time
from typing import Literal, Optional

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import StreamingResponse

from .. import schemas as S
from ..auth import authenticate
from ..errors import ApiError, avatar_not_found, invalid_request, not_found
from ..links import image_path, is_public, link_epoch, thumbnail_path
from ..schemas import iso
from ..store import UNSET, Avatar
from ..submissions import check_meta
from ..vocab import SORT_FIELDS, SORT_ORDERS, JobStatus, Visibility
from ..waiting import sse, watch
from .common import (
    ERROR_RESPONSES, Auth, Principal, Services, Svc, call, cursor_query, dump, get_visible, json_response, offset_query,
)
from .rendering import render_avatar, render_avatars

router = APIRouter(prefix="/v1", tags=["avatars"], responses=ERROR_RESPONSES)
AvatarId = Path(alias="avatarId")


@router.get("/avatars", response_model=S.AvatarList,
            summary="Your avatars: filtered, sorted, paged by offset or cursor, with the total")
async def list_avatars(
    principal: Principal = Auth, svc: Services = Svc,
    limit: int = Query(20, ge=1, le=100), offset: Optional[int] = offset_query(),
    cursor: Optional[str] = cursor_query(*(f"{f}~{o}" for f in SORT_FIELDS for o in SORT_ORDERS)),
    status: Optional[S.Status] = None,
    model: Optional[str] = Query(None, max_length=100, description="A profile name or alias (matches the profile it resolves to)."),
    visibility: Optional[S.Visibility] = None, published: Optional[bool] = None,
    kind: Optional[S.Kind] = None,
    search: Optional[str] = Query(None, max_length=200, description="Case-insensitive substring of the prompt or title."),
    sort_by: S.SortBy = Query("createdAt", alias="sortBy"), sort_order: S.SortOrder = Query("desc", alias="sortOrder"),
):
    if cursor:  # a cursor continues the order it was issued for
        sort_by, sort_order = cursor.split("~")[:2]  # type: ignore[assignment]
    if model is not None:
        profile = (await svc.engine.describe()).resolve(model)
        model = profile.name if profile is not None else model
    page = await call(svc.store.list_avatars, principal.id, limit=limit, cursor=cursor, offset=offset, status=status,
                      model=model, visibility=visibility, published=published, kind=kind, search=search,
                      sort_by=sort_by, sort_order=sort_order)
    return json_response(render_avatars(page, limit, svc.base_url, svc.links))


@router.get("/avatars/{avatarId}", response_model=S.Avatar)
async def get_avatar(avatar_id: str = AvatarId, principal: Principal = Auth, svc: Services = Svc):
    av = await get_visible(svc, avatar_id, principal)
    return json_response(render_avatar(av, svc.base_url, svc.links, queue_position=await queue_position(svc, av)))


async def queue_position(svc: Services, av: Avatar) -> int | None:
    """The queued avatar's place in the queue (1 = next); None for any other status."""
    return (await call(svc.store.queue_positions, [av])).get(av.id) if av.status == JobStatus.QUEUED else None


@router.patch("/avatars/{avatarId}", response_model=S.Avatar,
              summary="Update metadata (title, description, tags, visibility, metadata)")
async def patch_avatar(body: S.UpdateAvatarRequest, avatar_id: str = AvatarId, principal: Principal = Auth,
                       svc: Services = Svc):
    given = {f: getattr(body, f) for f in body.model_fields_set}
    tags = check_meta(given.get("title"), given.get("description"), given.get("tags"), given.get("metadata"), svc.policy)
    for f in ("tags", "visibility", "metadata"):
        if f in given and given[f] is None:
            raise invalid_request(f"{f} cannot be null", f)
    if "tags" in given:
        given["tags"] = tags
    changes = {f: given.get(f, UNSET) for f in ("title", "description", "tags", "visibility", "metadata")}
    updated = await call(svc.store.update_avatar, avatar_id, principal.id, **changes)  # the owner's only
    return json_response(render_avatar(updated, svc.base_url, svc.links))


@router.delete("/avatars/{avatarId}", response_model=S.DeletedAvatar,
               summary="Delete an avatar and its images; a running job is cancelled and refunded")
async def delete_avatar(avatar_id: str = AvatarId, principal: Principal = Auth, svc: Services = Svc):
    final = await call(svc.store.delete_avatar, avatar_id, principal.id)  # the owner's only

    def remove_files() -> None:
        svc.assets.delete_avatar(avatar_id)
        upload_id = (final.params or {}).get("uploadId")
        if upload_id:
            svc.assets.backend.delete_prefix(f"uploads/{upload_id}")

    await call(remove_files)
    return json_response(S.DeletedAvatar(id=avatar_id, status=final.status))


@router.get("/avatars/{avatarId}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}, "description": (
                "Server-Sent Events: `status` (data: the Avatar object, with `queuePosition` while queued) on "
                "every status change, starting with the current one; `queue` (data: `{id, status, "
                "queuePosition}`) when a queued avatar's position changed (checked every 15 s); `progress` "
                "(data: `{id, status, step, totalSteps}`) while it runs; `preview` (data: `{id, imageIndex, "
                "step, dataUrl}`: a small JPEG/WebP data: URL of image `imageIndex` at denoising step `step`) "
                "when the worker sends previews; comments (`: keep-alive`) every 15 s of silence. The stream "
                "ends after a terminal status (completed, failed, cancelled), a `deleted` event, or "
                "`events_max_s`.")},
                       429: {"model": S.ErrorResponse, "description": "Too many open waits/streams for this account"}},
            summary="Live status and progress of one avatar (SSE)")
async def avatar_events(avatar_id: str = AvatarId, principal: Principal = Auth, svc: Services = Svc):
    await get_visible(svc, avatar_id, principal)  # 404 / 403 before the stream starts
    if not svc.waiters.try_acquire(principal.id, principal.limits.concurrent_jobs):
        raise ApiError(429, "rate_limit_exceeded", "Too many open event streams and waiting requests for this "
                       "account (its tier's concurrent-generations limit); close one first",
                       headers={"Retry-After": "5"})
    base, links, settings = svc.base_url, svc.links, svc.settings

    async def stream():
        n, last_status, last_position = 0, None, None
        seen_previews: set[tuple] = set()
        try:
            deadline = time.monotonic() + settings.events_max_s
            async for state in watch(svc.store, avatar_id, settings, deadline, keepalive_s=15.0):
                if state == "keepalive":
                    if last_status == JobStatus.QUEUED:
                        av = await call(svc.store.get_avatar, avatar_id)
                        position = await queue_position(svc, av) if av is not None else None
                        if position is not None and position != last_position:
                            n, last_position = n + 1, position
                            yield sse("queue", {"id": avatar_id, "status": av.status, "queuePosition": position}, n)
                            continue
                    yield b": keep-alive\n\n"
                    continue
                n += 1
                if state is None:
                    yield sse("deleted", {"id": avatar_id}, n)
                    return
                status, progress = state
                if n == 1 or status != last_status:
                    av = await call(svc.store.get_avatar, avatar_id)
                    if av is None:
                        yield sse("deleted", {"id": avatar_id}, n)
                        return
                    last_position = await queue_position(svc, av)
                    yield sse("status", dump(render_avatar(av, base, links, queue_position=last_position)), n)
                    last_status = status
                    if status != JobStatus.PROCESSING or not isinstance(progress, dict):
                        continue
                    n += 1
                elif not isinstance(progress, dict):
                    continue
                yield sse("progress", {"id": avatar_id, "status": status, **progress_fields(progress)}, n)
                for preview in new_previews(progress, seen_previews):
                    n += 1
                    yield sse("preview", {"id": avatar_id, **preview}, n)
        finally:
            svc.waiters.release(principal.id)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def progress_fields(progress: dict) -> dict:
    """The `progress` event's fields: the stored progress without its preview frames."""
    return {k: v for k, v in progress.items() if k != "previews"}


def new_previews(progress: dict, seen: set[tuple]) -> list[dict]:
    """Preview frames the worker stored with its progress (`Store.set_progress(previews=...)`)
    not yet sent on this stream, as `{imageIndex, step, dataUrl}`."""
    out = []
    for p in progress.get("previews") or []:
        if not isinstance(p, dict) or not isinstance(p.get("dataUrl"), str):
            continue
        key = (p.get("imageIndex"), p.get("step"))
        if key not in seen:
            seen.add(key)
            out.append({"imageIndex": p.get("imageIndex"), "step": p.get("step"), "dataUrl": p["dataUrl"]})
    return out


_LINK_PARAMS = dict(
    expires=Query(None, pattern=r"^[0-9]{1,12}$", description="Expiry (epoch seconds) of a signed image link."),
    signature=Query(None, pattern=r"^[0-9a-f]{64}$", description="Hex HMAC-SHA256 of a signed image link."),
)
_IMAGE_AUTH = ("Open with any one of: an `Authorization: Bearer` key (the avatar must be visible to it), a signed "
               "link's `expires` + `signature` (as in the Avatar's URLs of a private avatar: no header needed, "
               "403 once expired), or nothing at all when the avatar is public (its stable link).")


async def _readable(request: Request, svc: Services, avatar_id: str, path: str, expires: str | None,
                    signature: str | None) -> tuple[Avatar, dict[str, str]]:
    """The avatar behind an image route and the cache headers for its bytes, after checking
    whichever credential the request carries (see `_IMAGE_AUTH`)."""
    if expires is not None or signature is not None:
        av = await call(svc.store.get_avatar, avatar_id)
        if av is None:
            raise avatar_not_found(avatar_id)
        check = svc.links.check(path, expires, signature, link_epoch(av))
        if check.reason == "expired":
            raise ApiError(403, "unauthorized_access", f"This image link expired at {iso(check.expires)}; read the "
                           "avatar again for a fresh link", param="expires")
        if not check.ok:
            raise ApiError(403, "unauthorized_access", "This image link's signature is not valid (altered, or the "
                           "avatar stopped being public since it was made)", param="signature")
        remaining = max(0, int(check.expires - time.time()))
        return av, {"Cache-Control": f"private, max-age={min(remaining, svc.links.ttl_s)}", "ETag": _etag(av)}
    if request.headers.get("authorization"):  # the authenticated route (401 for a bad key)
        principal = await authenticate(request)
        av = await get_visible(svc, avatar_id, principal)
        return av, cache_headers(av)
    av = await call(svc.store.get_avatar, avatar_id)
    if av is None:
        raise avatar_not_found(avatar_id)
    if not is_public(av):
        raise ApiError(403, "unauthorized_access", "This avatar is not public: open its image with the signed link "
                       "from the Avatar object, or send an API key")
    return av, cache_headers(av)


def _image_response(request: Request, data: bytes, media_type: str, headers: dict[str, str]) -> Response:
    if request.headers.get("if-none-match") == headers.get("ETag"):
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=media_type, headers=headers)


@router.get("/avatars/{avatarId}/images/{index}", response_class=Response,
            responses={200: {"content": {"image/png": {}, "image/webp": {}}, "description": "The image bytes"},
                       304: {"description": "Not modified (If-None-Match matched the ETag)"}},
            summary="Image bytes (PNG; `?format=webp` for WebP)", description=_IMAGE_AUTH)
async def get_image(request: Request, avatar_id: str = AvatarId, index: int = Path(ge=0),
                    format: Literal["png", "webp"] = "png", expires: Optional[str] = _LINK_PARAMS["expires"],
                    signature: Optional[str] = _LINK_PARAMS["signature"], svc: Services = Svc):
    av, headers = await _readable(request, svc, avatar_id, image_path(avatar_id, index), expires, signature)
    imgs = (av.result or {}).get("images") or []
    if av.status != JobStatus.COMPLETED or index >= len(imgs):
        raise not_found(f"avatar {avatar_id} has no image {index} (status {av.status})", "index")
    data = await call(svc.assets.get_bytes, imgs[index]["key"])
    if format == "webp":
        return _image_response(request, await call(to_webp, data), "image/webp", headers)
    return _image_response(request, data, "image/png", headers)


@router.get("/avatars/{avatarId}/thumbnail", response_class=Response,
            responses={200: {"content": {"image/webp": {}}, "description": "WebP thumbnail"},
                       304: {"description": "Not modified (If-None-Match matched the ETag)"}},
            description=_IMAGE_AUTH)
async def get_thumbnail(request: Request, avatar_id: str = AvatarId, expires: Optional[str] = _LINK_PARAMS["expires"],
                        signature: Optional[str] = _LINK_PARAMS["signature"], svc: Services = Svc):
    av, headers = await _readable(request, svc, avatar_id, thumbnail_path(avatar_id), expires, signature)
    key = (av.result or {}).get("thumbnailKey")
    if av.status != JobStatus.COMPLETED or not key:
        raise not_found(f"avatar {avatar_id} has no thumbnail (status {av.status})", "avatarId")
    return _image_response(request, await call(svc.assets.get_bytes, key), "image/webp", headers)


def to_webp(png: bytes) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).save(buf, format="WEBP", quality=90)
    return buf.getvalue()


def _etag(av: Avatar) -> str:
    return f'"{av.id}-{int(av.updated_at)}"'


def cache_headers(av: Avatar) -> dict[str, str]:
    scope = "public" if av.visibility == Visibility.PUBLIC else "private"
    return {"Cache-Control": f"{scope}, max-age=3600", "ETag": _etag(av)}
