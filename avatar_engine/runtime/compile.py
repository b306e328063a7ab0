"""torch.compile of a prepared pipeline, and the stance calls run under once it is warm.

Compile design (why the graphs are fixed at load): the UNet's attention processors never change
(model/attention.py), per-call values are tensors, batch and spatial sizes are symbolic
(`compile_dynamic`), and calls are padded to batch buckets (1, 2, 4, ...; CUDA graphs record
one graph per bucket). What varies structurally is the attention mode (plain / identity /
regional) and, without classifier-free guidance, a batch of one (dynamo specialises sizes 0
and 1). Warm-up runs each of those at load; after it, calls run under the
`eager_on_recompile` stance, so an input nobody foresaw runs eagerly (correct, slower) instead
of compiling during live traffic or hitting the recompile limit.
"""
from __future__ import annotations

import contextlib

import torch

from ..config import SpeedOptions
from .optimize import on

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


def compile_options(opts: SpeedOptions) -> dict:
    """torch.compile keyword arguments for the profile's options. Inductor settings (the mode's,
    diffusion-fast's flags, CUDA graphs) go in `options`, which inductor applies to this
    compile only, never to the process's global config; a mode is expanded into its options
    because torch.compile takes one or the other."""
    import torch._inductor

    kwargs: dict = dict(backend=opts.compile_backend, fullgraph=True,
                        dynamic=True if opts.compile_dynamic else None)
    if opts.compile_backend != "inductor":
        return kwargs
    mode = opts.compile_mode
    if mode == "max-autotune" and not opts.cuda_graphs:  # max-autotune implies CUDA graphs; they are their own option
        mode = "max-autotune-no-cudagraphs"
    options = dict(torch._inductor.list_mode_options(mode))
    flags = opts.inductor_flags if opts.inductor_flags is not None else mode.startswith("max-autotune")
    if flags:
        options.update(DIFFUSION_FAST_INDUCTOR_FLAGS)
    options["triton.cudagraphs"] = bool(opts.cuda_graphs)
    kwargs["options"] = options
    return kwargs


@contextlib.contextmanager
def scoped_inductor_config():
    """Inductor's global config as it was before: whatever the engine's compiles (or a caller's
    ablation) set globally is restored on exit, even on an error, so one model's CUDA graphs or
    autotuning flags never leak into the next model's compiles."""
    import torch._inductor.config as inductor_config

    saved = inductor_config.save_config()
    try:
        yield inductor_config
    finally:
        inductor_config.load_config(saved)


def compile_pipeline(pipe, opts: SpeedOptions, device: torch.device) -> None:
    """torch.compile the UNet (each transformer block, ResNet blocks too, or whole) and optionally
    the VAE decoder, in place (state-dict keys and processors unchanged). With CUDA graphs on
    CUDA, the compiled UNet and decoder copy their outputs out of the graphs' static buffers."""
    import torch._dynamo
    import torch.fx.experimental._config as fx_config

    # Sizes that are equal by chance at trace time (4 identity tokens, a batch of 4) must not be
    # unified into one symbol, or the first call where they differ recompiles.
    fx_config.use_duck_shape = False
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                           RECOMPILE_LIMIT * 16)
    kwargs = compile_options(opts)
    compiled = []
    if opts.compile_scope in ("regional", "blocks"):
        names = set(getattr(pipe.unet, "_repeated_blocks", ()) or ("BasicTransformerBlock",))
        if opts.compile_scope == "blocks":  # GroupNorm+SiLU+conv of the ResNet blocks fused too (H200 profile)
            names |= {"ResnetBlock2D"}
        for module in pipe.unet.modules():
            if type(module).__name__ in names:
                module.compile(**kwargs)
    elif getattr(pipe.unet, "avatar_step_cache", None) is not None:
        # Step caching: its full and cached passes (and the plain forward) are one graph each;
        # the step counter and the kept feature stay in Python between them (model/stepcache.py),
        # where a whole-UNet graph would guard on them and recompile every step.
        graphs = cuda_graphs_on(opts, device)
        pipe.unet.avatar_step_cache.compile(
            lambda fn: copying_outputs(torch.compile(fn, **kwargs)) if graphs else torch.compile(fn, **kwargs))
        pipe.unet.avatar_compiled_passes = True
    else:  # full: one graph per UNet call (GroupNorm+SiLU fused, channels_last end to end)
        pipe.unet.compile(**kwargs)
        compiled.append(pipe.unet)
    if on(opts.compile_vae, device):
        pipe.vae.decoder.compile(**kwargs)
        compiled.append(pipe.vae.decoder)
    if cuda_graphs_on(opts, device):
        for module in compiled:
            copy_outputs_out(module)


def cuda_graphs_on(opts: SpeedOptions, device: torch.device) -> bool:
    """CUDA graphs are recorded only by inductor on a CUDA device."""
    return bool(opts.cuda_graphs) and opts.compile_backend == "inductor" and device.type == "cuda"


def copy_outputs_out(module: torch.nn.Module) -> None:
    """Wrap a compiled module's call so that each call starts a new CUDA-graph step and returns
    copies of its outputs: a replay overwrites the static output buffers of the previous one,
    and the sampler holds the previous UNet output across steps (and a batch's decoded images
    outlive the next call). The wrapper sits outside the graph (on `_compiled_call_impl`, which
    `nn.Module.__call__` runs), so the copies are real. One graph is recorded per attention mode
    × identity method × batch bucket × shape; warm-up records them all."""
    graphed = module._compiled_call_impl
    if graphed is None or getattr(graphed, "copies_outputs", False):
        return
    module._compiled_call_impl = copying_outputs(graphed)


def copying_outputs(graphed):
    """`graphed` (a compiled callable that may replay CUDA graphs) starting a new CUDA-graph step
    per call and returning copies of its tensor outputs (see `copy_outputs_out`)."""
    from torch.utils._pytree import tree_map_only

    def call(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return tree_map_only(torch.Tensor, torch.Tensor.clone, graphed(*args, **kwargs))

    call.copies_outputs = True
    return call


def is_compiled(module: torch.nn.Module) -> bool:
    """Compiled whole: as a module, or (a step-cached UNet) as its passes."""
    return getattr(module, "_compiled_call_impl", None) is not None or getattr(module, "avatar_compiled_passes", False)


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
