"""GET /v1/avatars/{avatarId}/provenance: what the stored images say about their origin — each
image's (and the thumbnail's) Content Credentials manifest (valid / tampered / absent) and
invisible watermark, and whether they name this avatar. Same visibility as GET /v1/avatars/{id}:
the owner, or anyone for a public/unlisted/published avatar."""
from __future__ import annotations

from typing import Any, Optional

from fastapi import APIRouter, Path
from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from ..imaging import image_marker, verify_stored
from ..vocab import JobStatus
from .common import ERROR_RESPONSES, Auth, Principal, Services, Svc, call, get_visible, json_response

router = APIRouter(prefix="/v1", tags=["avatars"], responses=ERROR_RESPONSES)


class _Out(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class ImageProvenance(_Out):
    """One stored file: `manifest` (C2PA: `state` valid/tampered/absent/unreadable, signer, generation
    claims), `watermark` (`state`, `payload` hex) and which marks name this avatar (`matchedBy`)."""
    index: Optional[int] = None
    file: str
    manifest: dict[str, Any]
    watermark: dict[str, Any]
    matched_by: list[str]
    matches: bool


class AvatarProvenance(_Out):
    avatar_id: str
    trusted_signer: bool
    images: list[ImageProvenance]


@router.get("/avatars/{avatarId}/provenance", response_model=AvatarProvenance,
            summary="Verify the Content Credentials and watermark of the avatar's stored images")
async def get_provenance(avatar_id: str = Path(alias="avatarId"), principal: Principal = Auth,
                         svc: Services = Svc):
    av = await get_visible(svc, avatar_id, principal)
    result = (av.result or {}) if av.status == JobStatus.COMPLETED else {}
    files = [(i, img["key"]) for i, img in enumerate(result.get("images") or [])]
    if result.get("thumbnailKey") and files:
        files.append((None, result["thumbnailKey"]))

    def verify_all() -> list[ImageProvenance]:
        out = []
        for index, key in files:
            report = verify_stored(svc.settings, svc.assets.get_bytes(key)).to_json(av.id)
            out.append(ImageProvenance(index=index, file="thumbnail" if index is None else "image",
                                       manifest=report["manifest"], watermark=report["watermark"],
                                       matched_by=report["matchedBy"], matches=report["matches"]))
        return out

    marker = image_marker(svc.settings)
    return json_response(AvatarProvenance(avatar_id=av.id, images=await call(verify_all),
                                          trusted_signer=bool(marker and marker.trusted_signer)))
