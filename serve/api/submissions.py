"""POST /v1/avatars/generate | percify-yourself | cast and POST /v1/avatars/{avatarId}/remix:
each returns 202 with the queued avatar (the work is `serve.submissions`), or — with
`Prefer: wait[=N]` — the avatar once its job ended (201) or after N seconds (202)."""
from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, Header, Path, Request

from .. import schemas as S
from .. import submissions as service
from .common import SUBMIT_RESPONSES, Auth, Principal, Services, Svc, dump
from .idempotency import Idem, Idempotency
from .openapi import CAST_BODY, PERCIFY_BODY

router = APIRouter(prefix="/v1", responses={
    **SUBMIT_RESPONSES,
    201: {"model": S.CreatedAvatar, "description": "With `Prefer: wait`: the job ended within the wait (completed, "
                                            "failed or cancelled; `Preference-Applied: wait=N`)"},
})

PREFER = Header(None, alias="Prefer", max_length=200, description=(
    "`wait` or `wait=N` (seconds, capped at 60): hold the request until the job ends (201 with the finished "
    "avatar) or N seconds pass (202 with its current state). Answered with `Preference-Applied`. Not honoured "
    "(plain 202 at once) past the per-account or per-process bound on waiting requests."))


@router.post("/avatars/generate", status_code=202, response_model=S.CreatedAvatar, tags=["avatars"],
             summary="Prompt → 1..4 images (queued job)")
async def generate(body: S.GenerateRequest, principal: Principal = Auth, svc: Services = Svc,
                   idem: Idempotency = Idem, prefer: Optional[str] = PREFER):
    resp = await idem.run(dump(body), lambda: service.generate(svc, principal, body))
    return await service.maybe_wait(svc, principal, resp, prefer)


@router.post("/avatars/percify-yourself", status_code=202, response_model=S.CreatedAvatar, tags=["avatars"],
             openapi_extra=PERCIFY_BODY, summary="1..5 photos of one person + prompt/style → identity-preserving avatar")
async def percify(request: Request, principal: Principal = Auth, svc: Services = Svc, idem: Idempotency = Idem,
                  prefer: Optional[str] = PREFER):
    form = await service.read_percify(request, svc)
    resp = await idem.run(form.canonical, lambda: service.percify(svc, principal, form))
    return await service.maybe_wait(svc, principal, resp, prefer)


@router.post("/avatars/cast", status_code=202, response_model=S.CreatedAvatar, tags=["avatars"], openapi_extra=CAST_BODY,
             summary="Scene prompt + 2..4 characters (photos or own avatarId) → one image")
async def cast(request: Request, principal: Principal = Auth, svc: Services = Svc, idem: Idempotency = Idem,
               prefer: Optional[str] = PREFER):
    form = await service.read_cast(request, svc, principal)
    resp = await idem.run(form.canonical, lambda: service.cast(svc, principal, form))
    return await service.maybe_wait(svc, principal, resp, prefer)


@router.post("/avatars/{avatarId}/remix", status_code=202, response_model=S.CreatedAvatar, tags=["social"],
             summary="New avatar derived (img2img) from a visible completed one")
async def remix(body: S.RemixRequest, avatar_id: str = Path(alias="avatarId"), principal: Principal = Auth,
                svc: Services = Svc, idem: Idempotency = Idem, prefer: Optional[str] = PREFER):
    resp = await idem.run({"src": avatar_id, **dump(body)}, lambda: service.remix(svc, principal, avatar_id, body))
    return await service.maybe_wait(svc, principal, resp, prefer)
