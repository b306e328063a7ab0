"""Style LoRAs in a compiled UNet: after warm-up, styles varying within and across batches (with
identity, regions, img2img, no CFG, other aspects, any strength) compile nothing, on the
regional and the whole-UNet scope. Traced with the no-codegen `eager` backend on CPU; any
recompile raises (`fail_on_recompile`)."""
from __future__ import annotations

import pytest
import torch

from avatar_engine import GenerationRequest, SpeedOptions, load_profiles
from avatar_engine.requests import CastCharacter, CastRequest, PercifyRequest
from avatar_engine.runtime import compile as speed
from avatar_engine.runtime.warmup import compiled_graphs
from test_compile import EMB, compiled_engine

SCOPES = {"regional": "regional",
          # ~5 CPU-minutes of tracing (every variant twice: plain and styled): CI's `make test-compile` step
          "full": pytest.param("full", marks=pytest.mark.compile)}


@pytest.fixture
def fail_on_recompile(monkeypatch):
    monkeypatch.setattr(speed, "SERVING_STANCE", "fail_on_recompile")


def styled_traffic(name: str) -> list[list]:
    g = dict(model=name, steps=1)
    return [
        [GenerationRequest(prompt="a", style_preset=s, seed=i, guidance_scale=7.0, **g)
         for i, s in enumerate(["pixel-art", "watercolor", None])],  # 3 images: calls of 2 and 1
        [GenerationRequest(prompt="b", style_preset="pixel-art", style_strength=0.3, seed=4, **g),
         GenerationRequest(prompt="b", seed=5, **g)],
        [GenerationRequest(prompt="c", style_preset="watercolor", style_strength=2.0, seed=6, batch_size=2,
                           guidance_scale=7.0, **g)],
        [PercifyRequest(prompt="d", identity_embedding=EMB[i], style_preset=s, seed=7 + i, score_outputs=False,
                        guidance_scale=7.0, **g) for i, s in enumerate(["pixel-art", "watercolor"])],
        [CastRequest(prompt="e", style_preset="pixel-art", seed=9, guidance_scale=7.0, characters=[
            CastCharacter("x", identity_embedding=EMB[0]), CastCharacter("y")], **g)],
        [CastRequest(prompt="f", style_preset="watercolor", seed=10, aspect_ratio="16:9", guidance_scale=7.0,
                     characters=[CastCharacter(f"p{i}") for i in range(3)], **g)],
        [GenerationRequest(prompt="g", style_preset="pixel-art", seed=11, guidance_scale=1.0, **g)],  # no CFG
        [GenerationRequest(prompt="h", style_preset="watercolor", seed=12, aspect_ratio="3:4", guidance_scale=7.0,
                           **g)],
        [GenerationRequest(prompt="i", seed=13, **g)],  # back to the plain path
    ]


@pytest.mark.parametrize("scope", list(SCOPES.values()), ids=list(SCOPES))
def test_styles_varying_within_and_across_batches_never_recompile(fail_on_recompile, scope):
    torch._dynamo.reset()
    base = load_profiles()["tiny-sd15"]
    options = SpeedOptions(compile=True, compile_backend="eager", batch_buckets=True, compile_scope=scope)
    engine, name = compiled_engine("tiny-sd15", max_batch=2, styles=True, speed=options,
                                   identity_methods={"faceid": base.identity_methods["faceid"]},
                                   identity_method="faceid")
    model = engine.load(name)
    assert model.warmup["styled"] and any(v["variant"].endswith("styled") for v in model.warmup["variants"])
    assert model.applied["style_loras"]["adapters"] == ["pixel-art-tiny", "watercolor-tiny"]
    after_warmup = compiled_graphs()
    results = []
    for batch in styled_traffic(name):
        results += engine.generate(batch)
    remix = GenerationRequest(prompt="r", seed=14, init_image=results[0].images[0], strength=0.6, model=name,
                              steps=2, style_preset="watercolor")
    results.append(engine.generate(remix))
    assert compiled_graphs() == after_warmup
    assert results[0].extra["batchImages"] == [2] and results[0].extra["style"]["lora"]["name"] == "pixel-art-tiny"
