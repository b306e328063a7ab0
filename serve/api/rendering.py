"""Store records → wire models (`serve.schemas`): the Avatar object, comments, webhook endpoints,
and the webhook payloads (which carry the same Avatar object as the API)."""
from __future__ import annotations

from typing import Any, Callable

from pydantic.alias_generators import to_camel

from .. import schemas as S
from ..schemas import iso
from ..links import ImageLinks, image_path, thumbnail_path
from ..store import Avatar, Comment, Page, WebhookEndpoint
from ..vocab import JobKind, JobStatus
from .common import dump


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _identity(value: Any) -> S.Identity | None:
    """The engine's identity report → the API's compact `identity` object."""
    if not isinstance(value, dict):
        return None
    faces = value.get("faces")
    if isinstance(faces, list):
        faces = sum(1 for f in faces if f)
    sims = value.get("similarity")
    per_image = [_num(x) for x in sims] if isinstance(sims, list) else None
    vals = [x for x in (per_image or [_num(sims)]) if x is not None]
    notes = value.get("notes")
    return S.Identity(faces=faces if isinstance(faces, int) else None,
                      similarity=round(sum(vals) / len(vals), 4) if vals else None, per_image=per_image,
                      strength=_num(value.get("strength")),
                      method=value.get("method") if isinstance(value.get("method"), str) else None,
                      notes=[str(n) for n in notes] if isinstance(notes, list) else None)


def _style(value: Any) -> S.StyleReport | None:
    """The engine's style report (stored with the job result) → the Avatar's `style`."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    lora = value.get("lora")
    used = None
    if isinstance(lora, dict) and isinstance(lora.get("name"), str) and _num(lora.get("scale")) is not None \
            and lora.get("mode") in ("stacked", "fused"):
        used = S.StyleLoRAUsed(name=lora["name"], scale=_num(lora["scale"]), mode=lora["mode"])
    return S.StyleReport(name=value["name"], strength=_num(value.get("strength")), lora=used)


def _characters(p: dict, r: dict) -> list[S.CastCharacterOut]:
    res_chars = r.get("characters") if isinstance(r.get("characters"), list) else []
    out = []
    for i, c in enumerate(p.get("characters") or []):
        rc = res_chars[i] if i < len(res_chars) and isinstance(res_chars[i], dict) else {}
        out.append(S.CastCharacterOut(
            prompt=c.get("prompt", ""), avatar_id=c.get("avatarId"),
            photos=0 if c.get("avatarId") else len(c.get("photos") or []),
            box=rc.get("box", c.get("box")), has_identity=rc.get("hasIdentity"), similarity=_num(rc.get("similarity"))))
    return out


def image_url(av: Avatar, index: int, base_url: str = "", links: ImageLinks | None = None) -> str:
    """The URL of image `index` of `av` as every response and webhook shows it (`serve.links`:
    public, signed or presigned); without `links`, the authenticated route."""
    return links.image_url(av, index, base_url) if links else f"{base_url}{image_path(av.id, index)}"


def thumbnail_url(av: Avatar, base_url: str = "", links: ImageLinks | None = None) -> str:
    return links.thumbnail_url(av, base_url) if links else f"{base_url}{thumbnail_path(av.id)}"


def _progress(av: Avatar) -> S.Progress | None:
    p = av.progress if av.status == JobStatus.PROCESSING else None
    if not isinstance(p, dict) or not isinstance(p.get("totalSteps"), int):
        return None
    return S.Progress(step=int(p.get("step", 0)), total_steps=int(p["totalSteps"]))


def credits_held(av: Avatar) -> int:
    """Credits the job holds: reserved or charged, 0 once refunded (failed, cancelled)."""
    return 0 if av.status in (JobStatus.FAILED, JobStatus.CANCELLED) else av.credit_cost


def render_avatar(av: Avatar, base_url: str = "", links: ImageLinks | None = None, *,
                  queue_position: int | None = None) -> S.Avatar:
    """Store record → the API's Avatar object (image URLs through `image_url`). `queue_position`
    (a store read, `Store.queue_positions`) is shown while the avatar is queued."""
    p, r = av.params or {}, av.result or {}
    images = [S.AvatarImage(url=image_url(av, i, base_url, links), width=int(img["width"]),
                            height=int(img["height"]), seed=img.get("seed"),
                            safety=img.get("safety") if isinstance(img.get("safety"), dict) else None)
              for i, img in enumerate(r.get("images") or [])]
    queued_ms = None
    if av.started_at is not None:
        queued_ms = max(0, int(round((av.started_at - av.created_at) * 1000)))
    return S.Avatar(
        id=av.id, user_id=av.account_id, kind=av.kind, status=av.status, prompt=p.get("prompt", av.prompt),
        negative_prompt=p.get("negativePrompt"), style_preset=p.get("stylePreset"),
        style_strength=_num(p.get("styleStrength")), style=_style(r.get("style")),
        model=p.get("requestedModel") or av.model, model_profile=av.model,
        width=p.get("width"), height=p.get("height"), aspect_ratio=p.get("aspectRatio"),
        guidance_scale=p.get("guidanceScale"), steps=p.get("steps"), seed=p.get("seed"),
        batch_size=int(p.get("batchSize", 1)), strength=p.get("strength"), images=images,
        image_url=images[0].url if images else None,
        thumbnail_url=thumbnail_url(av, base_url, links) if images else None, progress=_progress(av),
        title=av.title, description=av.description, tags=list(av.tags or []), metadata=_metadata(av, r),
        visibility=av.visibility, published=bool(av.published), published_at=iso(av.published_at),
        likes=av.likes, comments=av.comments, remixes=av.remixes, remixed_from=av.remixed_from,
        credit_cost=av.credit_cost, credits_held=credits_held(av),
        queue_position=queue_position if av.status == JobStatus.QUEUED else None,
        cancel_requested=av.cancel_requested_at is not None and av.status == JobStatus.PROCESSING,
        error=S.ErrorInfo(code=av.error_code, message=av.error_message or "") if av.error_code else None,
        timings=S.Timings(queued_ms=queued_ms, generation_ms=r.get("generationMs")),
        identity_method=p.get("identityMethod") if av.kind in (JobKind.PERCIFY, JobKind.CAST) else None,
        identity=_identity(r.get("identity")) if av.kind == JobKind.PERCIFY else None,
        characters=_characters(p, r) if av.kind == JobKind.CAST else None,
        created_at=iso(av.created_at), updated_at=iso(av.updated_at), completed_at=iso(av.completed_at),
    )


def _metadata(av: Avatar, result: dict) -> dict[str, Any]:
    """The user's metadata plus what Percify's docs show there: `modelVersion` (the profile that
    ran the job) and, once completed, `generationTime` in seconds."""
    out = dict(av.metadata or {})
    if av.model:
        out["modelVersion"] = av.model
    gen_ms = result.get("generationMs")
    if isinstance(gen_ms, (int, float)) and not isinstance(gen_ms, bool):
        out["generationTime"] = round(gen_ms / 1000.0, 3)
    return out


def render_page(page: Page, limit: int, **items: list) -> dict[str, Any]:
    """The list envelope's fields: `{<plural>: [...], pagination: {total, limit, offset, hasMore,
    nextCursor}, hasMore, nextCursor}` (pass the rendered items as `avatars=[...]` etc.)."""
    has_more = page.next_cursor is not None
    return {**items, "pagination": S.Pagination(total=page.total or 0, limit=limit, offset=page.offset or 0,
                                                has_more=has_more, next_cursor=page.next_cursor),
            "has_more": has_more, "next_cursor": page.next_cursor}


def render_avatars(page: Page, limit: int, base_url: str, links: ImageLinks | None = None) -> S.AvatarList:
    return S.AvatarList(**render_page(page, limit, avatars=[render_avatar(a, base_url, links) for a in page.items]))


def render_comment(c: Comment) -> S.Comment:
    return S.Comment(id=c.id, avatar_id=c.avatar_id, account_id=c.account_id, text=c.text,
                     created_at=iso(c.created_at))


def render_endpoint(e: WebhookEndpoint, with_secret: bool = False) -> S.WebhookEndpoint:
    return S.WebhookEndpoint(id=e.id, url=e.url, events=list(e.events), description=e.description,
                             disabled=e.disabled, disabled_reason=e.disabled_reason, created_at=iso(e.created_at),
                             secret=e.secret if with_secret else None)


def _event_extra(avatar_id: str, extra: dict) -> dict:
    """The store's event extras (snake_case, epoch seconds) → the API's wire names: `likedBy`
    (avatar.liked) and `comment` as the API's Comment object (avatar.commented)."""
    out: dict[str, Any] = {}
    for key, value in (extra or {}).items():
        if key == "comment" and isinstance(value, dict):
            value = dump(S.Comment(id=value.get("id"), avatar_id=avatar_id, account_id=value.get("account_id"),
                                   text=value.get("text"), created_at=iso(value.get("created_at"))))
        out[to_camel(key)] = value
    return out


def event_renderer(base_url: str = "", links: ImageLinks | None = None) -> Callable[..., dict]:
    """Webhook payloads carry the same Avatar object as the API (pass to `open_store`), with
    image links signed by `links` (valid for its ttl from when the event was written)."""

    def render(event_type: str, avatar: Avatar, extra: dict) -> dict:
        return {"type": event_type,
                "data": {"object": dump(render_avatar(avatar, base_url, links)), **_event_extra(avatar.id, extra)}}

    return render
