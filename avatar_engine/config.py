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
from .identity_methods import IDENTITY_METHODS, METHODS, canonical_method
from .styles import BUILTIN_STYLES, StylePack, merged_styles, parse_styles

ARCHITECTURES = ("sd15", "sdxl")
#: Profile `scheduler` name -> (diffusers scheduler class, its from_config kwargs).
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "lcm": ("LCMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
}
DTYPES = ("auto", "float32", "float16", "bfloat16")


ATTENTION_KERNELS = ("sdpa", "xformers")
COMPILE_SCOPES = ("regional", "blocks", "full")
COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")
PREVIEW_DECODERS = ("none", "taesd")


@dataclass
class SpeedOptions:
    """Inference speed settings, each measurable on/off (benchmarks/gpu_suite.py --ablate).
    `None` means "on where it helps", decided per device in speed.py."""

    attention: str = "sdpa"  # sdpa (PyTorch fused attention; wins on Ampere/Hopper/Ada) | xformers (only when asked)
    channels_last: bool | None = None  # None: on for CUDA with compile_scope full (eager GroupNorm copies it back)
    fuse_qkv: bool | None = None  # fused q/k/v (self) and k/v (cross) projections, UNet and VAE; None: on for CUDA
    compile: bool | None = None  # torch.compile; None: on for CUDA
    compile_scope: str = "regional"  # regional: each transformer block (compiles 8-10x faster) | blocks: + ResNet blocks | full: whole UNet
    compile_mode: str = "default"  # inductor mode: default | max-autotune | max-autotune-no-cudagraphs | reduce-overhead
    compile_backend: str = "inductor"  # eager / aot_eager trace without code generation (CPU tests of guards)
    compile_dynamic: bool = True  # symbolic batch and spatial sizes: one graph per attention mode, not per shape
    compile_vae: bool | None = None  # compile the VAE decoder too; None: with `compile`
    inductor_flags: bool | None = None  # diffusion-fast's inductor flags; None: on with max-autotune modes
    cuda_graphs: bool = False  # CUDA graphs (per bucketed shape) under max-autotune / reduce-overhead
    batch_buckets: bool | None = None  # pad calls to 1, 2, 4, 8, ... images; None: on with `compile`
    cudnn_benchmark: bool | None = None  # cuDNN autotuning of the convolutions; None: on for CUDA
    prompt_cache: int = 512  # text-encoder outputs kept per model (style templates, negative prompts); 0: off
    step_cache_interval: int = 1  # DeepCache-style: run the full UNet every N steps, only its outer blocks between; 1: off
    step_cache_depth: int = 1  # outer down/up block pairs recomputed on cached steps
    preview: str = "none"  # taesd: tiny-autoencoder preview image in progress callbacks
    preview_every: int = 5  # steps between previews
    fp8: bool = False  # float8 dynamic quantization of UNet linear layers (torchao; Hopper/Ada GPUs)
    vae_slicing_threshold: int = 8  # decode the VAE one image at a time above this many images per call
    warmup: bool = True  # run every attention mode and batch bucket at load, so no request compiles

    def __post_init__(self) -> None:
        if self.attention == "auto":  # earlier configs: auto meant "sdpa unless xformers is installed"
            self.attention = "sdpa"
        for name, allowed in (("attention", ATTENTION_KERNELS), ("compile_scope", COMPILE_SCOPES),
                              ("compile_mode", COMPILE_MODES), ("preview", PREVIEW_DECODERS)):
            if getattr(self, name) not in allowed:
                raise ProfileError(f"speed.{name} must be one of {allowed}, got {getattr(self, name)!r}",
                                   param=f"speed.{name}")
        for name in ("prompt_cache", "step_cache_interval", "step_cache_depth", "preview_every",
                     "vae_slicing_threshold"):
            value = getattr(self, name)
            low = 0 if name == "prompt_cache" else 1
            if not isinstance(value, int) or value < low:
                raise ProfileError(f"speed.{name} must be an integer >= {low}", param=f"speed.{name}")


@dataclass
class IPAdapterSource:
    """Where one identity method's weights come from (README "Identity methods").

    `variant` is the method: `faceid` (IP-Adapter FaceID), `faceid-plus-v2` (FaceID Plus v2:
    the ArcFace identity plus CLIP hidden states of the aligned face crop, with the "v2"
    shortcut; needs `image_encoder`) or `instantid` (InstantID on SDXL: IP-Adapter with a
    Resampler projection + the IdentityNet ControlNet on face keypoints; `controlnet` names the
    ControlNet folder). `tiny: true` builds seeded random weights of the real layout (written to
    disk and loaded back through the real loading code for plus-v2 and instantid). Otherwise
    `repo_id` (hub) or `local_path` (a directory) + `weight_name`."""

    variant: str = "faceid"
    tiny: bool = False
    repo_id: str | None = None
    local_path: str | None = None
    subfolder: str | None = None
    weight_name: str | None = None
    image_encoder: str | None = None  # faceid-plus-v2: CLIP vision model (hub id or local folder)
    image_encoder_subfolder: str | None = None
    controlnet: str | None = None  # instantid: IdentityNet folder inside the repo / local_path (ControlNetModel)
    controlnet_scale: float = 0.8  # instantid: ControlNet residual scale at identity strength >= 1
    shortcut_scale: float = 1.0  # faceid-plus-v2: weight of the CLIP branch on top of the identity tokens
    lora_scale: float = 0.6  # FaceID checkpoints carry a LoRA; its weight at identity strength >= 1
    lora_rank: int | None = None  # tiny/random weights only: LoRA rank (None: 4; 128 = the released files)

    def __post_init__(self) -> None:
        self.variant = canonical_method(self.variant)
        if self.variant not in IDENTITY_METHODS:
            raise ProfileError(f"identity method (ip_adapter.variant) must be one of {IDENTITY_METHODS}, got "
                               f"{self.variant!r}", param="variant")


@dataclass
class ModelProfile:
    """One entry of models.yaml."""

    name: str
    architecture: str  # sd15 | sdxl
    description: str = ""
    aliases: list[str] = field(default_factory=list)  # other names clients may send as `model` (e.g. "flux")
    tiny: bool = False  # build a tiny random-weight pipeline of this architecture from config
    random_weights: bool = False  # full-size architecture, random weights, built in memory (GPU speed benchmarks)
    repo_id: str | None = None  # hub id, e.g. "stable-diffusion-v1-5/stable-diffusion-v1-5"
    local_path: str | None = None  # directory in diffusers layout; wins over repo_id
    single_file: str | None = None  # one checkpoint in the original SD layout (.safetensors); wins over both
    single_file_config: str | None = None  # single_file: local diffusers config folder or hub repo id (pulled)
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
    ip_adapter: IPAdapterSource | None = None  # the default identity method's weights (shorthand)
    identity_methods: dict = field(default_factory=dict)  # method name -> IPAdapterSource: what requests may pick
    identity_method: str | None = None  # default method (None: ip_adapter's, else the first listed)
    face_min_size: int = 32  # faces smaller than this (pixels) are refused as references
    safety_checker: str | None = None  # dotted path "module:callable(images)->list[bool]" run on outputs
    styles: dict = field(default_factory=dict)  # name -> StylePack: built-ins + models.yaml's shared + this profile's
    fuse_style: str | None = None  # one LoRA style merged into the weights (one style per replica, no per-image cost)
    speed: SpeedOptions = field(default_factory=SpeedOptions)

    def __post_init__(self) -> None:
        def bad(param: str, msg: str) -> ProfileError:
            return ProfileError(f"models.yaml profile {self.name!r}: {param} {msg}", param=param)

        if self.architecture not in ARCHITECTURES:
            raise bad("architecture", f"must be one of {ARCHITECTURES}")
        if self.scheduler not in SCHEDULERS:
            raise bad("scheduler", f"must be one of {tuple(SCHEDULERS)}")
        if self.dtype not in DTYPES:
            raise bad("dtype", f"must be one of {DTYPES}")
        if not (self.tiny or self.random_weights or self.single_file) and not (self.repo_id or self.local_path):
            raise bad("repo_id", "or local_path is required unless tiny: true")
        if self.single_file and not self.single_file_config:
            raise bad("single_file_config", "is required with single_file (a diffusers config folder or hub repo id)")
        if self.resolution % self.size_multiple:
            raise bad("resolution", f"must be a multiple of size_multiple ({self.size_multiple})")
        if isinstance(self.aliases, str) or not all(isinstance(a, str) and a.strip() for a in self.aliases):
            raise bad("aliases", "must be a list of non-empty names")
        self.aliases = list(self.aliases)
        self._resolve_identity_methods(bad)
        self._resolve_styles(bad)

    def _resolve_styles(self, bad) -> None:
        """Built-in styles first, then the packs given (a profile built in code without styles
        still offers the built-ins). With `fuse_style`, that style is the only LoRA style."""
        own = self.styles if all(isinstance(p, StylePack) for p in (self.styles or {}).values()) \
            else parse_styles(self.styles, f"profile {self.name!r}")
        self.styles = merged_styles(BUILTIN_STYLES, own)
        if self.fuse_style is not None:
            pack = self.styles.get(self.fuse_style)
            if pack is None or pack.lora is None:
                raise bad("fuse_style", f"must name one of the profile's LoRA styles "
                                        f"({', '.join(p.name for p in self.lora_styles) or 'none'})")
            others = [p.name for p in self.lora_styles if p.name != self.fuse_style]
            if others:
                raise bad("fuse_style", f"merges one LoRA into the weights; the profile also lists LoRA styles "
                                        f"{others} (serve them stacked: remove fuse_style)")

    @property
    def lora_styles(self) -> list[StylePack]:
        """Styles that carry a LoRA, in the order they are stacked (adapter index i + 1)."""
        return [p for p in self.styles.values() if p.lora is not None]

    def _resolve_identity_methods(self, bad) -> None:
        """`identity_methods` keyed by canonical method name; an explicit `ip_adapter` wins for its
        method; afterwards `ip_adapter` is always the default method's source (None: no identity)."""
        methods: dict[str, IPAdapterSource] = {}
        for key, src in (self.identity_methods or {}).items():
            if isinstance(src, dict):
                src = IPAdapterSource(**{"variant": key, **src})
            key = canonical_method(key)
            if key not in IDENTITY_METHODS:
                raise bad("identity_methods", f"keys must be among {IDENTITY_METHODS}, got {key!r}")
            if src.variant != key:
                src = dataclasses.replace(src, variant=key)
            methods[key] = src
        if self.ip_adapter is not None:
            methods = {self.ip_adapter.variant: self.ip_adapter,
                       **{k: v for k, v in methods.items() if k != self.ip_adapter.variant}}
        for key in methods:
            if self.architecture not in METHODS[key].architectures:
                raise bad("identity_methods", f"{key} needs an {' or '.join(METHODS[key].architectures)} profile"
                                              + (" (IdentityNet is an SDXL ControlNet)" if key == "instantid" else ""))
        default = canonical_method(self.identity_method)
        if default is None and methods:
            default = self.ip_adapter.variant if self.ip_adapter is not None else next(iter(methods))
        if default is not None and default not in methods:
            raise bad("identity_method", f"{default!r} is not among the profile's identity_methods "
                                         f"({', '.join(methods) or 'none'})")
        self.identity_methods = methods
        self.identity_method = default
        self.ip_adapter = methods.get(default) if default else None

    @property
    def offered_identity_methods(self) -> tuple[str, ...]:
        """Methods a request may name, the default first."""
        if not self.identity_method:
            return ()
        return (self.identity_method, *[m for m in self.identity_methods if m != self.identity_method])

    @property
    def source(self) -> str:
        if self.tiny:
            return "tiny (built from config)"
        if self.random_weights:
            return "full-size random weights (benchmarks)"
        return self.single_file or self.local_path or self.repo_id or ""


def _build(cls, data: dict[str, Any], where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) {sorted(unknown)}; known keys: {sorted(known)}")
    return cls(**data)


def parse_profiles(doc: dict[str, Any], where: str = "models.yaml") -> dict[str, ModelProfile]:
    profiles: dict[str, ModelProfile] = {}
    shared = parse_styles(doc.get("styles"), where)  # top-level `styles:`: offered by every profile
    for name, body in (doc.get("profiles") or {}).items():
        body = dict(body or {})
        if isinstance(body.get("ip_adapter"), dict):
            body["ip_adapter"] = _build(IPAdapterSource, body["ip_adapter"], f"{where} {name}.ip_adapter")
        if isinstance(body.get("identity_methods"), dict):
            body["identity_methods"] = {
                method: _build(IPAdapterSource, {"variant": method, **(src or {})},
                               f"{where} {name}.identity_methods.{method}")
                for method, src in body["identity_methods"].items()}
        if isinstance(body.get("speed"), dict):
            body["speed"] = _build(SpeedOptions, body["speed"], f"{where} {name}.speed")
        body["styles"] = {**shared, **parse_styles(body.get("styles"), f"{where} {name}")}
        profiles[name] = _build(ModelProfile, {"name": name, **body}, f"{where} {name}")
    if not profiles:
        raise ProfileError(f"{where} defines no profiles")
    profile_aliases(profiles, where)  # aliases must be unique: checked when the file is read
    return profiles


def profile_aliases(profiles: dict[str, ModelProfile], where: str = "models.yaml") -> dict[str, str]:
    """{alias: profile name} of all profiles. An alias naming a profile, or claimed by two
    profiles, is a ProfileError: a client's `model` must resolve to exactly one profile."""
    out: dict[str, str] = {}
    for name, profile in profiles.items():
        for alias in profile.aliases:
            if alias in profiles:
                raise ProfileError(f"{where}: alias {alias!r} of profile {name!r} is itself a profile name",
                                   param="aliases")
            if alias in out:
                raise ProfileError(f"{where}: alias {alias!r} is declared by both {out[alias]!r} and {name!r}",
                                   param="aliases")
            out[alias] = name
    return out


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
    compile_cache_dir: where compiled graphs are saved after warm-up and loaded before compiling
    (runtime/compile_cache.py; None: $AVATAR_COMPILE_CACHE_DIR, else not persisted).
    """

    device: str | None = None
    max_batch_size: int | None = None
    profiles_path: str | None = None
    default_model: str | None = None
    face_backend: str = "embedded"
    face_model_root: str | None = None
    face_model_name: str = "buffalo_l"
    face_scorer: str = "auto"
    compile_cache_dir: str | None = field(default_factory=lambda: os.environ.get("AVATAR_COMPILE_CACHE_DIR") or None)
