"""avatar_engine.protocol: the one wire (camelCase) ↔ engine request conversion."""
from __future__ import annotations

import pytest

from avatar_engine import RequestValidationError, load_profiles
from avatar_engine.protocol import COMMON_FIELDS, request_from_wire, request_to_wire


def test_a_resolved_request_survives_the_round_trip_through_stored_params():
    wire = {"prompt": "a fox", "negativePrompt": "blur", "stylePreset": "pixel-art", "styleStrength": 0.5, "aspectRatio": "16:9",
            "guidanceScale": 6.5, "seed": 9, "batchSize": 2, "steps": 3, "model": "tiny-sd15"}
    resolved = request_from_wire(wire).resolve(load_profiles()["tiny-sd15"])
    stored = request_to_wire(resolved)
    assert {k: stored[k] for k in COMMON_FIELDS} == wire
    assert (stored["width"], stored["height"]) == (resolved.width, resolved.height)
    again = request_from_wire({**stored, "uploadId": "up_1"}, strict=False)  # bookkeeping keys are ignored
    assert again.resolve(load_profiles()["tiny-sd15"]) == resolved


def test_strict_parsing_names_the_unknown_field_and_none_means_default():
    with pytest.raises(RequestValidationError) as err:
        request_from_wire({"prompt": "a", "width": 512})  # resolved fields are not inputs
    assert err.value.param == "width"
    with pytest.raises(RequestValidationError) as err:
        request_from_wire({"seed": 1})
    assert err.value.param == "prompt"
    req = request_from_wire({"prompt": "a", "aspectRatio": None, "batchSize": None})
    assert (req.aspect_ratio, req.batch_size) == ("1:1", 1)


def test_stored_references_are_loaded_per_kind():
    loaded = []

    def load(key):
        loaded.append(key)
        return f"image:{key}"

    remix = request_from_wire({"prompt": "a", "initImage": "k0"}, "remix", load=load, strict=False)
    assert (remix.init_image, remix.strength) == ("image:k0", 0.6)
    percify = request_from_wire({"prompt": "a", "photos": ["k1", "k2"], "identityStrength": 0.5}, "percify", load=load)
    assert (percify.kind, percify.photos, percify.identity_strength) == ("percify", ["image:k1", "image:k2"], 0.5)
    cast = request_from_wire({"prompt": "duo", "layout": "rows", "characters": [
        {"prompt": "a", "photos": ["k3"], "avatarId": "av_1"}, {"prompt": "b", "box": [0, 0, 1, 1]}]},
        "cast", load=load, strict=False)
    assert cast.kind == "cast" and cast.layout == "rows"
    assert [(c.prompt, c.photos, c.box) for c in cast.characters] == [("a", ["image:k3"], None), ("b", [], [0, 0, 1, 1])]
    assert loaded == ["k0", "k1", "k2", "k3"]
    with pytest.raises(RequestValidationError) as err:
        request_from_wire({"prompt": "duo", "characters": [{"prompt": "a", "avatarId": "av_1"}]}, "cast")
    assert err.value.param == "characters[0].avatarId"
