"""Step caching and InstantID's ControlNet on compiled UNets (regional and the whole-UNet CUDA
candidate): after warm-up they compile nothing, and the compiled model computes what the eager
one does.

Step caching used to keep its step counter and deep feature inside the UNet's forward, so a
whole-UNet graph guarded on them and recompiled every step (in production: ran eagerly). Its
full and cached passes are now pure functions, each one graph, and the step logic stays in Python
between them. InstantID adds its ControlNet residuals through a UNet pre-hook held only for the
call: the compiled graph must take them as inputs, never bake in a stale hook.

Traced with the no-codegen `eager` backend on CPU under the `fail_on_recompile` stance."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from avatar_engine import AvatarEngine, EngineConfig, GenerationRequest, SpeedOptions, load_profiles
from avatar_engine.requests import CastCharacter, CastRequest, PercifyRequest
from avatar_engine.runtime import compile as speed
from avatar_engine.runtime.warmup import compiled_graphs, warmup_photo

SCOPES = {"regional": "regional", "full": pytest.param("full", marks=pytest.mark.compile)}
EMB = np.random.default_rng(3).standard_normal(512).astype(np.float32)


@pytest.fixture
def fail_on_recompile(monkeypatch):
    monkeypatch.setattr(speed, "SERVING_STANCE", "fail_on_recompile")


def twins(base: str, method: str, **speed_options) -> tuple[AvatarEngine, str, str]:
    """An engine with a compiled (eager backend) and an uncompiled copy of `base`, both offering
    only identity method `method`, the same other speed options; max batch 2 (buckets 1, 2), or
    1 for the whole-UNet scope, whose every graph is a minute of tracing on CPU (CI's compile step)."""
    profiles = load_profiles()
    p = profiles[base]
    max_batch = 1 if speed_options.get("compile_scope") == "full" else 2
    common = dict(max_batch_size=max_batch, identity_method=method,
                  identity_methods={k: v for k, v in p.identity_methods.items() if k == method},
                  styles={k: v for k, v in p.styles.items() if v.lora is None})
    profiles["compiled"] = dataclasses.replace(p, name="compiled", speed=SpeedOptions(
        compile=True, compile_backend="eager", batch_buckets=True, **speed_options), **common)
    eager = {k: v for k, v in speed_options.items() if k.startswith("step_cache")}
    profiles["eager"] = dataclasses.replace(p, name="eager", speed=SpeedOptions(batch_buckets=True, **eager), **common)
    return AvatarEngine(EngineConfig(device="cpu", default_model="compiled"), profiles=profiles), "compiled", "eager"


def pixels(result) -> list[np.ndarray]:
    return [np.asarray(im, np.int16) for im in result.images]


def same_pixels(engine: AvatarEngine, compiled: str, eager: str, requests) -> list[int]:
    """Each request on both twins: the compiled pixels are the eager ones (≤ 2/255); returns the
    graphs each request compiled."""
    model = engine.load(compiled)
    assert speed.is_compiled(model.pipe.unet) == (model.applied["compile"]["scope"] == "full")
    compiled_per_request = []
    for req in requests:
        before = compiled_graphs()
        got = engine.generate(dataclasses.replace(req, model=compiled))
        compiled_per_request.append(compiled_graphs() - before)
        want = engine.generate(dataclasses.replace(req, model=eager))
        for a, b in zip(pixels(got), pixels(want)):
            assert np.abs(a - b).max() <= 2
    return compiled_per_request


def same_pixels_without_recompiles(engine: AvatarEngine, compiled: str, eager: str, requests) -> None:
    assert engine.load(compiled).warm
    assert same_pixels(engine, compiled, eager, requests) == [0] * len(requests)


@pytest.mark.parametrize("scope", list(SCOPES.values()), ids=list(SCOPES))
def test_step_caching_compiles_its_passes_once(fail_on_recompile, scope):
    """interval 2: full, cached, full, … on every mode; both passes are compiled at warm-up."""
    torch._dynamo.reset()
    engine, compiled, eager = twins("tiny-sd15", "faceid", compile_scope=scope, step_cache_interval=2)
    state = engine.load(compiled).pipe.unet.avatar_step_cache
    g = dict(steps=5)
    same_pixels_without_recompiles(engine, compiled, eager, [
        GenerationRequest(prompt="an astronaut", seed=1, **g),
        GenerationRequest(prompt="two astronauts", seed=2, batch_size=2, aspect_ratio="4:3", **g),
        PercifyRequest(prompt="a knight", identity_embedding=EMB, seed=3, score_outputs=False, **g),
        CastRequest(prompt="on mars", seed=4, characters=[CastCharacter("a", identity_embedding=EMB),
                                                          CastCharacter("b")], **g),
        GenerationRequest(prompt="no guidance", seed=5, guidance_scale=1.0, **g),
    ])
    assert state.cached_steps > 0 and state.full_steps > 0


@pytest.mark.parametrize("scope", list(SCOPES.values()), ids=list(SCOPES))
def test_instantid_controlnet_residuals_reach_the_compiled_unet(fail_on_recompile, scope):
    """tiny-sdxl with InstantID: percify from two different faces and a cast with one face give
    the eager pixels (the ControlNet's residuals are inputs of the compiled graph, never a stale
    hook baked in). Regional: nothing compiles after warm-up. Whole UNet (a full tiny-sdxl warm-up
    is minutes of tracing; tests/test_compile_full.py proves warm-up completeness on that scope):
    without warm-up, the second face runs on the first face's graphs."""
    from PIL import Image
    from skimage import data

    torch._dynamo.reset()
    full = scope == "full"
    engine, compiled, eager = twins("tiny-sdxl", "instantid", compile_scope=scope, warmup=not full)
    g = dict(steps=2, identity_method="instantid", score_outputs=False)
    requests = [
        PercifyRequest(prompt="a knight", photos=[warmup_photo()], seed=1, **g),
        PercifyRequest(prompt="a knight", photos=[Image.fromarray(data.astronaut())], seed=1, **g),
        CastRequest(prompt="on mars", seed=2, identity_method="instantid", steps=2,
                    characters=[CastCharacter("a", photos=[warmup_photo()]), CastCharacter("b")]),
        GenerationRequest(prompt="plain", seed=3, steps=2),
    ]
    if not full:
        same_pixels_without_recompiles(engine, compiled, eager, requests)
        return
    graphs = same_pixels(engine, compiled, eager, requests)
    assert graphs[0] > 0 and graphs[1] == 0, graphs
