"""Many style LoRAs served at once in a fixed graph: each image of a batch picks its own.

Why: fusing a LoRA into the weights serves one style per replica, and swapping adapters between
calls (diffusers' `set_adapters`) gives one style per batch and a compiled graph that must be
re-recorded. Here the resident LoRAs are stacked at load into per-layer tensors (adapter 0 is
all zeros: "no LoRA"; ranks padded to the layer's largest) and every call selects, per row of
the batch, an adapter index and a scale, both tensors (never guards). Each styled layer adds

    y += scale[row] · B[index[row]] @ (A[index[row]] @ x[row])

as two batched matmuls, the multi-LoRA scheme of S-LoRA / Punica applied to the UNet's and text
encoders' linears. The attention projections get their LoRA inside the lifetime attention
processor (so fused QKV and FP8 slices keep it); other linears and 1×1 convolutions become
`StyledLinear` / `StyledConv2d` in place (same parameters, same names). A call where no row has
a style leaves the selection None and runs the plain path: same graph as a model without styles.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import ProfileError
from ..attention import conditioning, processors
from .files import LoRAFile, LoRALayer

_ATTN_PROJ = re.compile(r"^(?P<attn>.+\.attn[12])\.(?P<proj>to_q|to_k|to_v|to_out\.0)$")
_PROC_KEY = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out"}


@dataclass
class StyleSelection:
    """Per call, per model part: adapter index [rows] (long) and scale [rows] (model dtype);
    None outside styled calls. The UNet's lives in its CallConditioning (reset after each call)."""

    style_index: torch.Tensor | None = None
    style_scale: torch.Tensor | None = None

    def reset(self) -> None:
        self.style_index = self.style_scale = None


class StackedLoRA(nn.Module):
    """The stacked LoRA pairs of one layer: down [N+1, r, in], up [N+1, out, r] (alpha/r folded in)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor):
        super().__init__()
        self.down = nn.Parameter(down, requires_grad=False)
        self.up = nn.Parameter(up, requires_grad=False)

    def forward(self, x: torch.Tensor, index: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x [rows, ..., in] → the LoRA output [rows, ..., out], row i with adapter index[i]."""
        rows = index.shape[0]
        flat = x.reshape(rows, -1, x.shape[-1])
        hidden = torch.bmm(flat, self.down[index].transpose(1, 2)) * scale.to(x.dtype)[:, None, None]
        out = torch.bmm(hidden, self.up[index].transpose(1, 2))
        return out.reshape(*x.shape[:-1], out.shape[-1])


class StyledLinear(nn.Linear):
    """An nn.Linear (same weight, bias, name) that adds the selected rows' style LoRA."""

    style_lora: StackedLoRA
    style_selection: StyleSelection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        sel = self.style_selection
        if sel.style_index is None:
            return y
        return y + self.style_lora(x, sel.style_index, sel.style_scale)


class StyledConv2d(nn.Conv2d):
    """A 1×1 nn.Conv2d (SD1.5's transformer proj_in/proj_out) with the selected rows' style LoRA."""

    style_lora: StackedLoRA
    style_selection: StyleSelection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_forward(x, self.weight, self.bias)
        sel = self.style_selection
        if sel.style_index is None:
            return y
        delta = self.style_lora(x.permute(0, 2, 3, 1), sel.style_index, sel.style_scale)  # [B, H, W, out]
        return y + delta.permute(0, 3, 1, 2)


def _stack(layers: Sequence[LoRALayer | None], fan_in: int, fan_out: int, device, dtype,
           where: tuple[str, str, Sequence[LoRAFile]]) -> StackedLoRA:
    """Adapter 0 = zeros, then one slot per resident LoRA (zeros where it has no such layer)."""
    rank = max(l.rank for l in layers if l is not None)
    down = torch.zeros(len(layers) + 1, rank, fan_in)
    up = torch.zeros(len(layers) + 1, fan_out, rank)
    for i, layer in enumerate(layers, start=1):
        if layer is None:
            continue
        d, u = layer.down.flatten(1).float(), layer.up.flatten(1).float()
        if d.shape[1] != fan_in or u.shape[0] != fan_out:
            part, name, loras = where
            raise _mismatch(loras[i - 1].source, f"{part}.{name} is {fan_in}→{fan_out} in this model but "
                                                 f"{d.shape[1]}→{u.shape[0]} in the LoRA (a LoRA for another "
                                                 f"architecture?)")
        down[i, :layer.rank] = d
        up[i, :, :layer.rank] = u * layer.gain
    return StackedLoRA(down.to(device, dtype), up.to(device, dtype))


@dataclass
class StackReport:
    """What stacking put in memory: per resident LoRA (all slots are padded alike)."""

    adapters: list[str] = field(default_factory=list)
    layers: dict[str, int] = field(default_factory=dict)  # per model part
    bytes_total: int = 0

    def to_json(self) -> dict:
        n = len(self.adapters)
        return {"mode": "stacked", "adapters": list(self.adapters), "layers": dict(self.layers),
                "bytes": self.bytes_total, "bytesPerLoRA": self.bytes_total // (n + 1) if n else 0}


def _fan(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a linear, a 1x1 conv, or an FP8 FusedSlice (runtime/optimize.py: the
    rows of a quantized fused q/k/v layer, with no weight of its own)."""
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels
    fused = getattr(module, "_fused", None)
    if fused is not None:
        return int(fused[0].in_features), int(module.out_features)
    return int(module.in_features), int(module.out_features)


def install_stacked(pipe, loras: Sequence[LoRAFile], device, dtype) -> StackReport:
    """Stack `loras` (adapter i + 1 = loras[i]) into every layer any of them trains. Runs once at
    load, after the processors and fused projections are in place and before compiling."""
    report = StackReport(adapters=[l.name for l in loras])
    for part in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, part, None)
        names = sorted({m for l in loras for m in l.layers.get(part, {})})
        if model is None or not names:
            continue
        if part == "unet":
            selection = conditioning(model)
            procs = processors(model)
        else:
            selection = StyleSelection()
            model.avatar_styles = selection
        for name in names:
            per_adapter = [l.layers.get(part, {}).get(name) for l in loras]
            m = _ATTN_PROJ.match(name) if part == "unet" else None
            if m is not None:
                attn = model.get_submodule(m.group("attn"))
                fan_in, fan_out = _fan(getattr(attn, m.group("proj").split(".")[0]) if m.group("proj") != "to_out.0"
                                       else attn.to_out[0])
                stacked = _stack(per_adapter, fan_in, fan_out, device, dtype, (part, name, loras))
                procs[f"{m.group('attn')}.processor"].styles[_PROC_KEY[m.group("proj")]] = stacked
            else:
                module = _target(model, name, part, loras)
                stacked = _stack(per_adapter, *_fan(module), device, dtype, (part, name, loras))
                module.__class__ = StyledConv2d if isinstance(module, nn.Conv2d) else StyledLinear
                module.style_lora = stacked
                module.style_selection = selection
            report.bytes_total += sum(p.numel() * p.element_size() for p in stacked.parameters())
            report.layers[part] = report.layers.get(part, 0) + 1
    return report


def _target(model: nn.Module, name: str, part: str, loras: Sequence[LoRAFile]) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    files = ", ".join(l.source for l in loras if name in l.layers.get(part, {}))
    if module is None:
        raise _mismatch(files, f"{part}.{name} is not a layer of this model (a LoRA for another architecture?)")
    if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1:
        return module
    if type(module) in (nn.Linear, StyledLinear):
        return module
    raise _mismatch(files, f"{part}.{name} is a {type(module).__name__}; style LoRAs apply to linear and 1x1 "
                           f"convolution layers")


def _mismatch(files: str, why: str) -> ProfileError:
    return ProfileError(f"style LoRA {files}: {why}", param="styles")


def select(selection, rows: Sequence[tuple[int, float]], repeat: int, device, dtype) -> bool:
    """Set a part's per-row selection for one call: `rows` (adapter index, scale) per image,
    repeated `repeat` times (2 under classifier-free guidance: the unconditional half is styled
    too, as a merged LoRA would be). A call with no styled row stays on the plain path.
    Returns whether the call is styled."""
    if not rows or all(i == 0 or s == 0 for i, s in rows):
        selection.style_index = selection.style_scale = None
        return False
    index = torch.tensor([i for i, _ in rows] * repeat, dtype=torch.long, device=device)
    scale = torch.tensor([s if i else 0.0 for i, s in rows] * repeat, dtype=dtype, device=device)
    selection.style_index, selection.style_scale = index, scale
    return True


def fuse(pipe, lora: LoRAFile, scale: float) -> int:
    """Merge one LoRA into the weights at `scale` (profile `fuse_style`): no per-image cost, one
    style for every image of the profile. Runs before fused projections and FP8. Returns layers."""
    fused = 0
    for part, layers in lora.layers.items():
        model = getattr(pipe, part, None)
        if model is None:
            continue
        for name, layer in layers.items():
            module = _target(model, name, part, [lora])  # before fused projections: q/k/v/out are plain Linears
            delta = layer.delta() * scale
            if delta.numel() != module.weight.numel():
                raise _mismatch(lora.source, f"{part}.{name} has {tuple(module.weight.shape)} weights in this model "
                                             f"but the LoRA changes {tuple(delta.shape)} (another architecture?)")
            with torch.no_grad():
                module.weight += delta.reshape(module.weight.shape).to(module.weight)
            fused += 1
    return fused
