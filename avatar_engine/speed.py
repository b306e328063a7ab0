"""Speed options applied to a loaded pipeline, and a report of what really runs.

Each option is a profile setting (SpeedOptions); `None` means "on where it helps", decided per
device here. `describe_pipeline` reads the report back from the modules (processor kernels,
fused layers, memory format, compiled blocks), so `applied`, `/health` and the benchmarks say
what runs, not what was asked for.

Compile design (why the graphs are fixed at load): the UNet's attention processors never change
(attention.py), per-call values are tensors, batch and spatial sizes are symbolic
(`compile_dynamic`), and calls are padded to batch buckets (1, 2, 4, ...; CUDA graphs record
one graph per bucket). What varies structurally is the attention mode (plain / identity /
regional) and, without classifier-free guidance, a batch of one (dynamo specialises sizes 0
and 1). Warm-up runs each of those at load; after it, calls run under the
`eager_on_recompile` stance, so an input nobody foresaw runs eagerly (correct, slower) instead
of compiling during live traffic or hitting the recompile limit.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging

import torch

from .config import ModelProfile, SpeedOptions
from .errors import ProfileError

log = logging.getLogger(__name__)

# Dynamo's recompile limit is a guard here, not a budget: modes × {batch 1, batch n} × UNet
# levels stays far below it. Hitting it means a bug, and with eager_on_recompile it never raises.
RECOMPILE_LIMIT = 64

# diffusion-fast's inductor flags (github.com/huggingface/diffusion-fast, run_benchmark.py).
DIFFUSION_FAST_INDUCTOR_FLAGS = {
    "conv_1x1_as_mm": True,
    "coordinate_descent_tuning": True,
    "epilogue_fusion": False,
    "coordinate_descent_check_all_directions": True,
}


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
    from .attention import fuse_projections, install_processors

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
        from .stepcache import install_step_cache

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
    count = [0]

    def eligible(module, fqn: str) -> bool:
        ok = (isinstance(module, torch.nn.Linear) and ".processor" not in fqn and "transformer_blocks" in fqn
              and module.in_features % 16 == 0 and module.out_features % 16 == 0)
        count[0] += ok
        return ok

    quantize_(unet, config, filter_fn=eligible)
    return count[0]


def compile_pipeline(pipe, opts: SpeedOptions, device: torch.device) -> None:
    """torch.compile the UNet (each transformer block, or whole) and optionally the VAE decoder,
    in place (state-dict keys and processors unchanged)."""
    import torch._dynamo
    import torch.fx.experimental._config as fx_config

    # Sizes that are equal by chance at trace time (4 identity tokens, a batch of 4) must not be
    # unified into one symbol, or the first call where they differ recompiles.
    fx_config.use_duck_shape = False
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                           RECOMPILE_LIMIT * 16)
    kwargs = dict(backend=opts.compile_backend, fullgraph=True, dynamic=True if opts.compile_dynamic else None)
    if opts.compile_backend == "inductor":
        import torch._inductor.config as inductor_config

        if opts.compile_mode != "default":
            kwargs["mode"] = opts.compile_mode
        flags = opts.inductor_flags if opts.inductor_flags is not None else opts.compile_mode.startswith("max-autotune")
        if flags:
            for key, value in DIFFUSION_FAST_INDUCTOR_FLAGS.items():
                setattr(inductor_config, key, value)
        if opts.cuda_graphs:
            inductor_config.triton.cudagraphs = True
        elif opts.compile_mode == "max-autotune":  # max-autotune implies CUDA graphs; they are their own option
            kwargs["mode"] = "max-autotune-no-cudagraphs"
    if opts.compile_scope in ("regional", "blocks"):
        names = set(getattr(pipe.unet, "_repeated_blocks", ()) or ("BasicTransformerBlock",))
        if opts.compile_scope == "blocks":  # GroupNorm+SiLU+conv of the ResNet blocks fused too (H200 profile)
            names |= {"ResnetBlock2D"}
        for module in pipe.unet.modules():
            if type(module).__name__ in names:
                module.compile(**kwargs)
    else:
        pipe.unet.compile(**kwargs)
    if on(opts.compile_vae, device):
        pipe.vae.decoder.compile(**kwargs)


def is_compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


# After warm-up: an input that would need a new graph runs eagerly instead of compiling during
# live traffic. Tests set "fail_on_recompile" to prove no request needs one.
SERVING_STANCE = "eager_on_recompile"


@contextlib.contextmanager
def serving_stance(model):
    """Calls on a warm compiled model run under SERVING_STANCE."""
    if model.warm and model.compiled:
        with torch.compiler.set_stance(SERVING_STANCE):
            yield
    else:
        yield


def batch_buckets(max_batch: int) -> list[int]:
    """Padded call sizes: powers of two up to max_batch, and max_batch itself."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


def bucket_for(n: int, max_batch: int) -> int:
    return next(b for b in batch_buckets(max(max_batch, n)) if b >= n)


def set_vae_slicing(pipe, images_in_call: int, opts: SpeedOptions) -> None:
    """Slice VAE decode for large calls: same pixels, lower peak memory."""
    if images_in_call > opts.vae_slicing_threshold:
        pipe.vae.enable_slicing()
    else:
        pipe.vae.disable_slicing()


def describe_pipeline(model) -> dict:
    """What runs, read back from the modules: dtype, attention kernel(s) of the UNet and VAE
    processors, fused layers, memory format, compiled parts, identity adapter."""
    from .attention import AvatarAttnProcessor

    pipe, opts = model.pipe, model.profile.speed
    unet = pipe.unet
    out: dict = {"dtype": str(next(unet.parameters()).dtype).replace("torch.", "")}
    kernels = set()
    for module in (unet, pipe.vae):
        for proc in module.attn_processors.values():
            kernels.add(proc.kernel if isinstance(proc, AvatarAttnProcessor) else type(proc).__name__)
    out["attention"] = ",".join(sorted(kernels))
    from diffusers.models.attention_processor import Attention

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
    return out
