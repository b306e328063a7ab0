"""`single_file:` profiles: a checkpoint in the original Stable Diffusion (LDM) layout, written by
the test from the tiny pipeline, loads through diffusers' from_single_file with a local config
folder (offline) and generates the same pixels as its diffusers-layout twin."""
from __future__ import annotations

import numpy as np
import pytest
from safetensors.torch import save_file

from avatar_engine import AvatarEngine, EngineConfig, GenerationRequest, ModelProfile, SpeedOptions
from avatar_engine.errors import ProfileError
from avatar_engine.hub import pull_plan
from avatar_engine.tiny import tiny_pipeline_dir

from ldm_layout import pipeline_to_ldm


def _profile(name, architecture, **source):
    return ModelProfile(name=name, architecture=architecture, scheduler="euler", resolution=64, size_multiple=16,
                        steps=4, guidance_scale=5.0, speed=SpeedOptions(warmup=False), **source)


def _twin_folder(architecture: str, tmp_path):
    """The tiny pipeline's folder. For SDXL, a copy whose two text encoders differ in width (16
    and 48; cross-attention still sees 64): diffusers tells SDXL's CLIP-L from its OpenCLIP
    encoder in a checkpoint by width (768 vs 1280), and the tiny pipeline's are both 32 wide."""
    folder = tiny_pipeline_dir(architecture)
    if architecture == "sd15":
        return folder
    import torch
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def config(hidden: int) -> CLIPTextConfig:
        return CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=hidden,
                              intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
                              max_position_embeddings=77, projection_dim=32, hidden_act="gelu")

    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder))
    torch.manual_seed(11)
    pipe.text_encoder = CLIPTextModel(config(16))
    pipe.text_encoder_2 = CLIPTextModelWithProjection(config(48))
    twin = tmp_path / "twin-sdxl"
    pipe.save_pretrained(str(twin), safe_serialization=True)
    return twin


def _realign(pipe) -> None:
    """Copy every weight into freshly allocated memory. Weights memory-mapped from a safetensors
    file can start at any byte offset, and on CPU a Linear over a weight 40 bytes off a 64-byte
    boundary rounds differently (1 ulp: measured on the SDXL twin's text_projection, with
    bitwise-equal weights) from an aligned one; equal pixels need equal kernels on both sides."""
    import torch

    with torch.no_grad():
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            module = getattr(pipe, name, None)
            for param in (module.parameters() if module is not None else ()):
                param.data = param.data.clone()


@pytest.mark.parametrize("architecture", ["sd15", "sdxl"])
def test_a_single_file_checkpoint_generates_the_same_pixels_as_its_diffusers_twin(tmp_path, architecture):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = _twin_folder(architecture, tmp_path)
    cls = StableDiffusionXLPipeline if architecture == "sdxl" else StableDiffusionPipeline
    ldm = pipeline_to_ldm(cls.from_pretrained(str(folder)))
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in ldm)
    ckpt = tmp_path / f"community-{architecture}.safetensors"
    save_file(ldm, str(ckpt))
    profiles = {"single": _profile("single", architecture, single_file=str(ckpt), single_file_config=str(folder)),
                "twin": _profile("twin", architecture, local_path=str(folder))}
    engine = AvatarEngine(EngineConfig(device="cpu", default_model="twin"), profiles=profiles)
    images = {}
    for name in profiles:
        _realign(engine.load(name).pipe)
        result = engine.generate(GenerationRequest(prompt="a portrait of a fox", model=name, seed=7, batch_size=2))
        images[name] = np.stack([np.asarray(im) for im in result.images])
    assert images["single"].shape == (2, 64, 64, 3)
    assert images["single"].std() > 0
    np.testing.assert_array_equal(images["single"], images["twin"])


def test_single_file_errors_and_plan(tmp_path):
    with pytest.raises(ProfileError, match="single_file_config"):
        _profile("x", "sd15", single_file=str(tmp_path / "m.safetensors"))
    missing = _profile("x", "sd15", single_file=str(tmp_path / "m.safetensors"), single_file_config=str(tmp_path))
    engine = AvatarEngine(EngineConfig(device="cpu", default_model="x"), profiles={"x": missing})
    with pytest.raises(ProfileError, match="does not exist"):
        engine.load("x")
    (tmp_path / "m.safetensors").write_bytes(b"")
    with pytest.raises(ProfileError, match="model_index.json"):
        engine.load("x")
    hub_cfg = _profile("y", "sdxl", single_file=str(tmp_path / "m.safetensors"),
                       single_file_config="stabilityai/stable-diffusion-xl-base-1.0")
    with pytest.raises(ProfileError, match="models pull y"):
        AvatarEngine(EngineConfig(device="cpu", default_model="y"), profiles={"y": hub_cfg}).load("y")
    plan = pull_plan(hub_cfg)
    assert plan.local == [str(tmp_path / "m.safetensors")]
    [item] = plan.hub
    assert "unet/config.json" in item.patterns and not any(p.endswith(".safetensors") for p in item.patterns)
