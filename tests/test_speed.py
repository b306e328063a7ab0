"""Speed options: what is reported is what runs, the memory arithmetic, and each option's
effect on output (none, exactly none, or measured)."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from avatar_engine import AvatarEngine, EngineConfig, GenerationRequest, ProfileError, SpeedOptions, load_profiles
from avatar_engine.model.attention import AvatarAttnProcessor
from avatar_engine.requests import PercifyRequest
from avatar_engine.runtime.memory import (MemoryProfile, available_for_work, fit_line, images_that_fit, round_to_bucket)
from avatar_engine.runtime.scheduler import batch_buckets, bucket_for

EMB = np.random.default_rng(3).standard_normal(512).astype(np.float32)


def engine_with(**speed) -> tuple[AvatarEngine, str]:
    profiles = load_profiles()
    profiles["custom"] = dataclasses.replace(profiles["tiny-sd15"], name="custom", speed=SpeedOptions(**speed))
    return AvatarEngine(EngineConfig(device="cpu", default_model="custom"), profiles=profiles), "custom"


def px(img) -> np.ndarray:
    return np.asarray(img).astype(np.int16)


# ---- kernels as reported -----------------------------------------------------------------------

def test_fused_projections_are_reported_used_and_not_duplicated(tiny_engine):
    engine, name = engine_with(fuse_qkv=True)
    model = engine.load(name)
    applied = model.applied
    assert applied["fuse_qkv"] is True and applied["attention"] == "sdpa"
    assert applied["ip_adapter"]["lora_rank"] == 4  # the adapter did not undo the fusion
    for attn in (m for m in model.pipe.unet.modules() if hasattr(m, "to_qkv")):
        # the separate projections are views of the fused weight: nothing allocated twice
        assert attn.to_q.weight.data_ptr() == attn.to_qkv.weight.data_ptr()
    vae_attn = next(m for m in model.pipe.vae.modules() if hasattr(m, "to_qkv"))
    assert vae_attn.fused_projections
    req = dict(identity_embedding=EMB, seed=4, steps=3, score_outputs=False)
    fused = engine.generate(PercifyRequest(prompt="a knight", model=name, **req))
    plain = tiny_engine.generate(PercifyRequest(prompt="a knight", **req))
    assert np.abs(px(fused.images[0]) - px(plain.images[0])).max() <= 2  # same maths, other summation order
    assert engine.load(name).applied == applied  # unchanged after identity requests


def test_every_attention_layer_runs_the_reported_kernel(tiny_engine):
    model = tiny_engine.load()
    for module in (model.pipe.unet, model.pipe.vae):
        assert all(isinstance(p, AvatarAttnProcessor) and p.kernel == "sdpa" for p in module.attn_processors.values())
    assert tiny_engine.load().applied["attention"] == "sdpa"


@pytest.mark.parametrize("speed,param", [
    (dict(attention="flash3"), "speed.attention"),
    (dict(compile_mode="turbo"), "speed.compile_mode"),
    (dict(step_cache_interval=0), "speed.step_cache_interval"),
    (dict(preview="vae"), "speed.preview"),
])
def test_invalid_speed_options_name_the_option(speed, param):
    with pytest.raises(ProfileError) as err:
        SpeedOptions(**speed)
    assert err.value.param == param


def test_unavailable_kernels_fail_at_load_with_the_fix():
    engine, name = engine_with(attention="xformers")
    with pytest.raises(ProfileError, match="xformers is not installed"):
        engine.load(name)
    engine, name = engine_with(fp8=True)
    with pytest.raises(ProfileError, match="compute capability 8.9"):
        engine.load(name)


# ---- memory-aware batching -----------------------------------------------------------------------

def test_available_memory_counts_the_allocators_free_cache():
    gb = 1 << 30
    # mem_get_info says 10 GB free; PyTorch holds 30 GB of which 12 GB are live tensors
    assert available_for_work(free=10 * gb, reserved=30 * gb, allocated=12 * gb) == 28 * gb
    assert available_for_work(free=10 * gb, reserved=5 * gb, allocated=5 * gb) == 10 * gb


def test_images_that_fit_from_probe_figures():
    gb = 1e9
    fixed, per = fit_line({1: 1.5 * gb, 4: 3.0 * gb})  # probe: 1 image 1.5 GB, 4 images 3.0 GB
    assert (round(fixed / gb, 3), round(per / gb, 3)) == (1.0, 0.5)
    prof = MemoryProfile(fixed_bytes=fixed, per_image_bytes=per, probe_pixels=512 * 512,
                         regional_per_image_bytes=0.8 * gb, budget_bytes=10 * gb)
    assert images_that_fit(prof, 512 * 512) == 15  # (10·0.85 - 1.0) / 0.5
    assert images_that_fit(prof, 512 * 512, regional=True) == 9  # cast: 0.8 GB per image
    assert images_that_fit(prof, 1024 * 1024) == 2  # 4x pixels: 4x per image and fixed
    assert images_that_fit(dataclasses.replace(prof, budget_bytes=0.1 * gb), 512 * 512) == 1  # never 0
    assert round_to_bucket(15) == 8 and round_to_bucket(9) == 8 and round_to_bucket(1) == 1


def test_batch_buckets():
    assert batch_buckets(16) == [1, 2, 4, 8, 16] and batch_buckets(6) == [1, 2, 4, 6]
    assert [bucket_for(n, 16) for n in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    assert bucket_for(5, 6) == 6


def test_padding_to_a_bucket_leaves_the_real_images_unchanged(tiny_engine):
    engine, name = engine_with(batch_buckets=True)
    model = engine.load(name)
    assert model.buckets == [1, 2, 4, 8, 16]
    reqs = [GenerationRequest(prompt="a chef", seed=s, steps=3, model=name) for s in (1, 2, 3)]  # 3 → bucket 4
    padded = engine.generate(reqs)
    assert padded[0].extra["batchImages"] == [3]
    for req, res in zip(reqs, padded):
        alone = tiny_engine.generate(dataclasses.replace(req, model=None))
        assert np.abs(px(res.images[0]) - px(alone.images[0])).max() <= 2


# ---- prompt cache, step cache, previews ----------------------------------------------------------

def test_prompt_cache_encodes_each_text_once_and_changes_nothing(tiny_engine):
    engine, name = engine_with(prompt_cache=64)
    prompts = engine.load(name).prompts
    req = GenerationRequest(prompt="a pilot", seed=9, steps=3, style_preset="anime", model=name)
    first = engine.generate(req)
    misses = prompts.misses
    again = engine.generate([req, dataclasses.replace(req, seed=10)])
    assert prompts.misses == misses and prompts.hits >= 4  # positive + negative, twice, all cached
    assert np.abs(px(first.images[0]) - px(again[0].images[0])).max() <= 2  # batched vs alone
    off, off_name = engine_with(prompt_cache=0)
    assert np.array_equal(px(off.generate(dataclasses.replace(req, model=off_name)).images[0]), px(first.images[0]))


def test_step_cache_reuses_deep_features_exactly_and_is_off_at_interval_one(tiny_engine):
    """A cached step given the same inputs as the full step before it returns the same output
    (the skip connections are wired as in the full UNet); interval 1 is the plain UNet."""
    engine, name = engine_with(step_cache_interval=2)
    unet = engine.load(name).pipe.unet
    from avatar_engine.model.stepcache import step_cache

    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([500, 500])
    with torch.inference_mode(), step_cache(unet) as state:
        full = unet(sample, t, text).sample
        cached = unet(sample, t, text).sample
    assert state.full_steps >= 1 and state.cached_steps >= 1
    assert torch.allclose(full, cached, atol=1e-5)
    with torch.inference_mode():
        assert torch.equal(unet(sample, t, text).sample, tiny_engine.load().pipe.unet(sample, t, text).sample)
    req = GenerationRequest(prompt="a knight", seed=3, steps=12)
    cached_img = engine.generate(dataclasses.replace(req, model=name)).images[0]
    plain_img = tiny_engine.generate(req).images[0]
    assert np.abs(px(cached_img) - px(plain_img)).max() > 0  # it is an approximation, and says so


def test_previews_arrive_every_n_steps():
    engine, name = engine_with(preview="taesd", preview_every=2)
    seen = []
    engine.generate([GenerationRequest(prompt="a chef", seed=1, steps=4, batch_size=2, model=name)],
                    preview=lambda ri, ii, step, img: seen.append((ri, ii, step, img.size)))
    assert sorted(seen) == [(0, i, s, (64, 64)) for i in (0, 1) for s in (2, 4)]


# ---- the GPU suite's CPU smoke run -----------------------------------------------------------------

def test_gpu_suite_smoke(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import gpu_suite

    report = gpu_suite.main(["--smoke", "--repeats", "1", "--out", str(tmp_path / "suite")])
    cases = {(r["case"], r["batch"]) for r in report["rows"]}
    assert ("tiny-sd15 generate", 2) in cases and ("tiny-sd15 cast (2 characters)", 2) in cases
    assert ("tiny-sdxl generate", 2) in cases and not report["skipped"]
    assert not [r for r in report["rows"] if r.get("error")]
    plain = [r for r in report["rows"] if r["case"].startswith("plain diffusers")]
    engine_rows = [r for r in report["rows"] if r not in plain]
    # the plain-diffusers baseline in the same run, from its own processes, each batch of each generate case
    assert {(r["case"], r["batch"]) for r in plain} == {
        (f"plain diffusers {v}: {c}", b) for v in ("eager", "compiled")
        for c, bs in (("tiny-sd15 generate", (1, 2)),) for b in bs}
    assert all(r["images_per_s"] > 0 for r in plain)
    assert all(r["images_per_s"] > 0 and r["tflop_per_image"] > 0 for r in engine_rows)
    for r in engine_rows:  # engine/plain ratios beside the absolute numbers of generate rows
        base = {p["case"].split(": ")[0]: p["images_per_s"] for p in plain
                if p["case"].endswith(r["case"]) and p["batch"] == r["batch"]}
        if base:
            assert r["vs_plain_eager"] == round(r["images_per_s"] / base["plain diffusers eager"], 3)
            assert r["vs_plain_compiled"] == round(r["images_per_s"] / base["plain diffusers compiled"], 3)
    assert sum("vs_plain_eager" in r for r in engine_rows) == 2
    text = (tmp_path / "suite.md").read_text()
    assert "| case | batch | images/s | vs plain eager |" in text and "plain diffusers compiled" in text


def test_gpu_suite_runs_a_chosen_subset(tmp_path):
    """`--only` / `--ablations` pick cases and options by parts of their names (short leases)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import gpu_suite

    report = gpu_suite.main(["--smoke", "--repeats", "1", "--only", "percify from a photo, SDXL", "--plain", "",
                             "--out", str(tmp_path / "suite")])
    assert {r["case"] for r in report["rows"]} == {"tiny-sd15 percify from a photo", "tiny-sdxl generate"}
    picked = gpu_suite.select(gpu_suite.ABLATIONS, "blocks, full unet", lambda a: a[0])
    assert [name for name, _ in picked] == ["compile ResNet blocks too (scope blocks)",
                                            "full UNet, static shapes, channels_last"]
    assert gpu_suite.select(gpu_suite.ABLATIONS, "", lambda a: a[0]) == gpu_suite.ABLATIONS


def test_gpu_suite_states_what_an_approximate_option_costs_in_pixels(tmp_path):
    """With --images-dir every engine row keeps its images (same seeds), and the report gives each
    configuration's PSNR against the exact one of the same case and batch: here step caching
    (interval 3 over 4 steps: one cached step) against the default."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import gpu_suite
    import quality

    case = gpu_suite.SMOKE[0]
    gpu_suite.SMOKE[0] = dataclasses.replace(case, steps=4)
    try:
        report = gpu_suite.main(["--smoke", "--repeats", "1", "--only", "tiny-sd15 generate", "--plain", "",
                                 "--configs", "default,full-graphs-stepcache", "--batches", "2",
                                 "--images-dir", str(tmp_path / "images"), "--out", str(tmp_path / "suite")])
    finally:
        gpu_suite.SMOKE[0] = case
    (row,) = report["quality"]
    assert (row["config"], row["vs"], row["batch"], row["images"]) == ("full-graphs-stepcache", "default", 2, 2)
    assert not row["identical"] and 15 < row["psnr_db_min"] <= row["psnr_db_mean"] < 100
    assert "PSNR dB" in (tmp_path / "suite.md").read_text()
    assert quality.compare(tmp_path / "images") == report["quality"]  # the standalone command agrees


def test_psnr_and_the_exact_reference_are_chosen_as_documented(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import quality

    a = np.zeros((8, 8, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255  # one pixel fully off: MSE = 255² / 192
    assert quality.psnr(a, a) == float("inf")
    assert quality.psnr(a, b) == pytest.approx(10 * np.log10(192))
    for config in ("default", "full-graphs", "full-graphs-fp8"):
        quality.save_images(tmp_path, "sd15 generate", config, 8, [a, b if config == "full-graphs-fp8" else a])
    rows = quality.compare(tmp_path)
    assert [(r["config"], r["vs"]) for r in rows] == [("default", "full-graphs"), ("full-graphs-fp8", "full-graphs")]
    assert rows[0]["identical"] and rows[1]["max_abs_diff"] == 255
    assert rows[1]["psnr_db_min"] == pytest.approx(10 * np.log10(192), abs=0.01)


# ---- FP8 on fused projections ----------------------------------------------------------------------

def test_fp8_quantizes_each_fused_projection_once_and_keeps_no_view_copies():
    """With fused q/k/v, FP8 quantizes the fused layer only (not its q/k/v views as separate
    copies), then the views become slices of the quantized layer: no full-precision view of a
    fused weight stays alive, and code calling `to_q` gets the same rows. torchao's FP8 needs an
    SM 8.9+ GPU, so a stand-in quantizer (a fresh weight tensor, as torchao swaps it) checks the
    selection and rewiring here."""
    from diffusers.models.attention_processor import Attention

    from avatar_engine.model.attention import fuse_projections
    from avatar_engine.model.tiny import build_tiny_pipeline
    from avatar_engine.runtime.optimize import FusedSlice, fp8_linear_names, quantize_linears

    unet = build_tiny_pipeline("sd15").unet.eval().requires_grad_(False)
    fuse_projections(unet)
    attns = {n: m for n, m in unet.named_modules() if isinstance(m, Attention)}
    selfs = {n: a for n, a in attns.items() if not a.is_cross_attention}
    xs = {n: torch.randn(2, 5, a.to_qkv.in_features) for n, a in selfs.items()}
    expected = {n: [a.to_q(xs[n]), a.to_k(xs[n]), a.to_v(xs[n])] for n, a in selfs.items()}
    old_storage = {a.to_qkv.weight.untyped_storage().data_ptr() for a in selfs.values()}
    names = fp8_linear_names(unet)
    assert not any(n.endswith((".to_k", ".to_v")) for n in names)
    assert all(f"{n}.to_qkv" in names for n in selfs) and all(f"{n}.to_kv" in names for n in attns if n not in selfs)
    assert all(f"{n}.to_q" in names for n in attns if n not in selfs)  # cross-attention q is its own layer

    quantized = []

    def stand_in(module, keep):  # what torchao's quantize_ does: a new weight tensor per selected Linear
        for fqn, layer in module.named_modules():
            if isinstance(layer, torch.nn.Linear) and keep(layer, fqn):
                layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
                quantized.append(fqn)

    assert quantize_linears(unet, stand_in) == len(names) == len(quantized) == len(set(quantized))
    for n, a in selfs.items():
        assert all(isinstance(getattr(a, p), FusedSlice) for p in ("to_q", "to_k", "to_v"))
        x = xs[n]
        for got, want in zip([a.to_q(x), a.to_k(x), a.to_v(x)], expected[n]):
            assert torch.allclose(got, want)
    live = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    assert not live & old_storage  # the full-precision fused weights are gone
    assert not any(n.endswith((".to_q", ".to_k", ".to_v")) and n.rsplit(".", 1)[0] in selfs
                   for n, _ in unet.named_parameters())
