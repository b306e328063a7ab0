"""Speed options applied to a loaded pipeline's modules before compiling (SpeedOptions).

Each option is a profile setting; `None` means "on where it helps", decided per device here.
Compiling is compile.py; what really runs is read back by report.py.
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Callable

import torch

from ..config import ModelProfile, SpeedOptions
from ..errors import ProfileError
from ..model.attention import fuse_projections, install_processors
from ..model.stepcache import install_step_cache

log = logging.getLogger(__name__)

def resolve_dtype(profile: ModelProfile, device: torch.device) -> torch.dtype:
    """fp32 on CPU; on CUDA bf16 where supported (no fp16 overflow in the VAE), else fp16."""
    if profile.dtype != "auto":
        return getattr(torch, profile.dtype)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def on(value: bool | None, device: torch.device) -> bool:
    """A `None` option is on for CUDA only."""
    return (device.type == "cuda") if value is None else bool(value)


def channels_last_on(opts: SpeedOptions, device: torch.device) -> bool:
    """`None`: channels_last only where the whole UNet is compiled. Measured on an H200 (SD1.5
    512², batch 8, README "GPU suite"): with the ResNet blocks running eagerly, as under regional
    compile, each GroupNorm copies channels_last activations back to contiguous (23% of CUDA
    time in copies) and batch 8 ran 8% slower than contiguous (5.34 vs 5.81 images/s)."""
    if opts.channels_last is None:
        return device.type == "cuda" and on(opts.compile, device) and opts.compile_scope == "full"
    return bool(opts.channels_last)


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def _modules(pipe):
    return [m for m in (getattr(pipe, n, None) for n in ("unet", "vae", "text_encoder", "text_encoder_2",
                                                           "image_encoder")) if isinstance(m, torch.nn.Module)]


def prepare_pipeline(pipe, profile: ModelProfile, device: torch.device) -> None:
    """Everything that changes modules, before the identity adapter is attached and before
    compiling: inference-only parameters, lifetime attention processors, fused projections,
    memory format, cuDNN autotuning, FP8."""
    opts = profile.speed
    for module in _modules(pipe):
        module.eval().requires_grad_(False)  # a grad-requiring parameter is a guard that later flips (peft)
    if opts.attention == "xformers" and not xformers_available():
        raise ProfileError(f"profile {profile.name!r}: speed.attention is xformers but xformers is not installed "
                           f"(pip install xformers, CUDA only); use sdpa", param="speed.attention")
    install_processors(pipe.unet, opts.attention)
    install_processors(pipe.vae, opts.attention, levels=False)
    if on(opts.fuse_qkv, device):
        fuse_projections(pipe.unet)
        fuse_projections(pipe.vae)
    layout = torch.channels_last if channels_last_on(opts, device) else torch.contiguous_format
    if layout is torch.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    pipe.unet.register_forward_pre_hook(_latents_in(layout), with_kwargs=True)
    if device.type == "cuda" and on(opts.cudnn_benchmark, device):
        torch.backends.cudnn.benchmark = True
    if opts.fp8:
        quantize_fp8(pipe.unet, device, profile.name)
    if opts.step_cache_interval > 1:
        install_step_cache(pipe.unet, opts.step_cache_interval, opts.step_cache_depth)


def _latents_in(layout):
    """A UNet pre-hook giving the latents one memory layout whatever made them (img2img's VAE
    encode returns channels-last latents on CPU), so compiled blocks never see new strides."""

    def hook(module, args, kwargs):
        if args:
            return (args[0].contiguous(memory_format=layout),) + tuple(args[1:]), kwargs
        kwargs["sample"] = kwargs["sample"].contiguous(memory_format=layout)
        return args, kwargs

    return hook


def quantize_fp8(unet, device: torch.device, profile_name: str) -> int:
    """Float8 dynamic quantization (activations and weights, per-row scales) of the UNet's
    transformer Linear layers with torchao: the route MLPerf's fastest SDXL entries take past the
    bf16 limit. Needs an SM 8.9+ GPU (Ada, Hopper). Output changes slightly (8-bit mantissa
    products); attention processors' FaceID weights stay in bf16. Returns layers quantized."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise ProfileError(f"profile {profile_name!r}: speed.fp8 needs a CUDA GPU with compute capability 8.9+ "
                           f"(Ada, Hopper)", param="speed.fp8")
    try:
        from torchao.quantization import quantize_
        try:
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

            config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
        except ImportError:  # older torchao
            from torchao.quantization import float8_dynamic_activation_float8_weight

            config = float8_dynamic_activation_float8_weight()
    except ImportError as exc:
        raise ProfileError(f"profile {profile_name!r}: speed.fp8 needs torchao (pip install torchao)",
                           param="speed.fp8") from exc
    return quantize_linears(unet, lambda module, keep: quantize_(module, config, filter_fn=keep))


def fp8_linear_names(unet) -> set[str]:
    """The UNet Linear layers FP8 applies to: transformer-block linears (not the attention
    processors' identity weights) with sizes cuBLAS's FP8 GEMM takes, and, where q/k/v (or k/v)
    are fused, the fused layer only: the separate projections are views of its weight, and
    quantizing them too made a second quantized copy of every fused weight."""
    views = set()
    for name, module in unet.named_modules():
        if getattr(module, "fused_projections", False):
            parts = ("to_k", "to_v") if hasattr(module, "to_kv") else ("to_q", "to_k", "to_v")
            views |= {f"{name}.{part}" for part in parts}
    return {fqn for fqn, module in unet.named_modules()
            if isinstance(module, torch.nn.Linear) and ".processor" not in fqn and "transformer_blocks" in fqn
            and fqn not in views and module.in_features % 16 == 0 and module.out_features % 16 == 0}


def quantize_linears(unet, quantize: Callable[[torch.nn.Module, Callable], None]) -> int:
    """Quantize the layers of `fp8_linear_names` with `quantize(unet, filter_fn)` (torchao's
    `quantize_` signature), then turn the fused layers' q/k/v views into slices of the quantized
    fused layer, so no full-precision copy of a fused weight stays alive. Returns layers quantized."""
    names = fp8_linear_names(unet)
    quantize(unet, lambda module, fqn: fqn in names)
    for name, module in list(unet.named_modules()):
        if not getattr(module, "fused_projections", False):
            continue
        fused_name = "to_kv" if hasattr(module, "to_kv") else "to_qkv"
        if f"{name}.{fused_name}" in names:
            replace_views_by_slices(module, fused_name)
    return len(names)


class FusedSlice(torch.nn.Module):
    """`to_q` / `to_k` / `to_v` of a fused attention after quantization: the rows of the fused
    layer's output, computed by it (no weight of its own). The processors call the fused layer;
    this keeps code that calls a separate projection correct."""

    def __init__(self, fused: torch.nn.Module, index: int, parts: int, out_features: int):
        super().__init__()
        self._fused = (fused,)  # not a submodule: the fused layer is registered once, under its own name
        self.index, self.parts, self.out_features = index, parts, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fused[0](x).chunk(self.parts, dim=-1)[self.index]


def replace_views_by_slices(attn, fused_name: str) -> None:
    parts = ("to_k", "to_v") if fused_name == "to_kv" else ("to_q", "to_k", "to_v")
    fused = getattr(attn, fused_name)
    for index, part in enumerate(parts):
        view = getattr(attn, part)
        setattr(attn, part, FusedSlice(fused, index, len(parts), view.out_features))


def set_vae_slicing(pipe, images_in_call: int, opts: SpeedOptions) -> None:
    """Slice VAE decode for large calls: same pixels, lower peak memory."""
    if images_in_call > opts.vae_slicing_threshold:
        pipe.vae.enable_slicing()
    else:
        pipe.vae.disable_slicing()
