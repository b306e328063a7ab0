"""Model profiles (models.yaml) and engine settings as typed, documented config objects.

A profile says where a pipeline's weights come from and how to run it; the engine never
hard-codes a model. Unknown keys are rejected so a typo in models.yaml fails loudly.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ProfileError

ARCHITECTURES = ("sd15", "sdxl")
SCHEDULERS = ("euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "lcm", "pndm")
DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class SpeedOptions:
    """Inference speed settings. `None` means "on where it helps" (decided per device)."""

    attention: str = "auto"  # auto | sdpa | xformers | default. auto: xformers on CUDA when installed, else SDPA
    channels_last: bool | None = None  # None: on for CUDA only
    compile: bool | None = None  # torch.compile; None: on for CUDA only (recompiles per batch shape)
    compile_mode: str = "regional"  # regional (repeated transformer blocks) | full (whole UNet)
    fuse_qkv: bool | None = None  # fused attention projections; None: on for CUDA; skipped when IP-Adapter is loaded
    vae_slicing_threshold: int = 8  # decode the VAE one image at a time above this many images per call
    warmup: bool = True  # one short generation at load so the first request doesn't pay kernel selection


@dataclass
class IPAdapterSource:
    """Where a profile's IP-Adapter FaceID weights come from.

    `tiny: true` builds random weights of matching shapes in-process (tests, embedded default).
    Otherwise `repo_id` (hub) or `local_path` (a directory) + `weight_name` are passed to
    diffusers' `load_ip_adapter`. `variant` is `faceid` or `faceid-plusv2` (Plus v2 also needs a
    CLIP image encoder, `image_encoder`)."""

    variant: str = "faceid"
    tiny: bool = False
    repo_id: str | None = None
    local_path: str | None = None
    subfolder: str | None = None
    weight_name: str | None = None
    image_encoder: str | None = None
    lora_scale: float = 0.6  # FaceID checkpoints carry a LoRA; its weight when fused into the UNet


@dataclass
class ModelProfile:
    """One entry of models.yaml."""

    name: str
    architecture: str  # sd15 | sdxl
    description: str = ""
    tiny: bool = False  # build a tiny random-weight pipeline of this architecture from config
    random_weights: bool = False  # full-size architecture, random weights, built in memory (GPU speed benchmarks)
    repo_id: str | None = None  # hub id, e.g. "stable-diffusion-v1-5/stable-diffusion-v1-5"
    local_path: str | None = None  # directory in diffusers layout; wins over repo_id
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16" weight files
    dtype: str = "auto"  # auto: bf16 on CUDA when supported else fp16; fp32 on CPU
    scheduler: str = "dpmpp_2m"
    resolution: int = 512  # native side length; aspect ratios keep about resolution² pixels
    size_multiple: int = 64
    steps: int = 25
    guidance_scale: float = 7.0
    credit_cost: int = 2  # credits per image
    max_batch_size: int | None = None  # images per pipeline call; None: engine's memory-aware default
    ip_adapter: IPAdapterSource | None = None
    face_min_size: int = 32  # faces smaller than this (pixels) are refused as references
    safety_checker: str | None = None  # dotted path "module:callable(images)->list[bool]" run on outputs
    speed: SpeedOptions = field(default_factory=SpeedOptions)

    def __post_init__(self) -> None:
        def bad(param: str, msg: str) -> ProfileError:
            return ProfileError(f"models.yaml profile {self.name!r}: {param} {msg}", param=param)

        if self.architecture not in ARCHITECTURES:
            raise bad("architecture", f"must be one of {ARCHITECTURES}")
        if self.scheduler not in SCHEDULERS:
            raise bad("scheduler", f"must be one of {SCHEDULERS}")
        if self.dtype not in DTYPES:
            raise bad("dtype", f"must be one of {DTYPES}")
        if not (self.tiny or self.random_weights) and not (self.repo_id or self.local_path):
            raise bad("repo_id", "or local_path is required unless tiny: true")
        if self.resolution % self.size_multiple:
            raise bad("resolution", f"must be a multiple of size_multiple ({self.size_multiple})")

    @property
    def source(self) -> str:
        if self.tiny:
            return "tiny (built from config)"
        if self.random_weights:
            return "full-size random weights (benchmarks)"
        return self.local_path or self.repo_id or ""


def _build(cls, data: dict[str, Any], where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) {sorted(unknown)}; known keys: {sorted(known)}")
    return cls(**data)


def parse_profiles(doc: dict[str, Any], where: str = "models.yaml") -> dict[str, ModelProfile]:
    profiles: dict[str, ModelProfile] = {}
    for name, body in (doc.get("profiles") or {}).items():
        body = dict(body or {})
        if isinstance(body.get("ip_adapter"), dict):
            body["ip_adapter"] = _build(IPAdapterSource, body["ip_adapter"], f"{where} {name}.ip_adapter")
        if isinstance(body.get("speed"), dict):
            body["speed"] = _build(SpeedOptions, body["speed"], f"{where} {name}.speed")
        profiles[name] = _build(ModelProfile, {"name": name, **body}, f"{where} {name}")
    if not profiles:
        raise ProfileError(f"{where} defines no profiles")
    return profiles


def default_models_path() -> Path:
    """$AVATAR_ENGINE_MODELS, else the models.yaml at the project root, else the packaged copy."""
    env = os.environ.get("AVATAR_ENGINE_MODELS")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parent.parent / "models.yaml"
    return root if root.exists() else Path(__file__).resolve().parent / "models.yaml"


def load_profiles(path: str | os.PathLike | None = None) -> dict[str, ModelProfile]:
    p = Path(path) if path else default_models_path()
    if not p.exists():
        raise ProfileError(f"model profiles file not found: {p} (set AVATAR_ENGINE_MODELS or pass a path)")
    with open(p, encoding="utf-8") as fh:
        doc = yaml.safe_load(fh) or {}
    return parse_profiles(doc, str(p))


def default_profile_name(path: str | os.PathLike | None = None) -> str:
    p = Path(path) if path else default_models_path()
    with open(p, encoding="utf-8") as fh:
        doc = yaml.safe_load(fh) or {}
    return doc.get("default", "tiny-sd15")


def cache_dir() -> Path:
    """Where built tiny models and other derived files live ($AVATAR_ENGINE_CACHE)."""
    d = os.environ.get("AVATAR_ENGINE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "avatar-engine")
    return Path(d)


@dataclass
class EngineConfig:
    """Engine-wide settings.

    device: "cuda", "cpu" or None (CUDA when available).
    max_batch_size: images per pipeline call cap; None = memory-aware (CPU: 16; CUDA: from free memory).
    profiles_path: models.yaml to read (None: default_models_path()).
    face_backend: "embedded" (offline, CPU) or "insightface" (needs face_model_root).
    face_scorer: what scores identity (faces/scoring.py): "auto" (dlib when installed, else the
    labelled hand-crafted fallback), "dlib", "arcface" (insightface backend) or "handcrafted".
    """

    device: str | None = None
    max_batch_size: int | None = None
    profiles_path: str | None = None
    default_model: str | None = None
    face_backend: str = "embedded"
    face_model_root: str | None = None
    face_model_name: str = "buffalo_l"
    face_scorer: str = "auto"
