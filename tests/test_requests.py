"""Request validation names the field; aspect ratios map to the profile's native size."""
import pytest

from avatar_engine import GenerationRequest, RequestValidationError, load_profiles
from avatar_engine.protocol import request_from_dict
from avatar_engine.requests import size_for_aspect_ratio


@pytest.mark.parametrize("kwargs,param", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 2001}, "prompt"),
    ({"prompt": "a", "style_preset": "Vapor Wave!"}, "stylePreset"),  # not a style name (which exist: resolve)
    ({"prompt": "a", "style_preset": 3}, "stylePreset"),
    ({"prompt": "a", "style_strength": 2.01}, "styleStrength"),
    ({"prompt": "a", "style_strength": "1"}, "styleStrength"),
    ({"prompt": "a", "aspect_ratio": "2:1"}, "aspectRatio"),
    ({"prompt": "a", "guidance_scale": 0.5}, "guidanceScale"),
    ({"prompt": "a", "guidance_scale": 20.5}, "guidanceScale"),
    ({"prompt": "a", "guidance_scale": float("nan")}, "guidanceScale"),
    ({"prompt": "a", "seed": -1}, "seed"),
    ({"prompt": "a", "seed": 2147483648}, "seed"),
    ({"prompt": "a", "seed": True}, "seed"),
    ({"prompt": "a", "batch_size": 0}, "batchSize"),
    ({"prompt": "a", "batch_size": 5}, "batchSize"),
    ({"prompt": "a", "steps": 0}, "steps"),
    ({"prompt": "a", "negative_prompt": 3}, "negativePrompt"),
])
def test_invalid_fields_are_named(kwargs, param):
    with pytest.raises(RequestValidationError) as err:
        GenerationRequest(**kwargs).validate()
    assert err.value.param == param
    assert err.value.code == "invalid_request"


@pytest.mark.parametrize("field,lowest,highest", [
    ("seed", 0, 2147483647), ("guidance_scale", 1, 20), ("batch_size", 1, 4), ("steps", 1, 150),
])
def test_bounds_are_inclusive(field, lowest, highest):
    for ok in (lowest, highest):
        assert GenerationRequest(prompt="a", **{field: ok}).validate() is None
    for bad in (lowest - 1, highest + 1):
        with pytest.raises(RequestValidationError) as err:
            GenerationRequest(prompt="a", **{field: bad}).validate()
        assert err.value.param == {"guidance_scale": "guidanceScale", "batch_size": "batchSize"}.get(field, field)


def test_wire_dict_rejects_unknown_field_by_name():
    with pytest.raises(RequestValidationError) as err:
        request_from_dict({"prompt": "a", "colour": "red"})
    assert err.value.param == "colour"
    req = request_from_dict({"prompt": "a", "stylePreset": "anime", "batchSize": 2, "aspectRatio": "16:9"})
    assert (req.style_preset, req.batch_size, req.aspect_ratio) == ("anime", 2, "16:9")


@pytest.mark.parametrize("ratio,expected", [
    ("1:1", (512, 512)), ("16:9", (704, 384)), ("9:16", (384, 704)), ("4:3", (576, 448)), ("3:4", (448, 576)),
])
def test_aspect_ratio_to_native_size(ratio, expected):
    assert size_for_aspect_ratio(512, ratio, 64) == expected


def test_aspect_ratio_keeps_orientation_and_multiple_for_every_profile():
    for profile in load_profiles().values():
        for ratio in ("1:1", "16:9", "9:16", "4:3", "3:4"):
            w, h = size_for_aspect_ratio(profile.resolution, ratio, profile.size_multiple)
            assert w % profile.size_multiple == 0 and h % profile.size_multiple == 0
            a, b = (int(x) for x in ratio.split(":"))
            assert (w > h) == (a > b) and (w < h) == (a < b)
            assert 0.75 < (w * h) / profile.resolution ** 2 < 1.3


def test_resolve_fills_defaults_and_random_seed():
    profile = load_profiles()["tiny-sd15"]
    r = GenerationRequest(prompt="a", aspect_ratio="16:9").resolve(profile)
    assert r.model == "tiny-sd15" and r.steps == profile.steps and r.guidance_scale == profile.guidance_scale
    assert 0 <= r.seed <= 2147483647 and (r.width, r.height) == size_for_aspect_ratio(64, "16:9", 16)
    assert r.image_seeds() == [r.seed]
    assert GenerationRequest(prompt="a", seed=2147483647, batch_size=3).resolve(profile).image_seeds() == [2147483647, 0, 1]


def test_an_img2img_request_with_no_denoising_step_is_refused():
    """steps × strength < 1 would run zero img2img steps (diffusers fails deep inside): a 400 naming steps."""
    from PIL import Image

    profile = load_profiles()["tiny-sd15"]
    image = Image.new("RGB", (64, 64))
    with pytest.raises(RequestValidationError) as err:
        GenerationRequest(prompt="a", init_image=image, strength=0.6, steps=1).resolve(profile)
    assert err.value.param == "steps" and "steps >= 2" in err.value.message
    assert GenerationRequest(prompt="a", init_image=image, strength=0.6, steps=2).resolve(profile).steps == 2
