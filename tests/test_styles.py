"""Style packs with LoRAs: many different LoRAs in one UNet call, each image its own.

The LoRAs are tiny ones of the real layouts written by the tests (kohya and diffusers/PEFT
files, read back through diffusers' conversion code), on the tiny SD1.5/SDXL architectures."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from avatar_engine import AvatarEngine, EngineConfig, GenerationRequest, load_profiles
from avatar_engine.errors import ProfileError, RequestValidationError
from avatar_engine.model.styles import read_lora, tiny_layers, write_kohya, write_peft
from avatar_engine.protocol import result_to_wire
from avatar_engine.requests import CastCharacter, CastRequest, PercifyRequest
from avatar_engine.runtime.loading import load_pipeline
from avatar_engine.styles import StylePack, parse_styles

RNG = np.random.default_rng(3)
EMB = [RNG.standard_normal(512).astype(np.float32) for _ in range(2)]


def px(image) -> np.ndarray:
    return np.asarray(image, np.int16)


def max_diff(a, b) -> int:
    return int(np.abs(px(a) - px(b)).max())


def engine_with(styles: dict, base: str = "tiny-sd15", name: str = "styled", **overrides) -> AvatarEngine:
    """An engine whose profile `name` is `base` with `styles` (models.yaml syntax) instead of its own LoRA styles."""
    profiles = load_profiles()
    own = {k: v for k, v in profiles[base].styles.items() if v.lora is None}
    profiles[name] = dataclasses.replace(profiles[base], name=name, aliases=[],
                                         styles={**own, **parse_styles(styles, "test")}, **overrides)
    return AvatarEngine(EngineConfig(device="cpu", default_model=name), profiles=profiles)


def req(style=None, strength=None, seed=1, steps=3, **kw) -> GenerationRequest:
    return GenerationRequest(prompt="portrait of a sailor", style_preset=style, style_strength=strength, seed=seed,
                             steps=steps, **kw)


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    """The same tiny LoRA weights (SD1.5 layers, UNet + text encoder) in the kohya and PEFT layouts."""
    pipe = load_pipeline(load_profiles()["tiny-sd15"], torch.device("cpu"), torch.float32)
    root = tmp_path_factory.mktemp("loras")
    layers = tiny_layers(pipe, rank=4, seed=5)
    other = tiny_layers(pipe, rank=8, seed=6)
    return {"kohya": str(write_kohya(layers, root / "a_kohya.safetensors")),
            "peft": str(write_peft(layers, root / "a_peft.safetensors")),
            "other": str(write_kohya(other, root / "b_kohya.safetensors")), "root": root, "pipe": pipe}


# ---- the embedded default's styles -------------------------------------------------------------

def test_embedded_default_offers_lora_styles_and_reports_them(tiny_engine):
    model = tiny_engine.load()
    assert {"pixel-art", "watercolor", "professional", "anime"} <= set(model.profile.styles)
    stacked = model.applied["style_loras"]
    assert stacked["mode"] == "stacked" and stacked["adapters"] == ["pixel-art-tiny", "watercolor-tiny"]
    assert stacked["layers"]["unet"] > 0 and stacked["layers"]["text_encoder"] > 0
    assert stacked["bytesPerLoRA"] > 0 and stacked["bytes"] >= 2 * stacked["bytesPerLoRA"]
    for style in model.profile.styles:
        res = tiny_engine.generate(req(style, steps=2))
        wire = result_to_wire(res)
        assert wire["style"]["name"] == style and wire["stylePreset"] == style
        pack = model.profile.styles[style]
        if pack.lora is None:
            assert wire["style"]["lora"] is None
        else:
            assert wire["style"]["lora"]["name"] == pack.lora_name and wire["style"]["lora"]["mode"] == "stacked"
            assert wire["styleStrength"] == 1.0


def test_mixed_styles_in_one_call_equal_each_image_alone(tiny_engine):
    styles = ["pixel-art", "watercolor", None, "pixel-art"]
    strengths = [1.0, 0.5, None, 1.7]
    batch = [req(s, k, seed=10 + i, steps=3, guidance_scale=7.0) for i, (s, k) in enumerate(zip(styles, strengths))]
    mixed = tiny_engine.generate(batch)
    assert all(r.extra["batchImages"] == [4] for r in mixed)  # one UNet call for all four styles
    for r, one in zip(mixed, batch):
        alone = tiny_engine.generate(one)
        assert alone.extra["batchImages"] == [1]
        assert max_diff(r.images[0], alone.images[0]) <= 2
    # the LoRA really acts, and more strength acts more
    plain = tiny_engine.generate(req("pixel-art", 0.0, seed=10, steps=3, guidance_scale=7.0)).images[0]
    d1 = np.abs(px(mixed[0].images[0]) - px(plain)).mean()
    d2 = np.abs(px(tiny_engine.generate(req("pixel-art", 2.0, seed=10, steps=3, guidance_scale=7.0)).images[0])
                - px(plain)).mean()
    assert d1 > 1.0 and d2 > d1


def test_strength_zero_equals_the_base_pipeline_exactly(tiny_engine):
    """A LoRA style at strength 0 adds exactly nothing: same pixels as its template alone, also
    when it shares the call with a styled image."""
    model = tiny_engine.load()
    pack = model.profile.styles["pixel-art"]
    twin = engine_with({"pixel-art": {"template": pack.template, "negative": pack.negative}})
    base = twin.generate(req("pixel-art", seed=4)).images[0]
    assert max_diff(tiny_engine.generate(req("pixel-art", 0.0, seed=4)).images[0], base) == 0
    both = tiny_engine.generate([req("pixel-art", 0.0, seed=4), req("watercolor", 1.0, seed=5, guidance_scale=7.0)])
    assert both[0].extra["batchImages"] == [2]
    base_pair = twin.generate([req("pixel-art", seed=4), req("pixel-art", seed=5)])  # same call size: same kernels
    assert max_diff(both[0].images[0], base_pair[0].images[0]) == 0


# ---- file layouts ----------------------------------------------------------------------------

def test_kohya_and_peft_files_of_the_same_weights_give_the_same_pixels(lora_files):
    k = read_lora(type(lora_files["pipe"]), lora_files["kohya"], "a")
    p = read_lora(type(lora_files["pipe"]), lora_files["peft"], "a")
    assert k.parts == p.parts == ["unet", "text_encoder"]
    assert set(k.layers["unet"]) == set(p.layers["unet"]) and len(k.layers["unet"]) > 20
    images = []
    for layout in ("kohya", "peft"):
        engine = engine_with({"a": {"template": "{prompt}", "lora": {"path": lora_files[layout]}}}, name=f"s-{layout}")
        images.append(engine.generate(req("a", seed=7)).images[0])
    assert max_diff(*images) <= 1


def test_fused_and_stacked_paths_agree(lora_files):
    styles = {"a": {"template": "{prompt}, detailed", "lora": {"path": lora_files["kohya"]}, "scale": 0.9}}
    stacked = engine_with(styles, name="stacked").generate(req("a", seed=8)).images[0]
    fused_engine = engine_with(styles, name="fused", fuse_style="a")
    fused = fused_engine.generate(req("a", seed=8))
    assert fused.extra["style"]["lora"]["mode"] == "fused"
    assert fused_engine.load("fused").applied["style_loras"]["mode"] == "fused"
    assert max_diff(stacked, fused.images[0]) <= 2
    with pytest.raises(RequestValidationError) as err:  # the merged LoRA's strength is fixed
        fused_engine.generate(req("a", 0.5))
    assert err.value.param == "styleStrength"


def test_fuse_style_serves_one_lora_only(lora_files):
    styles = {"a": {"lora": {"path": lora_files["kohya"]}}, "b": {"lora": {"path": lora_files["other"]}}}
    with pytest.raises(ProfileError, match="fuse_style"):
        engine_with(styles, fuse_style="a")
    with pytest.raises(ProfileError, match="fuse_style"):
        engine_with({"t": {"template": "{prompt}"}}, fuse_style="t")


def test_lora_with_convolution_layers_is_refused_naming_the_file(lora_files):
    from safetensors.torch import load_file, save_file

    state = load_file(lora_files["kohya"])
    key = "lora_unet_down_blocks_0_resnets_0_conv1"
    conv = lora_files["pipe"].unet.down_blocks[0].resnets[0].conv1
    state[f"{key}.lora_down.weight"] = torch.randn(4, conv.in_channels, 3, 3)
    state[f"{key}.lora_up.weight"] = torch.randn(conv.out_channels, 4, 1, 1)
    state[f"{key}.alpha"] = torch.tensor(4.0)
    path = lora_files["root"] / "locon.safetensors"
    save_file(state, str(path))
    with pytest.raises(ProfileError) as err:
        engine_with({"c": {"lora": {"path": str(path)}}}).load()
    assert "locon.safetensors" in err.value.message and "LoCon" in err.value.message


def test_pickled_and_missing_files_are_refused(lora_files, tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ProfileError, match=r"x\.bin.*only \.safetensors"):
        engine_with({"c": {"lora": {"path": str(tmp_path / "x.bin")}}}).load()
    with pytest.raises(ProfileError, match="not found"):
        engine_with({"c": {"lora": {"path": str(tmp_path / "none.safetensors")}}}).load()


def test_a_lora_for_another_architecture_is_refused(tmp_path):
    sdxl = load_pipeline(load_profiles()["tiny-sdxl"], torch.device("cpu"), torch.float32)
    path = write_kohya(tiny_layers(sdxl, rank=2, seed=1, text_encoder=False), tmp_path / "xl.safetensors", sdxl=True)
    with pytest.raises(ProfileError, match="xl.safetensors"):
        engine_with({"x": {"lora": {"path": str(path)}}}).load()


# ---- requests ----------------------------------------------------------------------------------

def test_unknown_style_and_bad_strength_are_refused(tiny_engine):
    with pytest.raises(RequestValidationError) as err:
        tiny_engine.generate(req("vaporwave"))
    assert err.value.param == "stylePreset"
    assert "pixel-art" in err.value.message and "professional" in err.value.message
    for bad in (-0.1, 2.5, float("nan"), True):
        with pytest.raises(RequestValidationError) as err:
            tiny_engine.generate(req("pixel-art", bad))
        assert err.value.param == "styleStrength"
    with pytest.raises(RequestValidationError):
        tiny_engine.generate(req("../etc/passwd"))


def test_style_recommendations_fill_what_the_request_leaves_open(tiny_engine):
    profile = tiny_engine.profile(None)
    r = GenerationRequest(prompt="x", style_preset="watercolor").resolve(profile)
    assert (r.steps, r.guidance_scale, r.style_strength) == (16, 6.0, 1.0)
    r = GenerationRequest(prompt="x", style_preset="watercolor", steps=5, guidance_scale=3.0).resolve(profile)
    assert (r.steps, r.guidance_scale) == (5, 3.0)
    assert GenerationRequest(prompt="x", style_preset="anime").resolve(profile).style_strength is None


def test_models_yaml_style_packs_are_validated():
    with pytest.raises(ProfileError, match="unknown key"):
        parse_styles({"a": {"templat": "{prompt}"}}, "t")
    with pytest.raises(ProfileError, match="prompt"):
        parse_styles({"a": {"template": "no placeholder"}}, "t")
    with pytest.raises(ProfileError, match="lora"):
        parse_styles({"a": {"lora": {}}}, "t")
    with pytest.raises(ProfileError, match="style name"):
        StylePack("Bad Name")
    assert StylePack("a", lora=parse_styles({"a": {"lora": "/m/x.safetensors"}}, "t")["a"].lora).describe()["lora"] \
        == {"name": "x", "scale": 1.0}


# ---- with identity and regions ---------------------------------------------------------------

def test_percify_with_mixed_styles_in_one_call(tiny_engine):
    g = dict(steps=2, score_outputs=False)
    reqs = [PercifyRequest(prompt="a knight", identity_embedding=EMB[0], style_preset=s, seed=20 + i, guidance_scale=7.0, **g)
            for i, s in enumerate(["pixel-art", None, "watercolor"])]
    mixed = tiny_engine.generate(reqs)
    assert mixed[0].extra["batchImages"] == [3]
    for r, one in zip(mixed, reqs):
        assert max_diff(r.images[0], tiny_engine.generate(one).images[0]) <= 2


def test_cast_takes_one_style_per_image(tiny_engine):
    chars = [CastCharacter("a pirate", identity_embedding=EMB[0]), CastCharacter("a parrot")]
    reqs = [CastRequest(prompt="on a ship", characters=chars, style_preset=s, seed=30 + i, steps=2, guidance_scale=7.0)
            for i, s in enumerate(["pixel-art", "watercolor"])]
    mixed = tiny_engine.generate(reqs)
    assert mixed[0].extra["batchImages"] == [2] and mixed[1].extra["style"]["lora"]["name"] == "watercolor-tiny"
    for r, one in zip(mixed, reqs):
        assert max_diff(r.images[0], tiny_engine.generate(one).images[0]) <= 2


def test_sdxl_mixed_styles_equal_alone():
    engine = AvatarEngine(EngineConfig(device="cpu", default_model="tiny-sdxl"))
    batch = [req("pixel-art", seed=1), req(None, seed=2), req("pixel-art", 0.4, seed=3)]
    mixed = engine.generate(batch)
    assert engine.load().applied["style_loras"]["layers"].get("text_encoder_2", 0) > 0
    for r, one in zip(mixed, batch):
        assert max_diff(r.images[0], engine.generate(one).images[0]) <= 2


def test_hub_style_loras_are_pulled_and_read_from_the_hub_cache_only(tmp_path, monkeypatch):
    """`models pull` plans each hub style LoRA's one file; loading never downloads: a LoRA not in
    the local hub cache is refused naming the command that fetches it."""
    from avatar_engine.runtime.hub import pull_plan

    profiles = load_profiles()
    styles = parse_styles({"pix": {"lora": {"repo_id": "someone/pixel-lora", "weight_name": "pix.safetensors"}},
                           "ink": {"lora": {"path": "/models/ink.safetensors"}}}, "t")
    sd15 = dataclasses.replace(profiles["sd15"], styles={**profiles["sd15"].styles, **styles})
    plan = pull_plan(sd15)
    assert {i.repo_id: set(i.patterns) for i in plan.hub}["someone/pixel-lora"] == {"pix.safetensors"}
    assert "/models/ink.safetensors" in plan.local
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    engine = engine_with({"pix": {"lora": {"repo_id": "someone/pixel-lora", "weight_name": "pix.safetensors"}}})
    with pytest.raises(ProfileError, match="models pull"):
        engine.load()


def test_styles_survive_fused_projections_and_fp8_slices(tiny_engine, monkeypatch):
    """With fused q/k/v and FP8 (its fused layers quantized, the q/k/v views replaced by slices
    of them) the attention LoRAs live in the processors and still apply. torchao's FP8 needs an
    SM 8.9+ GPU: a stand-in quantizer (a fresh weight tensor per selected Linear, as torchao swaps
    it) runs the same selection and rewiring here."""
    from avatar_engine.runtime import optimize

    def stand_in(module, keep):
        for fqn, layer in module.named_modules():
            if isinstance(layer, torch.nn.Linear) and keep(layer, fqn):
                layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)

    monkeypatch.setattr(optimize, "quantize_fp8", lambda unet, device, name: optimize.quantize_linears(unet, stand_in))
    base = load_profiles()["tiny-sd15"]
    fast = engine_with({k: v for k, v in base.styles.items() if v.lora is not None}, name="fused-fp8",
                       speed=dataclasses.replace(base.speed, fuse_qkv=True, fp8=True))
    model = fast.load()
    assert model.applied["fuse_qkv"] is True
    assert any(isinstance(m, optimize.FusedSlice) for m in model.pipe.unet.modules())
    batch = [req("pixel-art", seed=1, guidance_scale=7.0), req("watercolor", 1.3, seed=2, guidance_scale=7.0), req(seed=3)]
    for got, want in zip(fast.generate(batch), tiny_engine.generate(batch)):
        assert max_diff(got.images[0], want.images[0]) <= 2
