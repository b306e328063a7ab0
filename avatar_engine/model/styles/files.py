"""Reading style LoRA files into one neutral form: per model part (unet, text_encoder,
text_encoder_2) and module, the low-rank pair and its alpha.

Files come in the layouts users have: kohya (`lora_unet_…`, `lora_te_…`, `lora_te1_/te2_` on
SDXL, `.alpha` tensors; LDM block names included) and diffusers/PEFT (`unet.….lora_A.weight`).
Diffusers' own code does the conversions: the pipeline class's `lora_state_dict` (format
detection, kohya → diffusers, SGM block mapping) and its PEFT key converters, so a layout
diffusers learns to read, this engine reads too. What the engine cannot serve in a fixed graph
is refused here, naming the file: convolution LoRA (LoCon) layers with a kernel larger than 1×1,
DoRA magnitude vectors, and LyCORIS algorithms (LoHa, LoKr).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ...errors import ProfileError

PARTS = ("unet", "text_encoder", "text_encoder_2")
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


@dataclass
class LoRALayer:
    """`up @ down` (rank r) with scale alpha / r; down [r, in] (or [r, in, 1, 1]), up [out, r]."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def gain(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    def delta(self) -> torch.Tensor:
        """The full-rank weight change (for fusing): gain · up @ down, shaped like the weight."""
        down, up = self.down.flatten(1).float(), self.up.flatten(1).float()
        out = (up @ down) * self.gain
        return out.reshape(up.shape[0], *self.down.shape[1:]) if self.down.dim() == 4 else out


@dataclass
class LoRAFile:
    """One style LoRA: `layers[part][module path]`."""

    name: str
    source: str
    layers: dict[str, dict[str, LoRALayer]] = field(default_factory=dict)

    @property
    def parts(self) -> list[str]:
        return [p for p in PARTS if self.layers.get(p)]

    def numel(self) -> int:
        return sum(l.down.numel() + l.up.numel() for part in self.layers.values() for l in part.values())


def _refuse(source: str, why: str) -> ProfileError:
    return ProfileError(f"style LoRA {source}: {why}", param="styles")


def _to_peft(part: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers' converters: old-diffusers / kohya-converted keys → PEFT keys (`….lora_A.weight`)."""
    from diffusers.utils.state_dict_utils import (StateDictType, convert_state_dict_to_diffusers,
                                                  convert_state_dict_to_peft, convert_unet_state_dict_to_peft)

    if all(".lora_A." in k or ".lora_B." in k for k in state):
        return state
    if part == "unet":
        return convert_unet_state_dict_to_peft(state)
    kind = StateDictType.DIFFUSERS_OLD if any("_lora." in k for k in state) else None
    if kind is None and not any("lora_linear_layer" in k for k in state):  # `….lora.down.weight`
        state = {k.replace(".lora.down.", ".lora_linear_layer.down.").replace(".lora.up.", ".lora_linear_layer.up."): v
                 for k, v in state.items()}
    return convert_state_dict_to_peft(convert_state_dict_to_diffusers(state, original_type=kind))


def _alpha_modules(part: str, alphas: dict[str, float]) -> dict[str, float]:
    """Alpha keys name a module in the pre-conversion layout (`….to_q_lora.down.weight.alpha`,
    `….proj_in.alpha`): convert a stand-in down key per alpha through the same converter."""
    out = {}
    for key, value in alphas.items():
        base = key[:-len(".alpha")] if key.endswith(".alpha") else key
        down = base if base.endswith(".down.weight") else f"{base}.lora.down.weight"
        converted = next(iter(_to_peft(part, {down: torch.zeros(1)})))
        m = _PEFT_KEY.match(converted)
        if m:
            out[m.group("module")] = float(value)
    return out


def read_lora(pipeline_class, path: str, name: str) -> LoRAFile:
    """Read a .safetensors LoRA for `pipeline_class` (its `lora_state_dict` knows the layouts of
    the architecture: SD1.5 or SDXL)."""
    if not str(path).endswith(".safetensors"):
        raise _refuse(path, "only .safetensors files load (no pickled .bin/.pt/.ckpt)")
    keys = _file_keys(path)
    lycoris = sorted({k.split(".")[-2] for k in keys if re.search(r"\.(hada_|lokr_)", k)})
    if lycoris:
        raise _refuse(path, f"LyCORIS layers ({', '.join(lycoris[:3])}) are not LoRA; only LoRA (kohya, diffusers/PEFT) "
                            "loads")
    if any("dora_scale" in k or "lora_magnitude_vector" in k for k in keys):
        raise _refuse(path, "DoRA weights (magnitude vectors) are not supported; use a plain LoRA")
    try:
        state, alphas = pipeline_class.lora_state_dict(str(path))
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise _refuse(path, f"diffusers cannot read it as a LoRA for {pipeline_class.__name__} "
                            f"({type(exc).__name__}: {exc})") from exc
    lora = LoRAFile(name=name, source=str(path))
    for part in PARTS:
        own = {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")}
        if not own:
            continue
        own_alphas = {k[len(part) + 1:]: float(v) for k, v in (alphas or {}).items() if k.startswith(part + ".")}
        peft = _to_peft(part, own)
        alpha_by_module = _alpha_modules(part, own_alphas)
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in peft.items():
            m = _PEFT_KEY.match(key)
            if m is None:
                raise _refuse(path, f"unexpected tensor {part}.{key} (not a LoRA A/B weight)")
            pairs.setdefault(m.group("module"), {})[m.group("which")] = tensor
        layers = {}
        for module, pair in pairs.items():
            if set(pair) != {"A", "B"}:
                raise _refuse(path, f"{part}.{module} has no {'up' if 'A' in pair else 'down'} weight")
            down, up = pair["A"], pair["B"]
            if down.dim() == 4 and down.shape[-2:] != (1, 1):
                raise _refuse(path, f"convolution LoRA (LoCon) layers with {tuple(down.shape[-2:])} kernels are not "
                                    f"supported (e.g. {part}.{module}); use a LoRA of the attention, feed-forward "
                                    f"and 1x1 projection layers")
            layers[module.removeprefix("text_model.") if part != "unet" else module] = LoRALayer(
                down=down, up=up, alpha=alpha_by_module.get(module))
        lora.layers[part] = layers
    if not lora.layers:
        raise _refuse(path, "holds no LoRA layers for the UNet or the text encoders")
    return lora


def _file_keys(path: str) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return list(fh.keys())
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise _refuse(path, f"cannot be opened as .safetensors ({type(exc).__name__}: {exc})") from exc
