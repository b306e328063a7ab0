"""Wire models of what the deployment offers: the account and its costs, GET /v1/models (each
model's kinds, identity methods and styles) and GET /v1/health (models, engine, face settings)."""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field

from .base import _Out


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


class StyleLoRA(_Out):
    name: str = Field(..., description="The LoRA's name (the file's or hub weight's stem; never a path).")
    scale: float = Field(..., description="Its weight at styleStrength 1.")


class StyleInfo(_Out):
    """One style a model offers (`StylePack.describe()`): never a file path."""
    name: str = Field(..., description="What `stylePreset` names.")
    description: str = ""
    lora: Optional[StyleLoRA] = Field(None, description="The style's LoRA; null for a prompt-template style.")
    steps: Optional[int] = Field(None, description="Recommended steps, used when the request gives none.")
    guidance_scale: Optional[float] = Field(None, description="Recommended guidance, used when the request gives none.")


class ModelInfo(_Out):
    name: str
    aliases: list[str] = Field(default_factory=list, description="Other names accepted as `model` for this profile.")
    credit_cost: int
    resolution: Optional[int] = None
    kinds: list[str] = Field(default_factory=list)
    identity_methods: list[str] = Field(default_factory=list, description="Identity methods `identityMethod` may name, the default first.")
    styles: list[StyleInfo] = Field(default_factory=list, description="Styles `stylePreset` may name (GET /v1/models has the same list).")
    engine: Optional[dict[str, Any]] = Field(
        None, description="What runs on the loaded model, read back from its modules: dtype, attention kernel, "
                          "fused projections, compile scope/mode, batch buckets, identity adapter, warm-up, and "
                          "`style_loras` (the resident style LoRAs, their layers and memory).")


class ServedModel(_Out):
    name: str
    object: Literal["model"] = "model"
    aliases: list[str] = Field(default_factory=list, description="Other names accepted as `model` for this profile.")
    default: bool = Field(False, description="The model a request without `model` runs on.")
    credit_cost: int = Field(..., description="Credits per image of generate and remix.")
    resolution: Optional[int] = None
    kinds: list[str] = Field(default_factory=list, description="The job kinds it serves.")
    identity_methods: list[str] = Field(default_factory=list, description="Identity methods `identityMethod` may name, the default first.")
    styles: list[StyleInfo] = Field(default_factory=list, description="What `stylePreset` may name on this model, "
                                                                      "built-ins first.")
    fuse_style: Optional[str] = Field(None, description="A LoRA style merged into this model's weights: "
                                                        "`styleStrength` other than 1 is refused on it.")


class ModelList(_Out):
    object: Literal["model_list"] = "model_list"
    default_model: Optional[str] = None
    models: list[ServedModel] = Field(default_factory=list)


class FaceSettings(_Out):
    backend: str = Field(description="Face backend embedding reference photos: embedded or insightface.")
    model_name: Optional[str] = Field(None, description="insightface model pack (insightface backend only).")
    scorer: Optional[str] = Field(None, description="What scores identity: auto, dlib, arcface or handcrafted.")
    arcface_embeddings: bool = Field(description="Whether the backend produces ArcFace embeddings (what trained "
                                                 "FaceID / Plus v2 / InstantID weights expect).")
    non_arcface_override: bool = Field(description="The explicit override (face_allow_non_arcface) is on with a "
                                                   "non-ArcFace backend: trained identity weights start anyway.")


class Health(_Out):
    status: Literal["ok", "degraded"]
    version: str
    default_model: Optional[str] = None
    models: list[ModelInfo] = Field(default_factory=list)
    database: Literal["ok", "error"]
    face: Optional[FaceSettings] = None
