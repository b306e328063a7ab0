"""Styles through the service (issue 24): `stylePreset` per model, `styleStrength`, GET /v1/models'
`styles`, the Avatar's `style` report and `/v1/health`'s resident style LoRAs — through the real
app on SQLite with the real embedded `tiny-sd15` (six built-in styles + the tiny `pixel-art`
kohya LoRA and `watercolor` PEFT LoRA), one or two steps per image where the test allows."""
from __future__ import annotations

import base64
import io
import json
import os

import pytest
from PIL import Image

from avatar_engine.errors import RequestValidationError
from avatar_engine.requests import GenerationRequest
from serve.engine_client import BUILTIN_STYLE_DESCRIPTIONS, EngineDescription, ProfileInfo

from helpers import assert_error
from test_api import FakeEngine, Harness

BUILTINS = ["professional", "anime", "fantasy", "cyberpunk", "renaissance", "realistic"]
TINY_STYLES = BUILTINS + ["pixel-art", "watercolor"]
LORAS = {"pixel-art": ("pixel-art-tiny", 1.0), "watercolor": ("watercolor-tiny", 0.8)}


@pytest.fixture(scope="module")
def loaded_engine():
    """The tiny engine loaded before any describe (so /v1/health has its `engine` report)."""
    from avatar_engine import AvatarEngine, EngineConfig

    engine = AvatarEngine(EngineConfig(device="cpu"))
    engine.load(engine.default_model)
    return engine


@pytest.fixture
def tiny(tmp_path, loaded_engine):
    h = Harness(tmp_path, engine=loaded_engine)
    yield h
    h.store.close()


def _face_jpeg() -> bytes:
    import numpy as np
    from skimage import data as skdata

    buf = io.BytesIO()
    Image.fromarray(np.asarray(skdata.astronaut())).resize((256, 256)).save(buf, format="JPEG")
    return buf.getvalue()


def test_every_style_of_the_embedded_default_completes_and_reports_what_ran(tiny):
    acct, auth = tiny.account(tier="enterprise", credits=100)  # 9 jobs queued at once
    ids = {}
    for i, style in enumerate(TINY_STYLES):
        r = tiny.client.post("/v1/avatars/generate", headers=auth,
                             json={"prompt": "portrait of a fox", "stylePreset": style, "steps": 1, "seed": i})
        assert r.status_code == 202, r.text
        assert r.json()["stylePreset"] == style and r.json()["style"] is None  # reported once it ran
        ids[style] = r.json()["id"]
    strong = tiny.client.post("/v1/avatars/generate", headers=auth, json={
        "prompt": "portrait of a fox", "stylePreset": "pixel-art", "styleStrength": 0.5, "steps": 1, "seed": 9})
    assert strong.status_code == 202, strong.text
    assert tiny.store.get_avatar(strong.json()["id"]).params["styleStrength"] == 0.5  # travels to the worker
    spent = strong.json()["creditsUsed"] * (len(ids) + 1)  # the same per-image cost whatever the style
    tiny.worker.drain()
    for style, avatar_id in ids.items():
        got = tiny.client.get(f"/v1/avatars/{avatar_id}", headers=auth).json()
        assert got["status"] == "completed", got
        assert got["stylePreset"] == style and got["style"]["name"] == style
        if style in LORAS:
            name, scale = LORAS[style]
            assert got["style"]["lora"] == {"name": name, "scale": scale, "mode": "stacked"}
            assert got["style"]["strength"] == got["styleStrength"] == 1.0
        else:
            assert got["style"] == {"name": style, "strength": None, "lora": None} and got["styleStrength"] is None
    got = tiny.client.get(f"/v1/avatars/{strong.json()['id']}", headers=auth).json()
    assert got["styleStrength"] == 0.5 and got["style"] == {
        "name": "pixel-art", "strength": 0.5, "lora": {"name": "pixel-art-tiny", "scale": 0.5, "mode": "stacked"}}
    assert tiny.store.get_account(acct.id).credits == 100 - spent

    # A remix keeps its source's style and strength, unless it names another style.
    # (img2img runs int(steps × strength) steps: 2 × 0.6 → 1)
    kept = tiny.client.post(f"/v1/avatars/{strong.json()['id']}/remix", headers=auth, json={"steps": 2, "seed": 1})
    other = tiny.client.post(f"/v1/avatars/{strong.json()['id']}/remix", headers=auth,
                             json={"steps": 2, "seed": 1, "stylePreset": "watercolor"})
    assert (kept.json()["stylePreset"], kept.json()["styleStrength"]) == ("pixel-art", 0.5)
    assert (other.json()["stylePreset"], other.json()["styleStrength"]) == ("watercolor", 1.0)
    too_few = tiny.client.post(f"/v1/avatars/{strong.json()['id']}/remix", headers=auth, json={"steps": 1})
    assert too_few.status_code == 400 and too_few.json()["error"]["param"] == "steps"  # 1 × 0.6: no step to run
    tiny.worker.drain()
    remixed = tiny.client.get(f"/v1/avatars/{kept.json()['id']}", headers=auth).json()
    assert remixed["status"] == "completed" and remixed["style"]["lora"]["scale"] == 0.5


def test_a_style_the_model_does_not_offer_is_refused_before_credits_move(tiny):
    acct, auth = tiny.account(credits=100)
    photo = [("photo", ("me.jpg", _face_jpeg(), "image/jpeg"))]
    refusals = [
        tiny.client.post("/v1/avatars/generate", headers=auth, json={"prompt": "a fox", "stylePreset": "vaporwave"}),
        tiny.client.post("/v1/avatars/percify-yourself", headers=auth, files=photo,
                         data={"stylePreset": "vaporwave", "styleStrength": "0.5"}),
        tiny.client.post("/v1/avatars/cast", headers=auth, json={
            "prompt": "duo", "stylePreset": "vaporwave",
            "characters": [{"prompt": "a", "photos": [base64.b64encode(_face_jpeg()).decode()]}, {"prompt": "b"}]}),
    ]
    for r in refusals:
        err = assert_error(r, 400, "invalid_request", "stylePreset")
        assert "vaporwave" in err["message"] and all(name in err["message"] for name in TINY_STYLES), err
    # Not a style name at all (the schema's pattern): refused the same way, naming the field.
    assert_error(tiny.client.post("/v1/avatars/generate", headers=auth, json={"prompt": "a", "stylePreset": "Pixel Art"}),
                 400, "invalid_request", "stylePreset")
    assert tiny.store.get_account(acct.id).credits == 100 and tiny.store.list_avatars(acct.id).items == []
    # The multipart form takes the same fields (text converted): an offered style is accepted.
    ok = tiny.client.post("/v1/avatars/percify-yourself", headers=auth, files=photo,
                          data={"stylePreset": "watercolor", "styleStrength": "0.5", "steps": "1"})
    assert ok.status_code == 202, ok.text
    assert (ok.json()["stylePreset"], ok.json()["styleStrength"]) == ("watercolor", 0.5)


@pytest.mark.parametrize("strength", [2.5, -0.1, "1"])
def test_style_strength_out_of_range_is_a_400(tiny, strength):
    acct, auth = tiny.account(credits=100)
    r = tiny.client.post("/v1/avatars/generate", headers=auth,
                         json={"prompt": "a fox", "stylePreset": "pixel-art", "styleStrength": strength})
    assert_error(r, 400, "invalid_request", "styleStrength")
    form = tiny.client.post("/v1/avatars/percify-yourself", headers=auth,
                            files=[("photo", ("me.jpg", _face_jpeg(), "image/jpeg"))],
                            data={"stylePreset": "pixel-art", "styleStrength": "3"})
    assert_error(form, 400, "invalid_request", "styleStrength")
    assert tiny.store.get_account(acct.id).credits == 100


def test_models_lists_each_models_styles_without_file_paths(tiny):
    r = tiny.client.get("/v1/models")  # no key needed, like /v1/health
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "model_list" and body["defaultModel"] == "tiny-sd15"
    (model,) = body["models"]
    assert model["name"] == "tiny-sd15" and model["default"] and model["fuseStyle"] is None
    assert "flux" in model["aliases"] and model["identityMethods"] == ["faceid", "faceid-plus-v2"]
    styles = {s["name"]: s for s in model["styles"]}
    assert list(styles) == TINY_STYLES
    assert all(styles[name]["lora"] is None for name in BUILTINS)
    assert styles["pixel-art"]["lora"] == {"name": "pixel-art-tiny", "scale": 1.0}
    assert styles["watercolor"]["lora"] == {"name": "watercolor-tiny", "scale": 0.8}
    assert (styles["watercolor"]["steps"], styles["watercolor"]["guidanceScale"]) == (16, 6.0)
    text = r.text
    assert ".safetensors" not in text and os.environ["AVATAR_ENGINE_CACHE"] not in text
    # The served document lists the served models' styles as stylePreset's enum.
    spec = tiny.client.get("/v1/openapi.json").json()
    for body_name in ("GenerateRequest", "PercifyRequest", "CastRequest", "RemixRequest"):
        prop = spec["components"]["schemas"][body_name]["properties"]["stylePreset"]
        assert prop["anyOf"][0]["enum"] == TINY_STYLES, body_name
    # /v1/health: the resident style LoRAs and their memory, per loaded model.
    health = tiny.client.get("/v1/health").json()
    loras = health["models"][0]["engine"]["style_loras"]
    assert loras["styles"] == ["pixel-art", "watercolor"] and loras["mode"] == "stacked"
    assert loras["bytes"] > 0 and set(loras["loras"]) == {"pixel-art", "watercolor"}
    assert all(v["parameters"] > 0 and "/" not in v["source"] for v in loras["loras"].values())
    assert health["models"][0]["styles"] == model["styles"]  # the same list as GET /v1/models
    assert loras["bytesPerLoRA"] > 0 and ".safetensors" not in json.dumps(health["models"][0]["styles"])


def test_a_styles_recommended_steps_and_guidance_apply_when_the_request_gives_none(tiny):
    _, auth = tiny.account(credits=100)
    default = tiny.client.post("/v1/avatars/generate", headers=auth,
                               json={"prompt": "a fox", "stylePreset": "watercolor", "seed": 1}).json()
    own = tiny.client.post("/v1/avatars/generate", headers=auth,
                           json={"prompt": "a fox", "stylePreset": "watercolor", "steps": 2, "guidanceScale": 3.0}).json()
    plain = tiny.client.post("/v1/avatars/generate", headers=auth, json={"prompt": "a fox", "stylePreset": "anime"}).json()
    assert (default["steps"], default["guidanceScale"]) == (16, 6.0)
    assert (own["steps"], own["guidanceScale"]) == (2, 3.0)
    profile = tiny.engine.profiles["tiny-sd15"]
    assert (plain["steps"], plain["guidanceScale"]) == (profile.steps, profile.guidance_scale)
    tiny.worker.drain()
    got = tiny.client.get(f"/v1/avatars/{default['id']}", headers=auth).json()
    assert got["status"] == "completed" and got["steps"] == 16 and got["style"]["name"] == "watercolor"


def test_profile_info_carries_styles_and_fuse_style_through_the_description():
    """ProfileInfo from a stand-in profile without styles offers the built-ins; `styles` and
    `fuse_style` survive to_dict/from_dict (the Ray handle's path); a description from an older
    replica without them reads as the built-ins; a fused profile refuses styleStrength != 1."""
    stand_in = ProfileInfo.from_profile(FakeEngine().profiles["fake"])
    assert stand_in.style_names() == list(FakeEngine().profiles["fake"].styles) == BUILTINS
    from types import SimpleNamespace

    bare = ProfileInfo.from_profile(SimpleNamespace(name="bare"))
    assert bare.styles == BUILTIN_STYLE_DESCRIPTIONS and bare.style_names() == BUILTINS
    lora = {"name": "ink", "description": "", "lora": {"name": "ink", "scale": 0.7}, "steps": 12}
    fused = ProfileInfo(name="f", styles=(*BUILTIN_STYLE_DESCRIPTIONS, lora), fuse_style="ink")
    desc = EngineDescription(default_model="f", profiles={"f": fused})
    again = EngineDescription.from_dict(json.loads(json.dumps(desc.to_dict())))
    assert again.profiles["f"] == fused
    old = desc.to_dict()
    for key in ("styles", "fuse_style"):
        del old["profiles"]["f"][key]
    assert EngineDescription.from_dict(old).profiles["f"].styles == BUILTIN_STYLE_DESCRIPTIONS
    resolved = GenerationRequest(prompt="a", style_preset="ink").resolve(fused.for_requests())
    assert (resolved.steps, resolved.style_strength) == (12, 1.0)
    with pytest.raises(RequestValidationError) as exc:
        GenerationRequest(prompt="a", style_preset="ink", style_strength=0.5).resolve(fused.for_requests())
    assert exc.value.param == "styleStrength"
