"""`compile_scope: full` (the whole UNet as one graph, the VAE decoder compiled: the CUDA
candidate) holds the no-recompile guarantee of the regional default, also after an identity
adapter is released and loaded again; inductor's global flags stay scoped to the engine's
compiles; CUDA-graph outputs are copied out; compiled artifacts persist across restarts.

Guards do not depend on the backend: the no-codegen `eager` backend on CPU shows what a GPU run
would recompile, under the `fail_on_recompile` stance (a recompile raises)."""
from __future__ import annotations

import pytest
import torch

from avatar_engine import EngineConfig, GenerationRequest, SpeedOptions
from avatar_engine.model.adapters import load_identity_adapter, release_identity_adapter
from avatar_engine.requests import CastCharacter, CastRequest, PercifyRequest
from avatar_engine.runtime import compile as speed
from avatar_engine.runtime import compile_cache
from avatar_engine.runtime.warmup import compiled_graphs, warmup_photo
from test_compile import EMB, compiled_engine, run_and_check

FULL = SpeedOptions(compile=True, compile_backend="eager", batch_buckets=True, compile_scope="full", compile_vae=True)


@pytest.fixture
def fail_on_recompile(monkeypatch):
    monkeypatch.setattr(speed, "SERVING_STANCE", "fail_on_recompile")


@pytest.fixture(scope="module")
def full_engine():
    torch._dynamo.reset()
    return compiled_engine("tiny-sd15", speed=FULL)


@pytest.mark.compile  # ~5 CPU-minutes of whole-UNet tracing: CI's `make test-compile` step
def test_full_scope_mixed_traffic_never_recompiles(fail_on_recompile, full_engine):
    """generate → percify (every identity method) → cast 2/3/4 with and without identity →
    remix → generate on the whole-UNet graph: nothing compiles after warm-up."""
    engine, name = full_engine
    model = engine.load(name)
    assert speed.is_compiled(model.pipe.unet) and speed.is_compiled(model.pipe.vae.decoder)
    assert model.applied["compile"]["scope"] == "full" and model.applied["compile"]["vae"] is True
    run_and_check(engine, name)
    after = compiled_graphs()
    g = dict(model=name, steps=1, identity_method="faceid-plus-v2", score_outputs=False)
    engine.generate([PercifyRequest(prompt="a knight", photos=[warmup_photo()], seed=1, batch_size=2, **g)])
    engine.generate([CastRequest(prompt="on mars", seed=2, characters=[
        CastCharacter(f"p{i}", **(dict(photos=[warmup_photo()]) if i % 2 else {})) for i in range(3)],
        model=name, steps=1, identity_method="faceid-plus-v2")])
    engine.generate(GenerationRequest(prompt="and again", seed=3, model=name, steps=1))
    assert compiled_graphs() == after


@pytest.mark.compile  # ~5 CPU-minutes of whole-UNet tracing: CI's `make test-compile` step
def test_full_scope_adapter_reload_never_recompiles(fail_on_recompile, full_engine):
    """Releasing an identity method and loading it again (new weight tensors in the same
    processors) runs on the graphs of the warm-up: weights are graph inputs, not guards."""
    engine, name = full_engine
    model = engine.load(name)
    after = compiled_graphs()
    for method in ("faceid", "faceid-plus-v2"):
        assert release_identity_adapter(model, method)
        reloaded = load_identity_adapter(model, method, download=False)
        assert reloaded.loaded
        face = dict(photos=[warmup_photo()]) if method == "faceid-plus-v2" else dict(identity_embedding=EMB[0])
        engine.generate([PercifyRequest(prompt="a knight", seed=4, batch_size=3, model=name, steps=1,
                                        identity_method=method, score_outputs=False, **face)])
        engine.generate([CastRequest(prompt="on mars", seed=5, model=name, steps=1, identity_method=method,
                                     characters=[CastCharacter("a", **face), CastCharacter("b")])])
    assert compiled_graphs() == after


def test_inductor_options_are_per_compile_and_globals_are_restored():
    """The mode and flags reach inductor as per-compile options (never the global config), and
    whatever a compile sets globally is undone when the engine's compile scope ends, errors too."""
    import torch._inductor.config as inductor_config

    opts = SpeedOptions(compile=True, compile_mode="max-autotune", cuda_graphs=False)
    kwargs = speed.compile_options(opts)
    assert "mode" not in kwargs and kwargs["fullgraph"] is True
    assert kwargs["options"]["max_autotune"] is True and kwargs["options"]["triton.cudagraphs"] is False
    assert kwargs["options"]["conv_1x1_as_mm"] is True  # diffusion-fast's flags with max-autotune
    graphs = speed.compile_options(SpeedOptions(compile=True, compile_mode="reduce-overhead", cuda_graphs=True))
    assert graphs["options"] == {"triton.cudagraphs": True}
    assert "options" not in speed.compile_options(SpeedOptions(compile=True, compile_backend="eager"))

    before = (inductor_config.triton.cudagraphs, inductor_config.conv_1x1_as_mm, inductor_config.epilogue_fusion)
    with pytest.raises(RuntimeError):
        with speed.scoped_inductor_config() as config:
            config.triton.cudagraphs = not before[0]
            config.conv_1x1_as_mm = not before[1]
            config.epilogue_fusion = not before[2]
            raise RuntimeError("a compile failed")
    assert (inductor_config.triton.cudagraphs, inductor_config.conv_1x1_as_mm, inductor_config.epilogue_fusion) == before


def test_cuda_graph_outputs_are_copied_out_and_only_on_cuda():
    """A replay overwrites the static output buffers: the wrapper returns copies, so an earlier
    output survives the next call. CUDA graphs are never set up off CUDA or without inductor."""
    static = torch.zeros(2, 3)

    def replay(x):  # what a CUDA-graph replay does: write into the same output buffer
        static.copy_(x)
        return (static, {"sample": static})

    module = torch.nn.Identity()
    module._compiled_call_impl = replay
    speed.copy_outputs_out(module)
    first = module(torch.ones(2, 3))
    second = module(torch.full((2, 3), 2.0))
    assert first[0].eq(1).all() and first[1]["sample"].eq(1).all() and second[0].eq(2).all()
    assert first[0].data_ptr() != static.data_ptr()
    speed.copy_outputs_out(module)  # idempotent: not wrapped twice
    assert getattr(module._compiled_call_impl, "copies_outputs", False)

    opts = SpeedOptions(compile=True, cuda_graphs=True)
    assert not speed.cuda_graphs_on(opts, torch.device("cpu"))
    assert speed.cuda_graphs_on(opts, torch.device("cuda"))
    assert not speed.cuda_graphs_on(SpeedOptions(compile=True, cuda_graphs=True, compile_backend="eager"),
                                    torch.device("cuda"))


def test_warmup_report_times_each_variant_and_the_cache_dir_is_used(tmp_path):
    """The warm-up report (shown by /v1/health) lists each variant's seconds, graphs and cache
    hits; with a compile cache directory the load and save are reported (the eager backend
    generates no code, so nothing is saved)."""
    torch._dynamo.reset()
    options = SpeedOptions(compile=True, compile_backend="eager", batch_buckets=True)
    engine, name = compiled_engine("tiny-sd15", max_batch=2, speed=options)
    engine.config = EngineConfig(device="cpu", default_model=name, compile_cache_dir=str(tmp_path))
    model = engine.load(name)
    report = model.warmup
    assert len(report["variants"]) == report["calls"]
    assert sum(v["graphs"] for v in report["variants"]) == report["graphs"] > 0
    assert {"variant", "seconds", "graphs", "cacheHits", "cacheMisses"} <= set(report["variants"][0])
    assert report["variants"][-1]["variant"] == "remix"
    assert report["compileCache"]["load"]["loaded"] is False
    assert report["compileCache"]["save"]["saved"] is False
    assert engine.describe_models()[name]["warmup"]["variants"] == report["variants"]


def test_compile_cache_key_follows_the_options():
    from avatar_engine import load_profiles
    import dataclasses

    profile = load_profiles()["tiny-sd15"]
    cpu = torch.device("cpu")
    key = compile_cache.cache_key(profile, cpu, torch.float32)
    assert key == compile_cache.cache_key(profile, cpu, torch.float32)
    other = dataclasses.replace(profile, speed=dataclasses.replace(profile.speed, compile_scope="full"))
    assert compile_cache.cache_key(other, cpu, torch.float32) != key
    assert compile_cache.cache_key(profile, cpu, torch.bfloat16) != key


def test_saved_artifacts_make_a_fresh_process_cache_hit(tmp_path, monkeypatch):
    """Inductor on CPU: compile, save the artifacts, then with an empty local cache and reset
    dynamo (a restarted replica on a clean machine) load them: the recompile is a cache hit."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "first"))
    torch._dynamo.reset()
    torch.compiler.reset()

    def f(x):
        return torch.nn.functional.silu(x * 3 + 1).sum(-1)

    x = torch.randn(4, 8)
    expected = f(x)
    assert torch.allclose(torch.compile(f, backend="inductor")(x), expected)
    path = tmp_path / "blob.bin"
    saved = compile_cache.save_artifacts(path)
    assert saved["saved"] and path.stat().st_size == saved["bytes"] > 0
    assert saved["artifacts"].get("inductor", 0) >= 1

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "second"))  # a clean machine's cache
    torch._dynamo.reset()
    loaded = compile_cache.load_artifacts(path)
    assert loaded["loaded"] is True
    hits = counters["inductor"]["fxgraph_cache_hit"]
    assert torch.allclose(torch.compile(f, backend="inductor")(x), expected)
    assert counters["inductor"]["fxgraph_cache_hit"] == hits + 1

    broken = tmp_path / "broken.bin"
    broken.write_bytes(b"not a cache")
    assert compile_cache.load_artifacts(broken)["loaded"] is False  # logged, compiled instead
    assert compile_cache.load_artifacts(tmp_path / "missing.bin")["loaded"] is False
