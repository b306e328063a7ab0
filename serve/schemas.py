"""Wire models (pydantic, camelCase) — the single source of the OpenAPI document.

Request bodies forbid unknown fields so a typo comes back as a 400 naming it. Ranges are taken
from `avatar_engine.requests` so the schema and the engine's own validation cannot drift.
Timestamps are ISO 8601 UTC strings (`2026-11-29T07:24:00.123Z`).
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from avatar_engine.requests import (
    ASPECT_RATIOS, CAST_CHARACTERS_RANGE, GUIDANCE_RANGE, IDENTITY_STRENGTH_RANGE, MAX_BATCH_SIZE,
    MAX_REFERENCE_PHOTOS, PROMPT_MAX_CHARS, SEED_MAX, STEPS_RANGE, STYLE_PRESETS,
)

from .vocab import EventName, KindName, SortFieldName, SortOrderName, StatusName, VisibilityName

StylePreset = Literal[STYLE_PRESETS]  # type: ignore[valid-type]
AspectRatio = Literal[ASPECT_RATIOS]  # type: ignore[valid-type]
Visibility = VisibilityName
Status = StatusName
Kind = KindName
SortBy = SortFieldName
SortOrder = SortOrderName

IDENTITY_METHOD_DOC = ("Identity method: `faceid`, `faceid-plus-v2` or `instantid` (SDXL models); the model must offer "
                      "it (GET /v1/health lists each model's `identityMethods`, the default first). Default: the model's.")
MAX_TAGS = 20
MAX_TAG_CHARS = 50
MAX_TITLE_CHARS = 200
MAX_DESCRIPTION_CHARS = 2000
COMMENT_MAX_CHARS = 2000


def iso(ts: float | None) -> str | None:
    """Epoch seconds → the wire's timestamp format (`2026-11-29T07:24:00.123Z`)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _In(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class _Out(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------
class AvatarMetaFields(_In):
    """Optional descriptive fields any submission may set."""

    title: Optional[str] = Field(None, max_length=MAX_TITLE_CHARS)
    description: Optional[str] = Field(None, max_length=MAX_DESCRIPTION_CHARS)
    tags: Optional[list[str]] = Field(None, max_length=MAX_TAGS)
    metadata: Optional[dict[str, Any]] = Field(None, description="Free-form JSON object (≤ 16 KB), returned unchanged.")
    visibility: Visibility = "private"


class GenerationFields(AvatarMetaFields):
    prompt: str = Field(..., min_length=1, max_length=PROMPT_MAX_CHARS)
    negative_prompt: Optional[str] = Field(None, max_length=PROMPT_MAX_CHARS)
    style_preset: Optional[StylePreset] = None
    aspect_ratio: AspectRatio = "1:1"
    guidance_scale: Optional[float] = Field(None, ge=GUIDANCE_RANGE[0], le=GUIDANCE_RANGE[1])
    seed: Optional[int] = Field(None, ge=0, le=SEED_MAX, description="Random when absent; always returned.")
    steps: Optional[int] = Field(None, ge=STEPS_RANGE[0], le=STEPS_RANGE[1])
    model: Optional[str] = Field(None, description="A model profile name (GET /v1/health lists them).")


class GenerateRequest(GenerationFields):
    batch_size: int = Field(1, ge=1, le=MAX_BATCH_SIZE)


class PercifyRequest(GenerationFields):
    """JSON variant; the multipart variant sends the same fields as form fields and each photo
    as a repeated `photo` file part."""

    prompt: str = Field("a portrait photo of a person", min_length=1, max_length=PROMPT_MAX_CHARS)
    photos: Optional[list[str]] = Field(None, min_length=1, max_length=MAX_REFERENCE_PHOTOS,
                                        description="Base64 images (PNG/JPEG/WebP), optionally as data: URLs, or "
                                                    "http(s) URLs of such images (fetched by the service).")
    photo_url: Optional[str] = Field(None, min_length=1, max_length=2000,
                                     description="An http(s) URL of a photo of the person (Percify's field), "
                                                 "fetched through the SSRF guard.")
    photo_urls: Optional[list[str]] = Field(None, min_length=1, max_length=MAX_REFERENCE_PHOTOS,
                                            description="Several photo URLs of the same person.")
    identity_strength: Optional[float] = Field(None, ge=IDENTITY_STRENGTH_RANGE[0], le=IDENTITY_STRENGTH_RANGE[1])
    identity_method: Optional[str] = Field(None, max_length=40, description=IDENTITY_METHOD_DOC)
    batch_size: int = Field(1, ge=1, le=MAX_BATCH_SIZE)

    def photo_sources(self) -> list[tuple[str, str]]:
        """(param, value) of every photo given, in order: `photos[i]`, `photoUrl`, `photoUrls[i]`."""
        out = [(f"photos[{i}]", v) for i, v in enumerate(self.photos or [])]
        if self.photo_url is not None:
            out.append(("photoUrl", self.photo_url))
        out += [(f"photoUrls[{i}]", v) for i, v in enumerate(self.photo_urls or [])]
        return out


class CastCharacterIn(_In):
    prompt: str = Field(..., min_length=1, max_length=PROMPT_MAX_CHARS)
    box: Optional[list[float]] = Field(None, min_length=4, max_length=4,
                                       description="Region [x0, y0, x1, y1] as fractions 0..1 of the frame.")
    photos: Optional[list[str]] = Field(None, min_length=1, max_length=MAX_REFERENCE_PHOTOS,
                                        description="Base64 reference photos of this character, or http(s) URLs of them.")
    avatar_id: Optional[str] = Field(None, description="One of your completed avatars to use as this character's reference.")


class CastRequest(GenerationFields):
    """JSON variant. Multipart: a `characters` form field holding the JSON list (without
    photos) plus file parts named `photo{i}` (i = 0-based character index), repeatable."""

    characters: list[CastCharacterIn] = Field(..., min_length=CAST_CHARACTERS_RANGE[0], max_length=CAST_CHARACTERS_RANGE[1])
    layout: Optional[Literal["auto", "columns", "rows", "custom"]] = Field(
        None, description="Placement: `auto` (from the aspect ratio), `columns`, `rows`, or `custom` (every character has a box).")
    identity_strength: Optional[float] = Field(None, ge=IDENTITY_STRENGTH_RANGE[0], le=IDENTITY_STRENGTH_RANGE[1])
    identity_method: Optional[str] = Field(None, max_length=40, description=IDENTITY_METHOD_DOC)


class RemixRequest(AvatarMetaFields):
    prompt: Optional[str] = Field(None, min_length=1, max_length=PROMPT_MAX_CHARS, description="Defaults to the source's prompt.")
    negative_prompt: Optional[str] = Field(None, max_length=PROMPT_MAX_CHARS)
    style_preset: Optional[StylePreset] = None
    strength: float = Field(0.6, gt=0.0, le=1.0, description="How far to move from the source image (img2img).")
    guidance_scale: Optional[float] = Field(None, ge=GUIDANCE_RANGE[0], le=GUIDANCE_RANGE[1])
    seed: Optional[int] = Field(None, ge=0, le=SEED_MAX)
    steps: Optional[int] = Field(None, ge=STEPS_RANGE[0], le=STEPS_RANGE[1])
    batch_size: int = Field(1, ge=1, le=MAX_BATCH_SIZE)
    image_index: int = Field(0, ge=0, lt=MAX_BATCH_SIZE, description="Which image of the source to start from.")


class UpdateAvatarRequest(_In):
    title: Optional[str] = Field(None, max_length=MAX_TITLE_CHARS)
    description: Optional[str] = Field(None, max_length=MAX_DESCRIPTION_CHARS)
    tags: Optional[list[str]] = Field(None, max_length=MAX_TAGS)
    visibility: Optional[Visibility] = None
    metadata: Optional[dict[str, Any]] = None


class CommentRequest(_In):
    text: str = Field(..., min_length=1, max_length=COMMENT_MAX_CHARS)


class WebhookCreateRequest(_In):
    url: str = Field(..., max_length=2000)
    events: list[EventName] = Field(default_factory=lambda: ["*"], min_length=1)
    description: Optional[str] = Field(None, max_length=500)


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------
class AvatarImage(_Out):
    url: str
    width: int
    height: int
    seed: Optional[int] = None


class ErrorInfo(_Out):
    code: str
    message: str


class Timings(_Out):
    queued_ms: Optional[int] = None
    generation_ms: Optional[int] = None


class Identity(_Out):
    faces: Optional[int] = Field(None, description="Reference photos in which a usable face was found.")
    similarity: Optional[float] = Field(None, description="Mean cosine similarity between the reference identity and the face in each output image.")
    per_image: Optional[list[Optional[float]]] = Field(None, description="Similarity per output image (null: no face found).")
    strength: Optional[float] = None
    method: Optional[str] = Field(None, description="Identity method that produced the images.")
    notes: Optional[list[str]] = None


class CastCharacterOut(_Out):
    prompt: str
    avatar_id: Optional[str] = None
    photos: int = Field(0, description="Number of reference photos given for this character.")
    box: Optional[list[float]] = Field(None, description="Region used, fractions of the frame (after completion).")
    has_identity: Optional[bool] = None
    similarity: Optional[float] = Field(None, description="Face similarity of this character's reference to the face found for it (mean over images).")


class Progress(_Out):
    step: int = Field(..., description="Denoising steps done so far (written by the worker at most once per `progress_interval_s`).")
    total_steps: int


class Avatar(_Out):
    id: str
    object: Literal["avatar"] = "avatar"
    kind: Kind
    status: Status
    prompt: Optional[str] = None
    negative_prompt: Optional[str] = None
    style_preset: Optional[str] = None
    model: Optional[str] = None
    width: Optional[int] = None
    height: Optional[int] = None
    aspect_ratio: Optional[str] = None
    guidance_scale: Optional[float] = None
    steps: Optional[int] = None
    seed: Optional[int] = None
    batch_size: int = 1
    strength: Optional[float] = None
    images: list[AvatarImage] = Field(default_factory=list)
    thumbnail_url: Optional[str] = None
    progress: Optional[Progress] = Field(None, description="While `processing`: steps done of the batch it runs in; null otherwise.")
    title: Optional[str] = None
    description: Optional[str] = None
    tags: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)
    visibility: Visibility = "private"
    published: bool = False
    published_at: Optional[str] = None
    likes: int = 0
    comments: int = 0
    remixes: int = 0
    remixed_from: Optional[str] = None
    credit_cost: int = 0
    error: Optional[ErrorInfo] = None
    timings: Timings = Field(default_factory=Timings)
    identity_method: Optional[str] = Field(None, description="percify, cast with faces: the identity method that produced the images.")
    identity: Optional[Identity] = None
    characters: Optional[list[CastCharacterOut]] = None
    created_at: str
    updated_at: str
    completed_at: Optional[str] = None


class AvatarList(_Out):
    object: Literal["list"] = "list"
    data: list[Avatar]
    has_more: bool
    next_cursor: Optional[str] = None


class DeletedAvatar(_Out):
    id: str
    object: Literal["avatar"] = "avatar"
    deleted: bool = True
    status: Status


class Limits(_Out):
    requests_per_minute: int
    concurrent_generations: int


class Costs(_Out):
    generate_per_image: dict[str, int]
    percify: int
    cast: int


class Account(_Out):
    id: str
    object: Literal["account"] = "account"
    tier: str
    credits: int
    limits: Limits
    costs: Costs
    created_at: str


class ModelInfo(_Out):
    name: str
    credit_cost: int
    resolution: Optional[int] = None
    kinds: list[str] = Field(default_factory=list)
    identity_methods: list[str] = Field(default_factory=list, description="Identity methods `identityMethod` may name, the default first.")
    engine: Optional[dict[str, Any]] = Field(
        None, description="What runs on the loaded model, read back from its modules: dtype, attention kernel, "
                          "fused projections, compile scope/mode, batch buckets, identity adapter, warm-up.")


class Health(_Out):
    status: Literal["ok", "degraded"]
    version: str
    default_model: Optional[str] = None
    models: list[ModelInfo] = Field(default_factory=list)
    database: Literal["ok", "error"]


class LikeState(_Out):
    object: Literal["like"] = "like"
    avatar_id: str
    liked: bool
    likes: int


class Comment(_Out):
    id: str
    object: Literal["comment"] = "comment"
    avatar_id: str
    account_id: str
    text: str
    created_at: str


class CommentList(_Out):
    object: Literal["list"] = "list"
    data: list[Comment]
    has_more: bool
    next_cursor: Optional[str] = None


class WebhookEndpoint(_Out):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    events: list[str]
    description: Optional[str] = None
    disabled: bool = False
    disabled_reason: Optional[str] = None
    created_at: str
    secret: Optional[str] = Field(None, description="Signing secret; only returned when the endpoint is created.")


class WebhookEndpointList(_Out):
    object: Literal["list"] = "list"
    data: list[WebhookEndpoint]


class DeletedWebhook(_Out):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    deleted: bool = True


class ErrorBody(_Out):
    code: str
    message: str
    param: Optional[str] = None
    request_id: str


class ErrorResponse(_Out):
    error: ErrorBody
