"""POST /v1/avatars/generate | percify-yourself | cast and POST /v1/avatars/{avatarId}/remix:
each returns 202 with the queued avatar (bodies with photos parsed by `api.forms`, the work done
by `serve.submissions`), or — with
`Prefer: wait[=N]` — the avatar once its job ended (201) or after N seconds (202)."""
from __future__ import annotations

import json
from typing import Any, Awaitable, Optional

from fastapi import APIRouter, Header, Path, Request
from fastapi.responses import JSONResponse, Response

from .. import schemas as S
from .. import submissions as service
from ..store import Avatar
from ..vocab import TERMINAL_STATUSES
from ..waiting import parse_prefer_wait, wait_for_end
from .common import SUBMIT_RESPONSES, Auth, Principal, Services, Svc, call, dump, json_response
from .forms import read_cast, read_percify
from .idempotency import Idem, Idempotency
from .openapi import CAST_BODY, PERCIFY_BODY
from .rendering import render_avatar

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
    resp = await idem.run(dump(body), lambda: accepted(svc, service.generate(svc, principal, body)))
    return await maybe_wait(svc, principal, resp, prefer)


@router.post("/avatars/percify-yourself", status_code=202, response_model=S.CreatedAvatar, tags=["avatars"],
             openapi_extra=PERCIFY_BODY, summary="1..5 photos of one person + prompt/style → identity-preserving avatar")
async def percify(request: Request, principal: Principal = Auth, svc: Services = Svc, idem: Idempotency = Idem,
                  prefer: Optional[str] = PREFER):
    form = await read_percify(request, svc)
    resp = await idem.run(form.canonical, lambda: accepted(svc, service.percify(svc, principal, form)))
    return await maybe_wait(svc, principal, resp, prefer)


@router.post("/avatars/cast", status_code=202, response_model=S.CreatedAvatar, tags=["avatars"], openapi_extra=CAST_BODY,
             summary="Scene prompt + 2..4 characters (photos or own avatarId) → one image")
async def cast(request: Request, principal: Principal = Auth, svc: Services = Svc, idem: Idempotency = Idem,
               prefer: Optional[str] = PREFER):
    form = await read_cast(request, svc, principal)
    resp = await idem.run(form.canonical, lambda: accepted(svc, service.cast(svc, principal, form)))
    return await maybe_wait(svc, principal, resp, prefer)


@router.post("/avatars/{avatarId}/remix", status_code=202, response_model=S.CreatedAvatar, tags=["social"],
             summary="New avatar derived (img2img) from a visible completed one")
async def remix(body: S.RemixRequest, avatar_id: str = Path(alias="avatarId"), principal: Principal = Auth,
                svc: Services = Svc, idem: Idempotency = Idem, prefer: Optional[str] = PREFER):
    resp = await idem.run({"src": avatar_id, **dump(body)},
                          lambda: accepted(svc, service.remix(svc, principal, avatar_id, body)))
    return await maybe_wait(svc, principal, resp, prefer)


async def accepted(svc: Services, submission: Awaitable[Avatar]) -> JSONResponse:
    """202 with the queued avatar and its Location, once the submission service persisted it."""
    av = await submission
    return json_response(created(av, svc), 202, headers={"Location": f"/v1/avatars/{av.id}"})


def created(av: Any, svc: Services) -> S.CreatedAvatar:
    """What a create call answers: the Avatar plus `creditsUsed` (Percify's create response)."""
    return S.CreatedAvatar(**render_avatar(av, svc.base_url, svc.links).model_dump(), credits_used=av.credit_cost)


async def maybe_wait(svc: Services, principal: Principal, resp: Response, prefer: str | None) -> Response:
    """`Prefer: wait[=N]` (RFC 7240, the Replicate pattern) on a create request: once the job is
    persisted (and its response stored for the Idempotency-Key), hold the answer until the job
    ends — 201 with the finished avatar (completed, failed or cancelled) — or N seconds pass —
    202 with its current state. Waiting polls the store (`serve.waiting`); it holds no database
    connection and no engine slot. Over the waiter bounds, the 202 is returned at once."""
    seconds = parse_prefer_wait(prefer, svc.settings.max_wait_s)
    if seconds is None or resp.status_code != 202:
        return resp
    try:
        avatar_id = json.loads(bytes(resp.body))["id"]
    except (ValueError, KeyError, TypeError):
        return resp
    headers = {k: v for k, v in resp.headers.items() if k.lower() in ("location", "idempotent-replayed")}
    with svc.waiters.slot(principal.id, principal.limits.concurrent_jobs) as ok:
        if not ok:
            return resp
        status = await wait_for_end(svc.store, avatar_id, svc.settings, seconds)
    av = await call(svc.store.get_avatar, avatar_id)
    if av is None or status is None:
        return resp
    applied = {"Preference-Applied": f"wait={int(seconds)}"}
    code = 201 if av.status in TERMINAL_STATUSES else 202
    return json_response(created(av, svc), code, headers={**headers, **applied})
