"""POST /v1/avatars/{avatarId}/cancel: stop a job without deleting its record (the studio's
Cancel button). Queued → cancelled at once (200, refunded); processing → the cancel is recorded
(202, `cancelRequested: true`) and the worker ends the job at its next denoising step boundary,
refunded as well; already ended → 409."""
from __future__ import annotations

from fastapi import APIRouter, Path

from .. import schemas as S
from ..errors import ApiError
from ..store import InvalidState
from ..vocab import JobStatus
from .common import ERROR_RESPONSES, Auth, Principal, Services, Svc, call, json_response
from .rendering import render_avatar

router = APIRouter(prefix="/v1", tags=["avatars"], responses=ERROR_RESPONSES)


@router.post("/avatars/{avatarId}/cancel", response_model=S.Avatar,
             responses={202: {"model": S.Avatar, "description": "Processing: the cancel is recorded "
                                                                "(`cancelRequested`); the job stops at its next step"},
                        409: {"model": S.ErrorResponse, "description": "invalid_state: the job already ended"}},
             summary="Cancel a queued or processing job (credits refunded; the avatar record stays)")
async def cancel_avatar(avatar_id: str = Path(alias="avatarId"), principal: Principal = Auth, svc: Services = Svc):
    try:
        av = await call(svc.store.request_cancel, avatar_id, principal.id)  # the owner's only
    except InvalidState as exc:
        raise ApiError(409, "invalid_state", f"Avatar {avatar_id} is already {exc.status}: nothing to cancel",
                       param="avatarId") from None
    upload_id = (av.params or {}).get("uploadId")
    if av.status == JobStatus.CANCELLED and upload_id and svc.settings.photo_retention == "job":
        await call(svc.assets.delete_uploads, upload_id)  # terminal: the reference photos go
    return json_response(render_avatar(av, svc.base_url, svc.links),
                         202 if av.status == JobStatus.PROCESSING else 200)
