"""Style packs: what a request's `stylePreset` names.

A style is a prompt template + negative prompt, optionally a LoRA (a file the operator put on
disk or a hub repo/weight name, with its default scale) and recommended steps/guidance. The six
built-in styles are template-only packs every profile offers; models.yaml adds packs for all
profiles (top-level `styles:`) or for one profile (`profiles.<name>.styles:`), and may override
a built-in by name. Only operator-configured LoRAs load: a request names a pack, never a file.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ProfileError

STYLE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
STYLE_STRENGTH_RANGE = (0.0, 2.0)
LORA_FORMATS = ("kohya", "peft")


@dataclass(frozen=True)
class LoRASource:
    """Where one style's LoRA comes from: `path` (a .safetensors file), `repo_id` + `weight_name`
    (hub; `avatar-engine models pull` fetches it), or `tiny: true` (seeded random weights of the
    real layout, written to the cache in `format` (kohya or peft) and read back through the real
    loading code: tests and the embedded default)."""

    path: str | None = None
    repo_id: str | None = None
    weight_name: str | None = None
    subfolder: str | None = None
    revision: str | None = None
    tiny: bool = False
    format: str = "kohya"  # tiny only: the file layout written
    rank: int = 4  # tiny only
    seed: int = 0  # tiny only
    text_encoder: bool = True  # tiny only: also write text-encoder LoRA layers

    def __post_init__(self) -> None:
        if not (self.tiny or self.path or self.repo_id):
            raise ProfileError("a style's lora needs path, repo_id (+ weight_name) or tiny: true", param="lora")
        if self.format not in LORA_FORMATS:
            raise ProfileError(f"lora.format must be one of {LORA_FORMATS}", param="lora.format")
        if self.tiny and (not isinstance(self.rank, int) or self.rank < 1):
            raise ProfileError("lora.rank must be a positive integer", param="lora.rank")

    @property
    def label(self) -> str:
        if self.tiny:
            return f"tiny {self.format} rank {self.rank} (seed {self.seed})"
        if self.path:
            return self.path
        return f"{self.repo_id}/{self.weight_name}" if self.weight_name else str(self.repo_id)


@dataclass(frozen=True)
class StylePack:
    """One style. `template` holds `{prompt}`; `scale` is the LoRA's weight at styleStrength 1."""

    name: str
    template: str = "{prompt}"
    negative: str = ""
    description: str = ""
    lora: LoRASource | None = None
    scale: float = 1.0
    steps: int | None = None  # recommended; a request's own `steps` wins
    guidance_scale: float | None = None  # recommended; a request's own `guidanceScale` wins

    def __post_init__(self) -> None:
        if not STYLE_NAME.match(self.name):
            raise ProfileError(f"style name {self.name!r} must be 1-64 lowercase letters, digits, '-', '_' or '.'",
                               param="styles")
        if "{prompt}" not in self.template:
            raise ProfileError(f"style {self.name!r}: template must contain {{prompt}}", param="styles")
        if not isinstance(self.scale, (int, float)) or not 0 <= self.scale <= 4:
            raise ProfileError(f"style {self.name!r}: scale must be a number in [0, 4]", param="styles")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ProfileError(f"style {self.name!r}: steps must be a positive integer", param="styles")

    def describe(self) -> dict[str, Any]:
        """The public description (GET /v1/models, the CLI): never a file path."""
        out: dict[str, Any] = {"name": self.name, "description": self.description, "lora": None}
        if self.lora is not None:
            out["lora"] = {"name": self.lora_name, "scale": self.scale}
        if self.steps is not None:
            out["steps"] = self.steps
        if self.guidance_scale is not None:
            out["guidanceScale"] = self.guidance_scale
        return out

    @property
    def lora_name(self) -> str | None:
        """The LoRA as reports name it: the file's or hub weight's stem, `<style>-tiny` for tiny ones."""
        if self.lora is None:
            return None
        if self.lora.tiny:
            return f"{self.name}-tiny"
        source = self.lora.path or self.lora.weight_name or self.lora.repo_id or self.name
        return re.sub(r"\.(safetensors|bin|pt|ckpt)$", "", source.rsplit("/", 1)[-1])


#: The built-in template-only styles (every profile offers them unless models.yaml overrides one).
BUILTIN_STYLES: dict[str, StylePack] = {pack.name: pack for pack in (
    StylePack("professional", "professional headshot of {prompt}, studio lighting, sharp focus, neutral background",
              "cartoon, illustration, blurry, lowres, deformed", "Studio headshot"),
    StylePack("anime", "anime style portrait of {prompt}, cel shading, vibrant colors, detailed eyes",
              "photo, realistic, 3d render, lowres, deformed", "Anime portrait"),
    StylePack("fantasy", "fantasy art portrait of {prompt}, epic, magical atmosphere, intricate details",
              "modern, photo, lowres, blurry, deformed", "Fantasy art"),
    StylePack("cyberpunk", "cyberpunk portrait of {prompt}, neon lights, futuristic city, high contrast",
              "daylight, rustic, lowres, blurry, deformed", "Neon cyberpunk"),
    StylePack("renaissance", "renaissance oil painting portrait of {prompt}, chiaroscuro, classical composition",
              "photo, modern, anime, lowres, deformed", "Renaissance oil painting"),
    StylePack("realistic", "photorealistic portrait of {prompt}, natural light, 85mm, detailed skin",
              "cartoon, painting, illustration, lowres, deformed", "Photorealistic"),
)}


def parse_styles(doc: Mapping[str, Any] | None, where: str) -> dict[str, StylePack]:
    """`{name: {template, negative, description, lora: {...}, scale, steps, guidance_scale}}` → packs.
    Unknown keys are refused, as everywhere in models.yaml."""
    out: dict[str, StylePack] = {}
    known = {f.name for f in dataclasses.fields(StylePack)} - {"name"}
    lora_known = {f.name for f in dataclasses.fields(LoRASource)}
    for name, body in (doc or {}).items():
        if isinstance(body, StylePack):
            out[name] = body
            continue
        body = dict(body or {})
        unknown = set(body) - known
        if unknown:
            raise ProfileError(f"{where} style {name!r}: unknown key(s) {sorted(unknown)}; known keys: {sorted(known)}",
                               param="styles")
        lora = body.pop("lora", None)
        if isinstance(lora, str):
            lora = {"path": lora}
        if isinstance(lora, dict):
            bad = set(lora) - lora_known
            if bad:
                raise ProfileError(f"{where} style {name!r}: unknown lora key(s) {sorted(bad)}; known keys: "
                                   f"{sorted(lora_known)}", param="styles")
            lora = LoRASource(**lora)
        try:
            out[name] = StylePack(name=str(name), lora=lora, **body)
        except ProfileError as exc:
            raise ProfileError(f"{where}: {exc.message}", param="styles") from exc
    return out


def merged_styles(*layers: Mapping[str, StylePack]) -> dict[str, StylePack]:
    """Later layers override earlier ones by name: built-ins, models.yaml's shared, a profile's own."""
    packs: dict[str, StylePack] = {}
    for layer in layers:
        packs.update(layer)
    return packs
