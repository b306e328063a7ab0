"""Tiny style LoRAs of the real layouts, for tests and the embedded default.

`tiny_layers` draws seeded low-rank pairs for every layer real style LoRAs train (attention
q/k/v/out, feed-forward, the transformer's proj_in/proj_out, and the text encoders' attention
and MLP); `write_kohya` / `write_peft` store the same weights in the two file layouts users
have, so a test can check that both give the same pixels.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .files import LoRALayer

UNET_TARGETS = re.compile(r"(attentions\.\d+\.(proj_in|proj_out)|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|"
                          r"to_out\.0)|ff\.net\.(0\.proj|2)))$")
TEXT_TARGETS = re.compile(r"layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$")


def _shape(module: torch.nn.Module) -> tuple[int, int, bool]:
    if isinstance(module, torch.nn.Conv2d):
        return module.in_channels, module.out_channels, True
    return module.in_features, module.out_features, False


def tiny_layers(pipe, rank: int = 4, seed: int = 0, text_encoder: bool = True,
                strength: float = 1.0) -> dict[str, dict[str, LoRALayer]]:
    """Seeded LoRA pairs for the pipeline's trainable layers, alpha = rank / 2 (kohya's usual)."""
    g = torch.Generator().manual_seed(seed)
    parts = {"unet": (pipe.unet, UNET_TARGETS)}
    if text_encoder:
        for part in ("text_encoder", "text_encoder_2"):
            if getattr(pipe, part, None) is not None:
                parts[part] = (getattr(pipe, part), TEXT_TARGETS)
    out: dict[str, dict[str, LoRALayer]] = {}
    for part, (model, pattern) in parts.items():
        layers = {}
        for name, module in model.named_modules():
            if not pattern.search(name) or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            fan_in, fan_out, conv = _shape(module)
            down = torch.randn(rank, fan_in, generator=g) / fan_in ** 0.5
            up = torch.randn(fan_out, rank, generator=g) * (strength / rank ** 0.5)
            if conv:
                down, up = down[:, :, None, None], up[:, :, None, None]
            layers[name] = LoRALayer(down=down.contiguous(), up=up.contiguous(), alpha=rank / 2)
        out[part] = layers
    return out


def _kohya_prefix(part: str, sdxl: bool) -> str:
    if part == "unet":
        return "lora_unet_"
    if not sdxl:
        return "lora_te_text_model_"
    return "lora_te1_text_model_" if part == "text_encoder" else "lora_te2_text_model_"


def write_kohya(layers: dict[str, dict[str, LoRALayer]], path: str | Path, sdxl: bool = False) -> Path:
    """kohya-ss layout: `lora_unet_down_blocks_1_…_to_q.lora_down.weight`, `.lora_up.weight`, `.alpha`."""
    from safetensors.torch import save_file

    state = {}
    for part, mods in layers.items():
        for name, layer in mods.items():
            key = _kohya_prefix(part, sdxl) + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = layer.down
            state[f"{key}.lora_up.weight"] = layer.up
            state[f"{key}.alpha"] = torch.tensor(float(layer.alpha if layer.alpha is not None else layer.rank))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def write_peft(layers: dict[str, dict[str, LoRALayer]], path: str | Path) -> Path:
    """diffusers/PEFT layout (`unet.….to_q.lora_A.weight`, text encoders under `text_model.`), no
    alpha tensors: the alpha / rank scale is folded into B, as diffusers' own savers do when
    they write without metadata."""
    from safetensors.torch import save_file

    state = {}
    for part, mods in layers.items():
        for name, layer in mods.items():
            module = name if part == "unet" else f"text_model.{name}"
            state[f"{part}.{module}.lora_A.weight"] = layer.down
            state[f"{part}.{module}.lora_B.weight"] = layer.up * layer.gain
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
