"""The public side: publish to the feed, likes, comments, and the feed itself."""
from __future__ import annotations

from typing import Literal, Optional

from fastapi import APIRouter, Path, Query

from .. import schemas as S
from ..submissions import check_policy
from ..vocab import SORT_ORDERS, FeedSort, values
from .common import (
    ERROR_RESPONSES, Auth, Principal, Services, Svc, call, cursor_query, dump, get_visible, json_response, offset_query,
)
from .idempotency import Idem, Idempotency
from .rendering import render_avatar, render_avatars, render_comment, render_page

router = APIRouter(prefix="/v1", tags=["social"], responses=ERROR_RESPONSES)
AvatarId = Path(alias="avatarId")


@router.post("/avatars/{avatarId}/publish", response_model=S.Avatar,
             summary="Publish a completed own avatar to the public feed")
async def publish(avatar_id: str = AvatarId, principal: Principal = Auth, svc: Services = Svc,
                  idem: Idempotency = Idem):
    async def produce():
        av = await call(svc.store.publish_avatar, avatar_id, principal.id)  # the owner's only
        return json_response(render_avatar(av, svc.base_url, svc.links))

    return await idem.run({"publish": avatar_id}, produce)


async def _like(svc: Services, avatar_id: str, principal: Principal, on: bool):
    await get_visible(svc, avatar_id, principal)
    res = await call(svc.store.like if on else svc.store.unlike, avatar_id, principal.id)
    return json_response(S.LikeState(avatar_id=avatar_id, liked=on, likes=res.likes))


@router.post("/avatars/{avatarId}/like", response_model=S.LikeState, summary="Like (once per account; repeating is a no-op)")
async def like(avatar_id: str = AvatarId, principal: Principal = Auth, svc: Services = Svc, idem: Idempotency = Idem):
    return await idem.run({"like": avatar_id}, lambda: _like(svc, avatar_id, principal, True))


@router.delete("/avatars/{avatarId}/like", response_model=S.LikeState)
async def unlike(avatar_id: str = AvatarId, principal: Principal = Auth, svc: Services = Svc):
    return await _like(svc, avatar_id, principal, False)


@router.post("/avatars/{avatarId}/comment", status_code=201, response_model=S.Comment)
async def comment(body: S.CommentRequest, avatar_id: str = AvatarId, principal: Principal = Auth, svc: Services = Svc,
                  idem: Idempotency = Idem):
    async def produce():
        await get_visible(svc, avatar_id, principal)
        check_policy(svc.policy, [("text", body.text)], "text contains words that violate the content policy")
        c = await call(svc.store.add_comment, avatar_id, principal.id, body.text)
        return json_response(render_comment(c), 201)

    return await idem.run({"comment": avatar_id, **dump(body)}, produce)


@router.get("/avatars/{avatarId}/comments", response_model=S.CommentList)
async def comments(avatar_id: str = AvatarId, principal: Principal = Auth, svc: Services = Svc,
                   limit: int = Query(20, ge=1, le=100), offset: Optional[int] = offset_query(),
                   cursor: Optional[str] = cursor_query(*SORT_ORDERS),
                   sort_order: S.SortOrder = Query("asc", alias="sortOrder")):
    await get_visible(svc, avatar_id, principal)
    if cursor:  # a cursor continues the order it was issued for
        sort_order = cursor.split("~")[0]  # type: ignore[assignment]
    page = await call(svc.store.list_comments, avatar_id, limit=limit, cursor=cursor, offset=offset,
                      sort_order=sort_order)
    return json_response(S.CommentList(**render_page(page, limit, comments=[render_comment(c) for c in page.items])))


@router.get("/feed", response_model=S.AvatarList, summary="Published avatars of everyone")
async def feed(principal: Principal = Auth, svc: Services = Svc, limit: int = Query(20, ge=1, le=100),
               offset: Optional[int] = offset_query(), cursor: Optional[str] = cursor_query(*values(FeedSort)),
               sort: Literal["newest", "mostLiked"] = "newest"):
    order = FeedSort.MOST_LIKED if sort == "mostLiked" else FeedSort.NEWEST
    if cursor:  # a cursor continues the order it was issued for
        order = FeedSort(cursor.split("~")[0])
    page = await call(svc.store.feed, limit=limit, cursor=cursor, sort=order, offset=offset)
    return json_response(render_avatars(page, limit, svc.base_url, svc.links))
