"""The plain text-to-image request (and img2img, for remix) and the result of any request.

Requests are plain dataclasses with Python (snake_case) fields; validation errors carry the
API's camelCase field name in `param` so the HTTP layer can return it unchanged. Wire (JSON)
conversions live in protocol.py.
`resolve(profile)` returns a copy with every default filled in (seed, size, steps, guidance),
which is what the engine batches on and what results report back.
"""
from __future__ import annotations

import dataclasses
import math
import secrets
from dataclasses import dataclass, field
from typing import Any

from ..errors import RequestValidationError
from ..styles import BUILTIN_STYLES, STYLE_NAME, STYLE_STRENGTH_RANGE
from .common import (ASPECT_RATIOS, GUIDANCE_RANGE, MAX_BATCH_SIZE, PROMPT_MAX_CHARS, SEED_MAX, STEPS_RANGE,
                     STYLE_PRESETS, check as _check, is_int as _is_int, is_number as _is_number, size_for_aspect_ratio)


def style_pack(profile, name: str | None):
    """The profile's style pack called `name` (None: no style), or a 400 naming stylePreset."""
    if name is None:
        return None
    styles = getattr(profile, "styles", None)
    if styles is None:  # a stand-in profile (benchmarks, plug-ins) offers the built-ins, as ModelProfile does
        styles = BUILTIN_STYLES
    if name not in styles:
        raise RequestValidationError(f"unknown stylePreset {name!r} for model {profile.name!r}; accepted: "
                                     f"{', '.join(styles) or 'none'}", param="stylePreset")
    return styles[name]


@dataclass
class GenerationRequest:
    """Prompt → 1..4 images. `init_image` + `strength` turn it into img2img (used by remix)."""

    prompt: str
    negative_prompt: str | None = None
    style_preset: str | None = None
    aspect_ratio: str = "1:1"
    guidance_scale: float | None = None
    seed: int | None = None
    batch_size: int = 1
    steps: int | None = None
    model: str | None = None
    init_image: Any = None  # PIL.Image for img2img (remix)
    strength: float = 0.75
    style_strength: float | None = None  # 0..2, scales the style's LoRA (resolve: 1.0 for a LoRA style)
    # Filled by resolve():
    width: int | None = None
    height: int | None = None

    kind = "generate"

    def validate(self) -> None:
        """Raise RequestValidationError naming the first invalid field."""
        _check(isinstance(self.prompt, str) and self.prompt.strip() != "", "prompt", "prompt must be a non-empty string")
        _check(len(self.prompt) <= PROMPT_MAX_CHARS, "prompt", f"prompt must be at most {PROMPT_MAX_CHARS} characters")
        if self.negative_prompt is not None:
            _check(isinstance(self.negative_prompt, str), "negativePrompt", "negativePrompt must be a string")
            _check(len(self.negative_prompt) <= PROMPT_MAX_CHARS, "negativePrompt",
                   f"negativePrompt must be at most {PROMPT_MAX_CHARS} characters")
        if self.style_preset is not None:  # which styles exist is the profile's (resolve)
            _check(isinstance(self.style_preset, str) and STYLE_NAME.match(self.style_preset) is not None,
                   "stylePreset", f"stylePreset must be a style name (built-in: {', '.join(STYLE_PRESETS)})")
        if self.style_strength is not None:
            lo, hi = STYLE_STRENGTH_RANGE
            _check(_is_number(self.style_strength) and lo <= self.style_strength <= hi, "styleStrength",
                   f"styleStrength must be a number between {lo:g} and {hi:g}")
        _check(self.aspect_ratio in ASPECT_RATIOS, "aspectRatio", f"aspectRatio must be one of {', '.join(ASPECT_RATIOS)}")
        if self.guidance_scale is not None:
            lo, hi = GUIDANCE_RANGE
            _check(_is_number(self.guidance_scale) and lo <= self.guidance_scale <= hi, "guidanceScale",
                   f"guidanceScale must be a number between {lo:g} and {hi:g}")
        if self.seed is not None:
            _check(_is_int(self.seed) and 0 <= self.seed <= SEED_MAX, "seed", f"seed must be an integer between 0 and {SEED_MAX}")
        _check(_is_int(self.batch_size) and 1 <= self.batch_size <= MAX_BATCH_SIZE, "batchSize",
               f"batchSize must be an integer between 1 and {MAX_BATCH_SIZE}")
        if self.steps is not None:
            lo, hi = STEPS_RANGE
            _check(_is_int(self.steps) and lo <= self.steps <= hi, "steps", f"steps must be an integer between {lo} and {hi}")
        if self.model is not None:
            _check(isinstance(self.model, str) and self.model != "", "model", "model must be a profile name")
        _check(_is_number(self.strength) and 0.0 < self.strength <= 1.0, "strength", "strength must be in (0, 1]")

    def resolve(self, profile) -> "GenerationRequest":
        """Validated copy with the profile's defaults (or its style's recommended steps and
        guidance) and a concrete seed. A style the profile does not offer is refused, listing
        the ones it does."""
        self.validate()
        pack = style_pack(profile, self.style_preset)
        width, height = size_for_aspect_ratio(profile.resolution, self.aspect_ratio, profile.size_multiple)
        guidance = pack.guidance_scale if pack is not None and pack.guidance_scale is not None \
            else profile.guidance_scale
        steps = pack.steps if pack is not None and pack.steps is not None else profile.steps
        strength = self.style_strength
        fused = getattr(profile, "fuse_style", None)
        if fused and strength not in (None, 1.0):
            raise RequestValidationError(f"model {profile.name!r} serves style {fused!r} merged into its weights; "
                                         f"styleStrength cannot vary there (omit it or send 1)", param="styleStrength")
        if strength is None and pack is not None and pack.lora is not None:
            strength = 1.0
        final_steps = steps if self.steps is None else self.steps
        if self.init_image is not None and int(final_steps * self.strength) < 1:  # img2img runs steps × strength
            raise RequestValidationError(f"steps × strength must give at least one denoising step (steps "
                                         f"{final_steps} × strength {self.strength:g} gives none); use steps >= "
                                         f"{math.ceil(1 / self.strength)}", param="steps")
        return dataclasses.replace(
            self,
            model=profile.name,
            guidance_scale=guidance if self.guidance_scale is None else float(self.guidance_scale),
            steps=steps if self.steps is None else self.steps,
            style_strength=None if strength is None else float(strength),
            seed=secrets.randbelow(SEED_MAX + 1) if self.seed is None else self.seed,
            width=width,
            height=height,
        )

    def image_seeds(self) -> list[int]:
        """One seed per image: image i of a request uses seed + i (wrapping), so each image is
        reproducible on its own and independent of how requests were batched."""
        assert self.seed is not None, "resolve() first"
        return [(self.seed + i) % (SEED_MAX + 1) for i in range(self.batch_size)]


@dataclass
class GenerationResult:
    """What the engine returns for one request, in request order."""

    request: GenerationRequest
    images: list  # list[PIL.Image.Image]
    seeds: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    prompt_report: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # batchImages, nsfw
    report: Any = None  # the task's typed report (tasks/reports.py: IdentityReport, CastReport), with to_json()

    @property
    def seed(self) -> int:
        return self.request.seed  # type: ignore[return-value]

    @property
    def model(self) -> str:
        return self.request.model  # type: ignore[return-value]
