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
