"""What runs, read back from the modules (not what was asked for): the report behind
`LoadedModel.applied`, the service's `/health` and the benchmarks."""
from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention

from ..model.attention import AvatarAttnProcessor
from .compile import is_compiled


def describe_pipeline(model) -> dict:
    """What runs, read back from the modules: dtype, attention kernel(s) of the UNet and VAE
    processors, fused layers, memory format, compiled parts, identity adapter."""
    pipe, opts = model.pipe, model.profile.speed
    unet = pipe.unet
    out: dict = {"dtype": str(next(unet.parameters()).dtype).replace("torch.", "")}
    kernels = set()
    for module in (unet, pipe.vae):
        for proc in module.attn_processors.values():
            kernels.add(proc.kernel if isinstance(proc, AvatarAttnProcessor) else type(proc).__name__)
    out["attention"] = ",".join(sorted(kernels))
    layers = [m for m in list(unet.modules()) + list(pipe.vae.modules()) if isinstance(m, Attention)]
    fused = sum(bool(getattr(m, "fused_projections", False)) for m in layers)
    out["fuse_qkv"] = fused == len(layers) and fused > 0
    if 0 < fused < len(layers):
        out["fuse_qkv"] = f"{fused}/{len(layers)} layers"
    if unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last) and unet.conv_in.weight.shape[-1] > 1:
        out["channels_last"] = True
    blocks = [m for m in unet.modules() if is_compiled(m)]
    if blocks:
        scope = "full" if is_compiled(unet) else f"regional ({len(blocks)} blocks)"
        out["compile"] = {"scope": scope, "mode": opts.compile_mode, "backend": opts.compile_backend,
                          "dynamic": opts.compile_dynamic, "vae": is_compiled(pipe.vae.decoder),
                          "cuda_graphs": opts.cuda_graphs}
    if model.buckets:
        out["batch_buckets"] = list(model.buckets)
    procs = [p for p in unet.attn_processors.values() if isinstance(p, AvatarAttnProcessor)]
    methods = {}
    for name, adapter in (model.state.get("identity_adapters") or {}).items():
        if adapter.loaded:
            methods[name] = {"variant": adapter.label, "layers": sum(name in p.identities for p in procs),
                             "lora_rank": adapter.lora_rank, "identitynet": adapter.identitynet is not None,
                             "image_encoder": adapter.image_encoder is not None}
    if methods:
        default = model.profile.identity_method
        out["ip_adapter"] = methods.get(default) or next(iter(methods.values()))
        out["identity_methods"] = methods
    if torch.backends.cudnn.benchmark and model.device.type == "cuda":
        out["cudnn_benchmark"] = True
    if opts.fp8:
        out["fp8"] = True
    if opts.prompt_cache:
        out["prompt_cache"] = opts.prompt_cache
    if opts.step_cache_interval > 1:
        out["step_cache"] = {"interval": opts.step_cache_interval, "depth": opts.step_cache_depth}
    if opts.preview != "none":
        out["preview"] = opts.preview
    if getattr(model, "styles", None) is not None:  # resident style LoRAs and their memory
        out["style_loras"] = model.styles.to_json()
    return out
