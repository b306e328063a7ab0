"""Your avatars: list, read, update metadata, delete; image and thumbnail bytes."""
from __future__ import annotations

import io
from typing import Literal, Optional

from fastapi import APIRouter, Path, Query, Response

from .. import schemas as S
from ..errors import invalid_request, not_found
from ..store import UNSET, Avatar
from ..submissions import check_meta
from ..vocab import SORT_FIELDS, SORT_ORDERS, JobStatus, Visibility
from .common import (
    ERROR_RESPONSES, Auth, Principal, Services, Svc, call, cursor_query, get_visible, json_response, offset_query,
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
    return json_response(render_avatars(page, limit, svc.base_url))


@router.get("/avatars/{avatarId}", response_model=S.Avatar)
async def get_avatar(avatar_id: str = AvatarId, principal: Principal = Auth, svc: Services = Svc):
    return json_response(render_avatar(await get_visible(svc, avatar_id, principal), svc.base_url))


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
    return json_response(render_avatar(updated, svc.base_url))


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


@router.get("/avatars/{avatarId}/images/{index}", response_class=Response,
            responses={200: {"content": {"image/png": {}, "image/webp": {}}, "description": "The image bytes"}},
            summary="Image bytes (PNG; `?format=webp` for WebP)")
async def get_image(avatar_id: str = AvatarId, index: int = Path(ge=0), format: Literal["png", "webp"] = "png",
                    principal: Principal = Auth, svc: Services = Svc):
    av = await get_visible(svc, avatar_id, principal)
    imgs = (av.result or {}).get("images") or []
    if av.status != JobStatus.COMPLETED or index >= len(imgs):
        raise not_found(f"avatar {avatar_id} has no image {index} (status {av.status})", "index")
    data = await call(svc.assets.get_bytes, imgs[index]["key"])
    if format == "webp":
        return Response(await call(to_webp, data), media_type="image/webp", headers=cache_headers(av))
    return Response(data, media_type="image/png", headers=cache_headers(av))


@router.get("/avatars/{avatarId}/thumbnail", response_class=Response,
            responses={200: {"content": {"image/webp": {}}, "description": "WebP thumbnail"}})
async def get_thumbnail(avatar_id: str = AvatarId, principal: Principal = Auth, svc: Services = Svc):
    av = await get_visible(svc, avatar_id, principal)
    key = (av.result or {}).get("thumbnailKey")
    if av.status != JobStatus.COMPLETED or not key:
        raise not_found(f"avatar {avatar_id} has no thumbnail (status {av.status})", "avatarId")
    return Response(await call(svc.assets.get_bytes, key), media_type="image/webp", headers=cache_headers(av))


def to_webp(png: bytes) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).save(buf, format="WEBP", quality=90)
    return buf.getvalue()


def cache_headers(av: Avatar) -> dict[str, str]:
    scope = "public" if av.visibility == Visibility.PUBLIC else "private"
    return {"Cache-Control": f"{scope}, max-age=3600", "ETag": f'"{av.id}-{int(av.updated_at)}"'}
