"""Styles workload for engine_throughput.py (`--workload styles`): N one-image requests whose
styles alternate over three LoRA styles and none (A, B, C, none, A, B, C, none, ...), the same
prompts, seeds, steps and size on every side.

- mixed:   one `engine.generate(all)`: the resident LoRAs are stacked, each image picks its own
           adapter and scale, so the N images are one UNet call (`extra["batchImages"] == [N]`).
- grouped: the same images as one `engine.generate` per style group, in order of first
           appearance — what a server that swaps or fuses one LoRA at a time must do (it can only
           batch images of the same style). Same engine, weights, options and prompt cache, so the
           ratio mixed/grouped is what batching across styles adds. Its styled calls still run
           the stacked per-row path (the cost a fused LoRA would not have); `swap` measures that.
- swap:    a plain diffusers pipeline (same weights, scheduler, prompts, seeds) holding the three
           LoRA files through diffusers' `load_lora_weights` (peft), one call per style group:
           `set_adapters([style], [scale])` + `fuse_lora` before the call, `unfuse_lora` after it,
           `disable_lora` for the no-style group — a weight-swapping server, swap cost included.

The benchmark profile keeps the built-in template-only styles, drops the profile's own LoRA
styles and adds `bench-a` (kohya layout), `bench-b` (PEFT layout), `bench-c` (kohya), tiny
seeded LoRAs of rank `rank` written from the pipeline's real layer shapes (UNet and text
encoder), with scales 1.0 / 0.8 / 0.6 so rows of one call carry different scales.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

PROMPTS = ["an astronaut", "a medieval knight", "a cyberpunk hacker", "a renaissance noble", "an elf archer",
           "a jazz musician", "a deep sea diver", "a samurai", "a mountain climber", "a chef", "a pilot", "a painter"]
STYLES = {  # name: (file layout, seed offset, scale)
    "bench-a": ("kohya", 1, 1.0),
    "bench-b": ("peft", 2, 0.8),
    "bench-c": ("kohya", 3, 0.6),
}
CYCLE = ["bench-a", "bench-b", "bench-c", None]


def styles_profile(profile, rank: int = 16, seed: int = 100):
    """`profile` with three tiny LoRA styles of rank `rank` (and no other LoRA style)."""
    from avatar_engine.styles import parse_styles

    doc = {name: {"template": f"{{prompt}}, {name} style", "negative": f"not {name}", "scale": scale,
                  "lora": {"tiny": True, "format": fmt, "rank": rank, "seed": seed + off}}
           for name, (fmt, off, scale) in STYLES.items()}
    keep = {k: v for k, v in profile.styles.items() if v.lora is None}
    return dataclasses.replace(profile, fuse_style=None, styles={**keep, **parse_styles(doc, "bench")})


def make_style_requests(n: int, model: str, steps: int | None):
    from avatar_engine import GenerationRequest

    return [GenerationRequest(prompt=f"portrait of {PROMPTS[i % len(PROMPTS)]}, variant {i}", seed=3000 + i,
                              model=model, steps=steps, style_preset=CYCLE[i % len(CYCLE)]) for i in range(n)]


def groups(requests) -> list[list[int]]:
    """Indices of the requests per style, in order of each style's first appearance."""
    out: dict = {}
    for i, r in enumerate(requests):
        out.setdefault(r.style_preset, []).append(i)
    return list(out.values())


def max_diff(a, b) -> int:
    """Largest absolute difference of two PIL images, in 8-bit levels (of 255)."""
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


def swap_setup(engine, model, plain_pipe) -> dict[str, float]:
    """Load the profile's LoRA style files into the plain pipeline as named peft adapters (the
    files the engine read, from the cache). Returns {style: LoRA scale at strength 1}."""
    from avatar_engine.model.styles import lora_file_path

    profile = model.profile
    plain_pipe.set_progress_bar_config(disable=True)
    scales = {}
    for pack in profile.lora_styles:
        path = lora_file_path(profile, pack, plain_pipe)
        plain_pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=pack.name)
        scales[pack.name] = float(pack.scale)
    plain_pipe.disable_lora()
    return scales


def swap_call(plain_pipe, scales: dict[str, float], style: str | None, call) -> list:
    """One call of a weight-swapping server: fuse `style`'s LoRA, run `call()`, unfuse."""
    components = [c for c in ("unet", "text_encoder", "text_encoder_2") if getattr(plain_pipe, c, None) is not None]
    if style is None:
        plain_pipe.disable_lora()
        return call()
    plain_pipe.enable_lora()
    plain_pipe.set_adapters([style], adapter_weights=[scales[style]])
    plain_pipe.fuse_lora(components=components, lora_scale=1.0, adapter_names=[style])
    try:
        return call()
    finally:
        plain_pipe.unfuse_lora(components=components)


def plain_generate(plain_pipe, requests) -> list:
    """One plain diffusers call for same-shaped requests (one image each), a generator per image."""
    first = requests[0]
    with torch.inference_mode():
        out = plain_pipe(prompt=[r.prompt for r in requests], negative_prompt=[r.negative_prompt for r in requests],
                         num_inference_steps=first.steps, guidance_scale=first.guidance_scale, height=first.height,
                         width=first.width, generator=[torch.Generator("cpu").manual_seed(r.seed) for r in requests])
    return list(out.images)
