"""Compile that holds: after load, any mix of generate / percify / cast / remix over every batch
bucket and aspect preset runs on the graphs compiled at warm-up, with zero recompiles.

torch.compile's guards and recompiles do not depend on the backend, so the tests trace with
the no-codegen `eager` backend on CPU and see what a GPU run would recompile. The serving
stance is switched to `fail_on_recompile`, so any recompile raises instead of being hidden by
the production fallback (run eagerly)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from avatar_engine import AvatarEngine, EngineConfig, GenerationRequest, SpeedOptions, load_profiles
from avatar_engine.runtime import compile as speed
from avatar_engine.requests import CastCharacter, CastRequest
from avatar_engine.requests import PercifyRequest
from avatar_engine.runtime.warmup import compiled_graphs

RNG = np.random.default_rng(7)
EMB = [RNG.standard_normal(512).astype(np.float32) for _ in range(4)]
MAX_BATCH = 4


def compiled_engine(base: str, max_batch: int = MAX_BATCH, styles: bool = False,
                    **profile_overrides) -> tuple[AvatarEngine, str]:
    """A compiled (no-codegen backend) twin of profile `base`; its LoRA styles only with
    `styles=True` (tests/test_compile_styles.py: styled calls are their own graphs)."""
    profiles = load_profiles()
    if not styles:
        profile_overrides.setdefault("styles", {k: v for k, v in profiles[base].styles.items() if v.lora is None})
    name = f"{base}-compiled"
    options = profile_overrides.pop("speed", None) or SpeedOptions(compile=True, compile_backend="eager",
                                                                   batch_buckets=True)
    profiles[name] = dataclasses.replace(profiles[base], name=name, speed=options, max_batch_size=max_batch,
                                         **profile_overrides)
    return AvatarEngine(EngineConfig(device="cpu", default_model=name), profiles=profiles), name


def mixed_sequence(model: str, steps: int = 1) -> list[list]:
    """The traffic of the issue: generate → percify → cast 2/3/4 with and without identity →
    batched percify → generate, plus remix, other aspects, no-CFG and strength 0."""
    g = dict(model=model, steps=steps)

    def chars(n, faces):
        return [CastCharacter(f"person {i}", identity_embedding=EMB[i] if i in faces else None) for i in range(n)]

    return [
        [GenerationRequest(prompt="an astronaut", seed=1, **g)],
        [PercifyRequest(prompt="a knight", identity_embedding=EMB[0], batch_size=2, score_outputs=False, **g)],
        [CastRequest(prompt="on mars", characters=chars(2, {0, 1}), seed=2, **g)],
        [CastRequest(prompt="on mars", characters=chars(3, set()), seed=3, aspect_ratio="16:9", **g)],
        [CastRequest(prompt="on mars", characters=chars(4, {1, 3}), seed=4, aspect_ratio="9:16", batch_size=3, **g)],
        [CastRequest(prompt="at a party", characters=chars(4, set()), seed=5, identity_strength=0.0, **g)],
        [PercifyRequest(prompt=f"hero {i}", identity_embedding=EMB[i], batch_size=b, identity_strength=s,
                        score_outputs=False, seed=10 + i, **g)
         for i, (b, s) in enumerate([(1, 0.8), (1, 1.5), (1, 0.0)])],  # 3 images: bucket 4
        [GenerationRequest(prompt="a portrait", seed=6, batch_size=3, aspect_ratio="4:3", **g)],
        [GenerationRequest(prompt="a portrait", seed=7, guidance_scale=1.0, **g)],  # no CFG, batch 1
        [GenerationRequest(prompt="a portrait", seed=8, guidance_scale=1.0, batch_size=4, aspect_ratio="3:4", **g)],
        [PercifyRequest(prompt="a portrait", identity_embedding=EMB[2], guidance_scale=1.0, score_outputs=False,
                        seed=9, **g)],
        [GenerationRequest(prompt="an astronaut", seed=1, batch_size=3, **g) for _ in range(3)],  # 9: calls of 4, 4, 1
    ]


@pytest.fixture
def fail_on_recompile(monkeypatch):
    monkeypatch.setattr(speed, "SERVING_STANCE", "fail_on_recompile")


@pytest.fixture(scope="module")
def tiny_compiled():
    return compiled_engine("tiny-sd15")


def run_and_check(engine: AvatarEngine, name: str) -> dict:
    model = engine.load(name)
    assert model.compiled and model.warm and model.buckets == [1, 2, 4][:model.buckets[-1].bit_length()]
    assert model.warmup["graphs"] > 0 and model.applied["compile"]["dynamic"] is True
    after_warmup = compiled_graphs()
    outputs = []
    for batch in mixed_sequence(name):
        outputs += engine.generate(batch)
    remix = GenerationRequest(prompt="remix", seed=3, init_image=outputs[0].images[0], strength=0.6, model=name, steps=2)
    outputs.append(engine.generate(remix))
    assert compiled_graphs() == after_warmup  # nothing compiled after load
    return {"graphs": after_warmup, "outputs": outputs}


def test_mixed_traffic_after_warmup_never_recompiles_tiny_sd15(fail_on_recompile, tiny_compiled):
    engine, name = tiny_compiled
    out = run_and_check(engine, name)
    assert all(img.size[0] > 0 for res in out["outputs"] for img in res.images)


def test_block_scope_compiles_resnet_blocks_and_never_recompiles(fail_on_recompile):
    """`compile_scope: blocks` (transformer + ResNet blocks) holds the same guarantee."""
    options = SpeedOptions(compile=True, compile_backend="eager", batch_buckets=True, compile_scope="blocks")
    engine, name = compiled_engine("tiny-sd15", speed=options)
    model = engine.load(name)
    compiled = {type(m).__name__ for m in model.pipe.unet.modules() if speed.is_compiled(m)}
    assert {"BasicTransformerBlock", "ResnetBlock2D"} <= compiled
    run_and_check(engine, name)


@pytest.mark.slow  # ~1 CPU-minute; SDXL's extra inputs (pooled text, time ids) are not guards
def test_mixed_traffic_after_warmup_never_recompiles_tiny_sdxl(fail_on_recompile):
    engine, name = compiled_engine("tiny-sdxl")
    run_and_check(engine, name)


def test_compiled_output_matches_eager(fail_on_recompile, tiny_compiled, tiny_engine):
    """The compiled model (eager backend) computes what the uncompiled one does, bucket padding
    included: padding rows never change the real rows."""
    engine, name = tiny_compiled
    plain = tiny_engine
    reqs = [PercifyRequest(prompt="a knight", identity_embedding=EMB[0], batch_size=3, seed=4, score_outputs=False),
            CastRequest(prompt="on mars", seed=5, characters=[CastCharacter("a", identity_embedding=EMB[1]),
                                                               CastCharacter("b")])]
    for req in reqs:
        a = plain.generate(dataclasses.replace(req, steps=3))
        b = engine.generate(dataclasses.replace(req, steps=3, model=name))
        assert b.extra["batchImages"] == a.extra["batchImages"]
        for x, y in zip(a.images, b.images):
            assert np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max() <= 2


def test_unforeseen_input_runs_eagerly_in_production():
    """Outside the warmed set (here: warm-up switched off), the production stance runs the call
    eagerly instead of compiling or raising."""
    profiles = load_profiles()
    opts = SpeedOptions(compile=True, compile_backend="eager", warmup=False)
    plain_styles = {k: v for k, v in profiles["tiny-sd15"].styles.items() if v.lora is None}
    profiles["cold"] = dataclasses.replace(profiles["tiny-sd15"], name="cold", speed=opts, styles=plain_styles)
    engine = AvatarEngine(EngineConfig(device="cpu", default_model="cold"), profiles=profiles)
    before = compiled_graphs()
    res = engine.generate(GenerationRequest(prompt="x", seed=1, steps=1))
    assert res.images and compiled_graphs() == before


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_real_sd15_architecture_mixed_traffic_never_recompiles(fail_on_recompile):
    """The real SD1.5 architecture (860M UNet, random weights) with a FaceID adapter in the
    released layout (rank-128 LoRA), at its smallest size: the same guarantee."""
    engine, name = compiled_engine("sd15-random", max_batch=2, resolution=64, size_multiple=16)
    torch.manual_seed(0)
    run_and_check(engine, name)


def test_every_offered_identity_method_is_warmed_up(fail_on_recompile, tiny_compiled):
    """tiny-sd15 also offers faceid-plus-v2: its identity and regional graphs (its weights are
    a guard) are compiled at warm-up, so its percify and cast traffic compiles nothing."""
    from PIL import Image
    from skimage import data

    engine, name = tiny_compiled
    model = engine.load(name)
    assert model.warmup["identityMethods"] == ["faceid", "faceid-plus-v2"]
    after_warmup = compiled_graphs()
    face = Image.fromarray(data.astronaut())
    g = dict(model=name, steps=1, identity_method="faceid-plus-v2")
    engine.generate([PercifyRequest(prompt="a knight", photos=[face], batch_size=3, score_outputs=False, seed=1, **g)])
    engine.generate([CastRequest(prompt="on mars", seed=2, characters=[CastCharacter("a", photos=[face]),
                                                                      CastCharacter("b")], **g)])
    engine.generate([PercifyRequest(prompt="a knight", photos=[face], guidance_scale=1.0, score_outputs=False,
                                    seed=3, **g)])
    assert compiled_graphs() == after_warmup


def test_without_warmup_the_first_requests_compile():
    """`warmup: false` defers compiling to the first requests; it must not switch compiling off
    (the serving stance runs eagerly only once a warm-up has compiled)."""
    torch._dynamo.reset()
    options = SpeedOptions(compile=True, compile_backend="eager", batch_buckets=True, warmup=False)
    engine, name = compiled_engine("tiny-sd15", speed=options)
    model = engine.load(name)
    assert model.compiled and not model.warm
    before = compiled_graphs()
    engine.generate([GenerationRequest(prompt="an astronaut", seed=1, steps=1, model=name)])
    assert compiled_graphs() > before
