"""Speed options applied to a loaded pipeline: dtype, attention kernel, channels_last,
fused QKV, torch.compile (regional by default), VAE slicing. Each is a profile setting
(SpeedOptions); `None` means "on where it helps", decided per device here in one place."""
from __future__ import annotations

import importlib.util
import logging

import torch

from .config import ModelProfile, SpeedOptions

log = logging.getLogger(__name__)


def resolve_dtype(profile: ModelProfile, device: torch.device) -> torch.dtype:
    """fp32 on CPU; on CUDA bf16 where supported (no fp16 overflow in the VAE), else fp16."""
    if profile.dtype != "auto":
        return getattr(torch, profile.dtype)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def _on(value: bool | None, device: torch.device) -> bool:
    return (device.type == "cuda") if value is None else bool(value)


def apply_attention(pipe, opts: SpeedOptions, device: torch.device) -> str:
    """Select the attention kernel; returns its name for reports."""
    choice = opts.attention
    if choice == "auto":
        choice = "xformers" if device.type == "cuda" and xformers_available() else "sdpa"
    if choice == "xformers":
        pipe.enable_xformers_memory_efficient_attention()
    elif choice == "sdpa":
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.unet.set_attn_processor(AttnProcessor2_0())
        pipe.vae.set_attn_processor(AttnProcessor2_0())
    return choice


def apply_speed_options(pipe, profile: ModelProfile, device: torch.device) -> dict:
    """Apply every option that is on; returns what was applied (shown in benchmarks)."""
    opts = profile.speed
    applied = {"dtype": str(pipe.unet.dtype).replace("torch.", ""), "attention": apply_attention(pipe, opts, device)}
    if _on(opts.fuse_qkv, device) and opts.attention != "xformers":
        pipe.fuse_qkv_projections()
        applied["fuse_qkv"] = True
    if _on(opts.channels_last, device):
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        applied["channels_last"] = True
    if _on(opts.compile, device):
        if opts.compile_mode == "regional" and hasattr(pipe.unet, "compile_repeated_blocks"):
            pipe.unet.compile_repeated_blocks(fullgraph=True)
        else:
            pipe.unet = torch.compile(pipe.unet, fullgraph=False)
        applied["compile"] = opts.compile_mode
    return applied


def set_vae_slicing(pipe, images_in_call: int, opts: SpeedOptions) -> None:
    """Slice VAE decode for large calls: same pixels, lower peak memory."""
    if images_in_call > opts.vae_slicing_threshold:
        pipe.vae.enable_slicing()
    else:
        pipe.vae.disable_slicing()


def unfuse_for_adapters(pipe) -> None:
    """IP-Adapter installs its own attention processors, which fused QKV would replace."""
    try:
        pipe.unfuse_qkv_projections()
    except Exception:  # not fused
        pass
