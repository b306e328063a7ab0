"""Wire models (pydantic, camelCase) — the single source of the OpenAPI document.

Request bodies forbid unknown fields so a typo comes back as a 400 naming it, and take JSON types
strictly (no "7" → 7, no true → 1.0). Ranges are taken
from `avatar_engine.requests` so the schema and the engine's own validation cannot drift.
Timestamps are ISO 8601 UTC strings (`2026-11-29T07:24:00.123Z`). The bases are in `base`, the
account, model catalog and health objects in `catalog`; every model is importable from here.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import AliasChoices, ConfigDict, Field

from avatar_engine.identity_methods import METHODS
from avatar_engine.requests import (
    ASPECT_RATIOS, CAST_CHARACTERS_RANGE, GUIDANCE_RANGE, IDENTITY_STRENGTH_RANGE, MAX_BATCH_SIZE,
    MAX_REFERENCE_PHOTOS, PROMPT_MAX_CHARS, SEED_MAX, STEPS_RANGE, STYLE_PRESETS,
)
from avatar_engine.styles import STYLE_NAME, STYLE_STRENGTH_RANGE

from ..vocab import EventName, KindName, SortFieldName, SortOrderName, StatusName, VisibilityName
from .base import _In, _Out, dump, iso  # noqa: F401 - `dump`, `iso` are imported from here
from .catalog import (Account, Costs, FaceSettings, Health, Limits, ModelInfo, ModelList,  # noqa: F401 - re-exported
                      ServedModel, StyleInfo, StyleLoRA)

#: A style name. Which styles exist is each model's (models.yaml `styles:`): the built-ins
#: (`STYLE_PRESETS`) everywhere, LoRA styles where configured; GET /v1/models lists them and
#: submit refuses one the chosen model does not offer (400 naming stylePreset).
STYLE_PRESET_DOC = (f"A style the model offers: the built-ins {', '.join(STYLE_PRESETS)} on every model, plus the "
                    "model's own (LoRA) styles; GET /v1/models lists each model's `styles`. A style the chosen model "
                    "does not offer is a 400 naming stylePreset.")
StylePreset = Annotated[str, Field(pattern=STYLE_NAME.pattern, max_length=64)]
STYLE_STRENGTH_DOC = (f"{STYLE_STRENGTH_RANGE[0]:g}..{STYLE_STRENGTH_RANGE[1]:g}: scales the style's LoRA (its "
                      "configured scale × this); default 1. No effect on a style without a LoRA.")
AspectRatio = Literal[ASPECT_RATIOS]  # type: ignore[valid-type]
Visibility = VisibilityName
Status = StatusName
Kind = KindName
SortBy = SortFieldName
SortOrder = SortOrderName

_METHOD_NAMES = [f"`{m.name}`" + (" (SDXL models)" if m.architectures == ("sdxl",) else "") for m in METHODS.values()]
IDENTITY_METHOD_DOC = (f"Identity method: {', '.join(_METHOD_NAMES[:-1])} or {_METHOD_NAMES[-1]}; the model must offer "
                       "it (GET /v1/health lists each model's `identityMethods`, the default first). Default: the model's.")
MAX_TAGS = 20
MAX_TAG_CHARS = 50
#: "Has a non-blank character" in Python's, Rust's (pydantic) and JSON Schema's regex dialects
#: alike (Python's str.strip() also strips \x1c-\x1f, which Rust's \s does not match).
NONBLANK = r"[^\s\x1c-\x1f]"
Tag = Annotated[str, Field(min_length=1, max_length=50, pattern=NONBLANK)]
MAX_TITLE_CHARS = 200
MAX_DESCRIPTION_CHARS = 2000
COMMENT_MAX_CHARS = 2000


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------
class AvatarMetaFields(_In):
    """Optional descriptive fields any submission may set."""

    title: Optional[str] = Field(None, max_length=MAX_TITLE_CHARS)
    description: Optional[str] = Field(None, max_length=MAX_DESCRIPTION_CHARS)
    tags: Optional[list[Tag]] = Field(None, max_length=MAX_TAGS)
    metadata: Optional[dict[str, Any]] = Field(None, description="Free-form JSON object (≤ 16 KB), returned unchanged.")
    visibility: Visibility = "private"


class GenerationFields(AvatarMetaFields):
    prompt: str = Field(..., min_length=1, max_length=PROMPT_MAX_CHARS, pattern=NONBLANK)
    negative_prompt: Optional[str] = Field(None, max_length=PROMPT_MAX_CHARS)
    style_preset: Optional[StylePreset] = Field(None, description=STYLE_PRESET_DOC)
    style_strength: Optional[float] = Field(None, ge=STYLE_STRENGTH_RANGE[0], le=STYLE_STRENGTH_RANGE[1],
                                            description=STYLE_STRENGTH_DOC)
    aspect_ratio: AspectRatio = "1:1"
    guidance_scale: Optional[float] = Field(None, ge=GUIDANCE_RANGE[0], le=GUIDANCE_RANGE[1])
    seed: Optional[int] = Field(None, ge=0, le=SEED_MAX, description="Random when absent; always returned.")
    steps: Optional[int] = Field(None, ge=STEPS_RANGE[0], le=STEPS_RANGE[1])
    model: Optional[str] = Field(None, min_length=1, max_length=100,
                                 description="A model profile name or alias (GET /v1/models lists them).")


class GenerateRequest(GenerationFields):
    batch_size: int = Field(1, ge=1, le=MAX_BATCH_SIZE)


class PercifyRequest(GenerationFields):
    """JSON variant; multipart sends the same fields as form fields and each photo as a repeated `photo` part."""

    # at least one photo: `photos`, `photoUrl` or `photoUrls`
    model_config = ConfigDict(json_schema_extra=lambda schema: _percify_schema(schema))

    prompt: str = Field("a portrait photo of a person", min_length=1, max_length=PROMPT_MAX_CHARS, pattern=NONBLANK)
    photos: Optional[list[str]] = Field(None, min_length=1, max_length=MAX_REFERENCE_PHOTOS,
                                        description="Base64 images (PNG/JPEG/WebP), optionally as data: URLs, or "
                                                    "http(s) URLs of such images (fetched by the service).")
    photo_url: Optional[str] = Field(None, min_length=1, max_length=2000,
                                     validation_alias=AliasChoices("photoUrl", "photo_url", "imageUrl"),
                                     description="An http(s) URL of a photo of the person (Percify's field), "
                                                 "fetched through the SSRF guard. `imageUrl` is accepted as its "
                                                 "alias in JSON bodies (not both).")
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


def _percify_schema(schema: dict[str, Any]) -> None:
    """At least one photo (`photos`, `photoUrl`/`imageUrl` or `photoUrls`); `imageUrl` is `photoUrl`'s alias."""
    props = schema.setdefault("properties", {})
    if "photoUrl" in props:
        props["imageUrl"] = {**props["photoUrl"], "description": "Alias of `photoUrl` (JSON bodies)."}
    schema["anyOf"] = [{"required": [name], "properties": {name: {"type": kind}}} for name, kind in
                       (("photos", "array"), ("photoUrl", "string"), ("imageUrl", "string"), ("photoUrls", "array"))]
    schema["not"] = {"required": ["photoUrl", "imageUrl"]}


class CastCharacterIn(_In):
    prompt: str = Field(..., min_length=1, max_length=PROMPT_MAX_CHARS, pattern=NONBLANK)
    box: Optional[list[Annotated[float, Field(ge=0.0, le=1.0)]]] = Field(None, min_length=4, max_length=4,
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
    prompt: Optional[str] = Field(None, min_length=1, max_length=PROMPT_MAX_CHARS, pattern=NONBLANK,
                                  description="Defaults to the source's prompt.")
    negative_prompt: Optional[str] = Field(None, max_length=PROMPT_MAX_CHARS)
    style_preset: Optional[StylePreset] = Field(None, description="Defaults to the source's. " + STYLE_PRESET_DOC)
    style_strength: Optional[float] = Field(None, ge=STYLE_STRENGTH_RANGE[0], le=STYLE_STRENGTH_RANGE[1],
                                            description=STYLE_STRENGTH_DOC + " Defaults to the source's when the "
                                                        "style is the source's.")
    strength: float = Field(0.6, gt=0.0, le=1.0, description="How far to move from the source image (img2img).")
    guidance_scale: Optional[float] = Field(None, ge=GUIDANCE_RANGE[0], le=GUIDANCE_RANGE[1])
    seed: Optional[int] = Field(None, ge=0, le=SEED_MAX)
    steps: Optional[int] = Field(None, ge=STEPS_RANGE[0], le=STEPS_RANGE[1])
    batch_size: int = Field(1, ge=1, le=MAX_BATCH_SIZE)
    image_index: int = Field(0, ge=0, lt=MAX_BATCH_SIZE, description="Which image of the source to start from.")


def _absent(schema: dict[str, Any]) -> None:
    """A field that may be left out but not sent as null: no `default: null` in its schema."""
    schema.pop("default", None)


class UpdateAvatarRequest(_In):
    """Fields left out stay unchanged; `title` and `description` may be null (cleared), the others not."""

    title: Optional[str] = Field(None, max_length=MAX_TITLE_CHARS)
    description: Optional[str] = Field(None, max_length=MAX_DESCRIPTION_CHARS)
    tags: list[Tag] = Field(None, max_length=MAX_TAGS, json_schema_extra=_absent)  # type: ignore[assignment]
    visibility: Visibility = Field(None, json_schema_extra=_absent)  # type: ignore[assignment]
    metadata: dict[str, Any] = Field(None, json_schema_extra=_absent)  # type: ignore[assignment]


class CommentRequest(_In):
    text: str = Field(..., min_length=1, max_length=COMMENT_MAX_CHARS, pattern=NONBLANK)


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_PORT = r"(?:[0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
#: An http(s) URL with a host name or an IPv4 address, an optional port and printable ASCII after
#: it (no credentials, no IPv6 literal: use a host name). Whether the destination is allowed
#: (DNS, private ranges) is the deployment's policy, checked when it is created and on every delivery.
WEBHOOK_URL_PATTERN = (rf"^https?://(?:{_OCTET}(?:\.{_OCTET}){{3}}|(?:{_LABEL}\.)*[A-Za-z](?:[A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?)"
                       rf"(?::{_PORT})?(?:[/?#][!-~]*)?$")


class WebhookCreateRequest(_In):
    url: str = Field(..., max_length=2000, pattern=WEBHOOK_URL_PATTERN,
                     description="http(s) URL of your receiver; private and loopback destinations are refused unless "
                                 "the operator allows them.")
    events: list[EventName] = Field(default_factory=lambda: ["*"], min_length=1)
    description: Optional[str] = Field(None, max_length=500)


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------
class ImageSafetyResult(_Out):
    """`score` in [0, 1] (higher: less safe), `label` safe/nsfw, `checker`, the policy's `action` (pass/flag/blur)."""
    score: float
    label: str
    checker: str
    action: str


class AvatarImage(_Out):
    url: str
    width: int
    height: int
    seed: Optional[int] = None
    safety: Optional[ImageSafetyResult] = None


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


class StyleLoRAUsed(_Out):
    name: str = Field(..., description="The LoRA's name (its file's or hub weight's stem; never a path).")
    scale: float = Field(..., description="The LoRA weight applied: the style's configured scale × styleStrength "
                                          "(the configured scale when fused).")
    mode: Literal["stacked", "fused"] = Field(..., description="`stacked`: resident beside the model's other LoRA "
                                                               "styles, chosen per image; `fused`: merged into the "
                                                               "weights (the model's `fuseStyle`).")


class StyleReport(_Out):
    """What the engine reports it ran: the style pack and, for a LoRA style, the LoRA and its scale."""
    name: str
    strength: Optional[float] = Field(None, description="The styleStrength applied (null for a style without a LoRA "
                                                        "and no styleStrength given).")
    lora: Optional[StyleLoRAUsed] = None


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
    user_id: str = Field(..., description="The owning account (Percify's `userId`).")
    kind: Kind
    status: Status
    prompt: Optional[str] = None
    negative_prompt: Optional[str] = None
    style_preset: Optional[str] = None
    style_strength: Optional[float] = Field(None, description="As resolved at submission: the request's, or 1 for a "
                                                              "LoRA style when not given; null otherwise.")
    style: Optional[StyleReport] = Field(None, description="Once completed: the style the engine applied "
                                                           "(`{name, strength, lora: {name, scale, mode} | null}`); "
                                                           "null without a style.")
    model: Optional[str] = Field(None, description="The model name as requested (a profile or one of its aliases; "
                                                   "the default profile's name when none was given).")
    model_profile: Optional[str] = Field(None, description="The models.yaml profile that ran it (aliases resolved).")
    width: Optional[int] = None
    height: Optional[int] = None
    aspect_ratio: Optional[str] = None
    guidance_scale: Optional[float] = None
    steps: Optional[int] = None
    seed: Optional[int] = None
    batch_size: int = 1
    strength: Optional[float] = None
    images: list[AvatarImage] = Field(default_factory=list)
    image_url: Optional[str] = Field(None, description="The first image's URL (Percify's `imageUrl`); null until completed.")
    thumbnail_url: Optional[str] = None
    progress: Optional[Progress] = Field(None, description="While `processing`: steps done of the batch it runs in; null otherwise.")
    title: Optional[str] = None
    description: Optional[str] = None
    tags: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict, description=(
        "The user's keys, plus `modelVersion` (the profile that ran it) and, once completed, `generationTime` "
        "(seconds); the service's values win for those two names."))
    visibility: Visibility = "private"
    published: bool = False
    published_at: Optional[str] = None
    likes: int = 0
    comments: int = 0
    remixes: int = 0
    remixed_from: Optional[str] = None
    credit_cost: int = 0
    # Named `credits_held` in Python so that `CreatedAvatar(**avatar.model_dump(), credits_used=…)` stays valid.
    credits_held: int = Field(0, alias="creditsUsed", description="Credits this job holds (reserved while it runs, charged when it "
                                             "completes; 0 once failed or cancelled: they were refunded).")
    queue_position: Optional[int] = Field(None, description="While `queued`: 1 + the jobs queued before it (an "
                                                            "estimate: higher tiers go first); null otherwise.")
    cancel_requested: bool = Field(False, description="`POST .../cancel` asked to stop it while processing; "
                                                      "its worker ends it (cancelled, refunded) at the next step.")
    error: Optional[ErrorInfo] = None
    timings: Timings = Field(default_factory=Timings)
    identity_method: Optional[str] = Field(None, description="percify, cast with faces: the identity method that produced the images.")
    identity: Optional[Identity] = None
    characters: Optional[list[CastCharacterOut]] = None
    created_at: str
    updated_at: str
    completed_at: Optional[str] = None


class CreatedAvatar(Avatar):
    """What a create call (generate, percify-yourself, cast, remix) returns: the queued Avatar."""

    credits_held: int = Field(0, alias="creditsHeld", exclude=True)  # the Avatar's `creditsUsed`, given below
    credits_used: int = Field(..., description="Credits reserved for this job (charged on completion, released on failure).")


class Pagination(_Out):
    total: int = Field(..., description="Items matching the same filters, over all pages.")
    limit: int
    offset: int = Field(..., description="Items before this page (also for a cursor page).")
    has_more: bool
    next_cursor: Optional[str] = Field(None, description="Pass as `cursor` for the next page; null on the last one.")


class _Page(_Out):
    object: Literal["list"] = "list"
    pagination: Pagination
    has_more: bool = Field(..., description="Same as `pagination.hasMore`.")
    next_cursor: Optional[str] = Field(None, description="Same as `pagination.nextCursor`.")


class AvatarList(_Page):
    avatars: list[Avatar]


class DeletedAvatar(_Out):
    id: str
    object: Literal["avatar"] = "avatar"
    deleted: bool = True
    status: Status


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


class CommentList(_Page):
    comments: list[Comment]


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


class WebhookEndpointList(_Page):
    webhooks: list[WebhookEndpoint]


class OperationUsage(_Out):
    count: int = Field(..., description="Completed jobs of this operation.")
    credits: int = Field(..., description="Credits charged for them.")


class CreditBalance(_Out):
    object: Literal["credit_balance"] = "credit_balance"
    balance: int = Field(..., description="Credits available now (reservations of running jobs already taken off).")
    reserved: int = Field(..., description="Credits held by queued and processing jobs.")
    lifetime: int = Field(..., description="Credits ever charged for completed jobs.")
    current_month: int = Field(..., description="Credits charged since the start of the current UTC month.")
    granted: int = Field(..., description="Credits ever granted to the account.")
    tier: str
    next_refill: Optional[str] = Field(None, description="Always null: this service has no automatic refills.")
    low_balance_threshold: int = Field(..., description="`credits.low_balance` fires when a job takes the balance below this.")
    usage: dict[str, OperationUsage] = Field(default_factory=dict, description="Charges per operation (job kind).")


class CreditTransaction(_Out):
    id: int
    object: Literal["credit_transaction"] = "credit_transaction"
    type: Literal["reserve", "charge", "release", "grant"] = Field(
        ..., description="reserve: job accepted (delta −amount); charge: job completed (delta 0, the reservation is "
                         "consumed); release: job failed/cancelled (delta +amount); grant: top-up.")
    amount: int
    delta: int = Field(..., description="Effect on the balance.")
    operation: Optional[str] = Field(None, description="The job kind for job entries (generate, percify, cast, remix).")
    avatar_id: Optional[str] = None
    note: Optional[str] = None
    created_at: str


class CreditHistory(_Page):
    transactions: list[CreditTransaction]


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

