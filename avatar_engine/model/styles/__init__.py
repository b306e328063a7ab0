"""Style LoRAs of a profile's style packs: read at load, then stacked (each image picks its own
adapter in the same UNet call) or, with the profile's `fuse_style`, merged into the weights.

`files.py` reads the layouts users have through diffusers' conversion code, `stacked.py` holds
the fixed-graph multi-LoRA layers, `tiny.py` writes tiny LoRAs of the real layouts.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ...config import ModelProfile, cache_dir
from ...errors import ProfileError
from ...styles import LoRASource, StylePack
from .files import LoRAFile, read_lora
from .stacked import StackReport, StyleSelection, fuse, install_stacked, select
from .tiny import tiny_layers, write_kohya, write_peft

__all__ = ["LoRAFile", "StyleSelection", "StyleState", "fuse_style_lora", "lora_file_path", "read_lora",
           "read_style_loras", "select", "stack_style_loras", "style_row", "tiny_layers", "write_kohya", "write_peft"]


@dataclass
class StyleState:
    """A loaded model's styles: adapter index per stacked LoRA style (1-based; 0 = none), the
    fused style (if any), what stacking costs in memory, and each LoRA's file facts (the
    weights themselves live only in the model's layers)."""

    index: dict[str, int] = field(default_factory=dict)
    files: dict[str, dict] = field(default_factory=dict)  # style -> {source (file name), parts, parameters}
    text_adapters: frozenset = frozenset()  # adapter indices with text-encoder layers
    fused: str | None = None
    report: StackReport | None = None

    def to_json(self) -> dict:
        out: dict = {"styles": list(self.index), "fused": self.fused}
        out.update(self.report.to_json() if self.report is not None  # stacked, else fused: no extra memory
                   else {"mode": "fused", "adapters": [self.fused], "bytes": 0, "bytesPerLoRA": 0})
        out["loras"] = {name: dict(facts) for name, facts in self.files.items()}
        return out


def _file_facts(loras: dict[str, LoRAFile]) -> dict[str, dict]:
    """What reports show of each LoRA file: its name (never the directory), parts, parameters."""
    return {name: {"source": Path(lora.source).name, "parts": lora.parts, "parameters": lora.numel()}
            for name, lora in loras.items()}


def _tiny_path(profile: ModelProfile, pack: StylePack) -> Path:
    src = pack.lora
    tag = f"{pack.name}-{src.format}-r{src.rank}-s{src.seed}{'' if src.text_encoder else '-unet'}"
    return cache_dir() / "styles" / profile.name / f"{tag}.safetensors"


def lora_file_path(profile: ModelProfile, pack: StylePack, pipe=None) -> Path:
    """The local file of a style's LoRA. Tiny LoRAs are written on first use (needs `pipe`); hub
    LoRAs come from the local hub cache only (`avatar-engine models pull` fetches them)."""
    src: LoRASource = pack.lora  # type: ignore[assignment]
    if src.tiny:
        path = _tiny_path(profile, pack)
        if not path.exists():
            layers = tiny_layers(pipe, rank=src.rank, seed=src.seed, text_encoder=src.text_encoder)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".safetensors")
            os.close(fd)
            if src.format == "kohya":
                write_kohya(layers, tmp, sdxl=profile.architecture == "sdxl")
            else:
                write_peft(layers, tmp)
            os.replace(tmp, path)  # atomic: two workers starting together never read half a file
        return path
    if src.path:
        path = Path(os.path.expanduser(src.path))
        if not path.is_file():
            raise ProfileError(f"profile {profile.name!r} style {pack.name!r}: LoRA file {src.path} not found",
                               param="styles")
        return path
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(src.repo_id, src.weight_name or "pytorch_lora_weights.safetensors",
                                    subfolder=src.subfolder, revision=src.revision, local_files_only=True))
    except Exception as exc:  # hub errors: not cached, gated, bad name
        raise ProfileError(f"profile {profile.name!r} style {pack.name!r}: LoRA {src.label} is not in the local hub "
                           f"cache (run `avatar-engine models pull {profile.name}`): {type(exc).__name__}",
                           param="styles") from exc


def read_style_loras(profile: ModelProfile, pipe) -> dict[str, LoRAFile]:
    """Every LoRA style of the profile, read from its file (before any module is changed)."""
    return {pack.name: read_lora(type(pipe), str(lora_file_path(profile, pack, pipe)), pack.lora_name or pack.name)
            for pack in profile.lora_styles}


def fuse_style_lora(pipe, profile: ModelProfile, loras: dict[str, LoRAFile]) -> StyleState | None:
    """Merge the profile's `fuse_style` LoRA into the weights (before the speed options change
    modules); None when the profile stacks its LoRAs instead."""
    if not profile.fuse_style:
        return None
    pack = profile.styles[profile.fuse_style]
    fuse(pipe, loras[pack.name], pack.scale)
    return StyleState(files=_file_facts(loras), fused=pack.name)


def stack_style_loras(pipe, loras: dict[str, LoRAFile], device, dtype) -> StyleState:
    """Stack every LoRA (adapter i + 1 = the i-th style), after processors, fused projections and
    identity weights are in place and before compiling."""
    names = list(loras)
    report = install_stacked(pipe, [loras[n] for n in names], device, dtype)
    text = frozenset(i + 1 for i, n in enumerate(names) if set(loras[n].parts) - {"unet"})
    return StyleState(index={n: i + 1 for i, n in enumerate(names)}, files=_file_facts(loras), text_adapters=text,
                      report=report)


def style_row(state: StyleState | None, profile: ModelProfile, style: str | None,
              strength: float | None) -> tuple[int, float]:
    """(adapter index, scale) of one image: 0 when the style has no stacked LoRA."""
    if state is None or not style or style not in state.index:
        return 0, 0.0
    pack = profile.styles[style]
    return state.index[style], float(pack.scale) * (1.0 if strength is None else float(strength))
