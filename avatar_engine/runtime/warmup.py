"""Warm-up and memory probe at load: every variant a profile serves runs once before traffic.

Variants are what changes a compiled graph (speed.py): the attention mode (plain generate,
identity for percify, regional for cast) and, for the last two, each identity method the
profile offers (its weights are a guard), the batch bucket, the image shape (aspect presets),
and a batch of one without classifier-free guidance (guidance 1). With dynamic shapes one call
per mode and bucket at the native shape, one per other aspect preset, and one without CFG
cover every graph; with CUDA graphs, which record one graph per concrete shape, every
bucket × aspect combination runs.
"""
from __future__ import annotations

import logging
import time

from typing import Mapping

import numpy as np
import torch
from PIL import Image

from ..identity_methods import needs_photos
from ..requests import ASPECT_RATIOS, MAX_BATCH_SIZE, CastCharacter, CastRequest, GenerationRequest, PercifyRequest
from .memory import PROBE_BATCHES, MemoryProfile, cuda_budget, fit_line, measure_peaks
from .scheduler import LoadedModel, Task, execute

log = logging.getLogger(__name__)
WARMUP_STEPS = 1  # guards do not depend on the step count


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process (each one an inductor compile on GPU)."""
    from torch._dynamo.utils import counters  # dynamo's internals load only when asked

    return int(counters["stats"]["unique_graphs"])


def compile_counts() -> dict[str, int]:
    """Graphs compiled so far and how inductor's FX graph cache answered them (a hit loads the
    compiled code instead of generating it: a saved compile cache, or the local one)."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "cacheHits": int(counters["inductor"]["fxgraph_cache_hit"]),
            "cacheMisses": int(counters["inductor"]["fxgraph_cache_miss"])}


def _variant_label(kind: str, method: str | None, images: int, aspect: str, guidance: float | None) -> str:
    label = f"{kind}{'/' + method if method else ''} b{images} {aspect}"
    return label + (" no-cfg" if guidance == 1.0 else "")


def _timed(label: str, run) -> dict:
    """One warm-up call with its time and what it compiled: seconds, graphs, cache hits/misses."""
    before, t0 = compile_counts(), time.perf_counter()
    run()
    after = compile_counts()
    return {"variant": label, "seconds": round(time.perf_counter() - t0, 3),
            **{k: after[k] - before[k] for k in after}}


def _unit(seed: int) -> list[float]:
    v = np.random.default_rng(seed).standard_normal(512)
    return (v / np.linalg.norm(v)).tolist()


def served_modes(model) -> list[tuple[str, str | None]]:
    """(request kind, identity method) pairs a profile serves: plain generate, cast (regional)
    and percify once per identity method it offers (each method is its own graph)."""
    methods = list(model.profile.offered_identity_methods)
    if not methods:
        return [("generate", None), ("cast", None)]
    return [("generate", None)] + [(kind, m) for m in methods for kind in ("percify", "cast")]


_WARMUP_PHOTO = None


def warmup_photo():
    """A real face photo (scikit-image's astronaut) for methods that read the face crop."""
    global _WARMUP_PHOTO
    if _WARMUP_PHOTO is None:
        from skimage import data  # scikit-image: only for methods that read the face crop

        _WARMUP_PHOTO = Image.fromarray(data.astronaut())
    return _WARMUP_PHOTO


def stacked_style(model) -> str | None:
    """A style whose LoRA is stacked (None: no stacked styles): styled calls are their own graph
    (the per-row LoRA path), so warm-up runs every variant with one as well."""
    state = getattr(model, "styles", None)
    return next(iter(state.index), None) if state is not None and state.report is not None else None


def warmup_steps(model) -> int:
    """Steps per warm-up call: 1, or 2 with step caching (its full pass, then its cached pass:
    each is its own graph)."""
    return 2 if getattr(model.pipe.unet, "avatar_step_cache", None) is not None else WARMUP_STEPS


def variant_requests(model, kind: str, images: int, aspect_ratio: str = "1:1", guidance: float | None = None,
                     steps: int | None = None, method: str | None = None, style: str | None = None) -> list:
    """Requests of `kind` totalling `images` images (requests hold at most MAX_BATCH_SIZE)."""
    photo = needs_photos(method)
    steps = warmup_steps(model) if steps is None else steps
    out = []
    for i in range(0, images, MAX_BATCH_SIZE):
        common = dict(prompt="warm-up portrait", seed=i, steps=steps, batch_size=min(MAX_BATCH_SIZE, images - i),
                      aspect_ratio=aspect_ratio, guidance_scale=guidance, model=model.profile.name,
                      style_preset=style)
        if kind == "generate":
            out.append(GenerationRequest(**common))
        elif kind == "percify":
            face = dict(photos=[warmup_photo()]) if photo else dict(identity_embedding=_unit(1))
            out.append(PercifyRequest(score_outputs=False, identity_method=method, **face, **common))
        else:
            face = {}
            if method is not None:
                face = dict(photos=[warmup_photo()]) if photo else dict(identity_embedding=_unit(2))
            out.append(CastRequest(characters=[CastCharacter("a person", **face), CastCharacter("another person")],
                                   identity_method=method, **common))
    return out


def remix_request(model, style: str | None = None):
    res = model.profile.resolution
    return GenerationRequest(prompt="warm-up remix", seed=0, steps=warmup_steps(model) * 2, strength=0.5,
                             init_image=Image.new("RGB", (res, res), (128, 96, 64)), model=model.profile.name,
                             style_preset=style)


def run_variant(model: LoadedModel, tasks: Mapping[str, Task], requests, cap: int | None = None) -> None:
    """Run requests through the scheduler and the given tasks (the engine's, by kind) on an
    already-locked model (no scoring, no results)."""
    resolved = [r.resolve(model.profile) for r in requests]
    chosen = [tasks[r.kind] for r in resolved]
    prepared = [t.prepare(model, r) for t, r in zip(chosen, resolved)]
    items = [t.items(model, r, i, p) for i, (t, r, p) in enumerate(zip(chosen, resolved, prepared))]
    execute({model.profile.name: model}, resolved, chosen, items, cap)


def warm_up(model: LoadedModel, tasks: Mapping[str, Task], cap: int | None = None) -> dict:
    """Run every variant once; returns seconds, calls, graphs compiled and, per variant (the
    `variants` list), its seconds, graphs and FX-cache hits/misses: compile time vs cache-hit
    time per graph, which /v1/health shows."""
    t0, graphs0 = time.perf_counter(), compiled_graphs()
    opts = model.profile.speed
    buckets = model.buckets or [1]
    aspects = list(ASPECT_RATIOS)
    plan: list[tuple[str, str | None, int, str, float | None]] = []
    for kind, method in served_modes(model):
        if not model.compiled:  # nothing to compile: one call per kind selects kernels and fills caches
            plan.append((kind, method, 1, "1:1", None))
            continue
        for bucket in buckets:
            for aspect in (aspects if opts.cuda_graphs else aspects[:1]):
                plan.append((kind, method, bucket, aspect, None))
        if not opts.cuda_graphs:
            plan += [(kind, method, buckets[0], aspect, None) for aspect in aspects[1:]]
        plan.append((kind, method, 1, "1:1", 1.0))  # no classifier-free guidance: a UNet batch of one
    variants = []
    styles = [None] + ([stacked_style(model)] if stacked_style(model) else [])
    for style in styles:
        for kind, method, images, aspect, guidance in plan:
            requests = variant_requests(model, kind, images, aspect, guidance, method=method, style=style)
            label = _variant_label(kind, method, images, aspect, guidance) + (" styled" if style else "")
            variants.append(_timed(label, lambda: run_variant(model, tasks, requests, cap)))
        variants.append(_timed("remix" + (" styled" if style else ""),  # img2img, VAE encoder
                               lambda: run_variant(model, tasks, [remix_request(model, style)], cap)))
    compiling = [v for v in variants if v["graphs"]]
    report = {"seconds": round(time.perf_counter() - t0, 2), "calls": (len(plan) + 1) * len(styles),
              "graphs": compiled_graphs() - graphs0,
              "compileSeconds": round(sum(v["seconds"] for v in compiling if v["cacheMisses"] or not v["cacheHits"]), 2),
              "cacheHitSeconds": round(sum(v["seconds"] for v in compiling if v["cacheHits"] and not v["cacheMisses"]),
                                       2),
              "cacheHits": sum(v["cacheHits"] for v in variants), "cacheMisses": sum(v["cacheMisses"] for v in variants),
              "variants": variants,
              "kinds": sorted({k for k, _ in served_modes(model)}),
              "identityMethods": list(model.profile.offered_identity_methods), "buckets": list(buckets),
              "styled": len(styles) > 1}
    log.info("warm-up of %s: %s", model.profile.name, report)
    return report


def probe_memory(model: LoadedModel, tasks: Mapping[str, Task]) -> MemoryProfile:
    """Peak memory of 1-step calls at two batch sizes, plain and regional (CUDA, before
    compiling), → memory.MemoryProfile with the budget available after load."""
    res = model.profile.resolution

    def runner(kind):
        method = model.profile.identity_method if kind == "cast" else None  # cast with a face, as served
        return lambda n: run_variant(model, tasks, variant_requests(model, kind, n, steps=1, method=method))

    with torch.inference_mode():
        fixed, per = fit_line(measure_peaks(runner("generate"), model.device, PROBE_BATCHES))
        _, regional = fit_line(measure_peaks(runner("cast"), model.device, PROBE_BATCHES))
    torch.cuda.empty_cache()
    profile = MemoryProfile(fixed_bytes=fixed, per_image_bytes=per, probe_pixels=res * res,
                            regional_per_image_bytes=regional, budget_bytes=cuda_budget(model.device))
    log.info("memory probe of %s: %s", model.profile.name, profile)
    return profile
