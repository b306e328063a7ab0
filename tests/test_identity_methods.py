"""Identity methods selectable per request and per profile: FaceID Plus v2 (CLIP face-crop
path) on tiny-sd15 and InstantID (IdentityNet ControlNet + Resampler IP-Adapter) on tiny-sdxl,
each on tiny random weights of the real layout written to disk and loaded back through the
real loading code. Invariants, not looks: strength 0 is the plain pipeline, batched ==
unbatched, each image of a batch keeps its own identity, the ControlNet's residuals stay in a
cast character's region, release leaves the pipeline clean, and a method a model does not
offer is refused naming `identityMethod`."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from avatar_engine import AvatarEngine, EngineConfig, GenerationRequest, RequestValidationError
from avatar_engine.model.adapters import identity_adapter, release_identity_adapter
from avatar_engine.requests import CastCharacter, CastRequest
from avatar_engine.requests import PercifyRequest

STEPS = 2
SECOND = {"tiny-sd15": "faceid-plus-v2", "tiny-sdxl": "instantid"}


def _pixels(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def _diff(a, b) -> int:
    return int(np.abs(_pixels(a) - _pixels(b)).max())


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def faces() -> dict[str, Image.Image]:
    import insightface
    import skimage.data

    group = Image.open(os.path.join(os.path.dirname(insightface.__file__), "data", "images", "t1.jpg")).convert("RGB")
    return {"a": Image.fromarray(skimage.data.astronaut()), "b": group.crop((850, 0, 1070, 260))}


def _percify(model: str, method: str, photo, **kw) -> PercifyRequest:
    return PercifyRequest(prompt="a portrait", photos=[photo], model=model, identity_method=method, steps=STEPS,
                          score_outputs=False, **{"seed": 3, **kw})


# ---- the real layouts ---------------------------------------------------------------------------

def test_plus_v2_loads_the_h94_layout_with_its_clip_encoder(tiny_engine):
    from diffusers.models.embeddings import IPAdapterFaceIDPlusImageProjection
    from transformers import CLIPVisionModelWithProjection

    model = tiny_engine.load("tiny-sd15")
    adapter = identity_adapter(model, "faceid-plus-v2")
    assert model.profile.identity_methods["faceid-plus-v2"].tiny
    files = [p for p in os.listdir(os.path.join(os.environ["AVATAR_ENGINE_CACHE"], "tiny"))
             if p.startswith("faceid-plus-v2-")]
    folder = os.path.join(os.environ["AVATAR_ENGINE_CACHE"], "tiny", files[0])
    state = torch.load(os.path.join(folder, "ip-adapter-faceid-plusv2_tiny.bin"), weights_only=True)
    assert set(state) == {"image_proj", "ip_adapter"}
    assert {"proj.0.weight", "norm.weight", "perceiver_resampler.proj_in.weight",
            "perceiver_resampler.layers.3.0.to_kv.weight", "perceiver_resampler.layers.3.1.3.weight"} <= set(state["image_proj"])
    assert "1.to_k_ip.weight" in state["ip_adapter"] and "0.to_q_lora.down.weight" in state["ip_adapter"]
    assert {"config.json", "preprocessor_config.json"} <= set(os.listdir(os.path.join(folder, "image_encoder")))
    assert isinstance(adapter.projection, IPAdapterFaceIDPlusImageProjection)
    assert adapter.projection.shortcut is True and adapter.needs_crops and adapter.lora_rank == 4
    assert isinstance(adapter.image_encoder, CLIPVisionModelWithProjection)
    applied = model.applied["identity_methods"]
    assert set(applied) == {"faceid", "faceid-plus-v2"} and applied["faceid-plus-v2"]["image_encoder"]


def test_plus_v2_tokens_read_the_face_crop(tiny_engine, faces):
    """Same identity embedding, another face crop through CLIP → other tokens (the CLIP path
    runs); the shortcut keeps the identity tokens in them."""
    from avatar_engine.faces import align_face

    adapter = identity_adapter(tiny_engine.load("tiny-sd15"), "faceid-plus-v2")
    analyzer = tiny_engine.face_analyzer
    crops = [[align_face(im, analyzer.detect(im)[0].kps, 224)] for im in (faces["a"], faces["b"])]
    emb = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    emb /= np.linalg.norm(emb)
    with torch.no_grad():
        t = [adapter.tokens([emb], False, clip_embeds=adapter.clip_embeds([[c]], False)) for c in crops]
        cfg = adapter.tokens([emb], True, clip_embeds=adapter.clip_embeds([[crops[0]]], True))
    assert t[0].shape == (1, 1, 4, 32) and cfg.shape == (2, 1, 4, 32)
    assert (t[0] - t[1]).abs().max() > 1e-3
    assert torch.allclose(cfg[1], t[0], atol=1e-5)
    with pytest.raises(RequestValidationError):
        adapter.tokens([emb], False)


def test_instantid_loads_the_instantx_layout(tiny_engine):
    from diffusers import ControlNetModel
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    model = tiny_engine.load("tiny-sdxl")
    adapter = identity_adapter(model, "instantid")
    folder = next(os.path.join(os.environ["AVATAR_ENGINE_CACHE"], "tiny", p)
                  for p in os.listdir(os.path.join(os.environ["AVATAR_ENGINE_CACHE"], "tiny")) if p.startswith("instantid-"))
    assert {"config.json", "diffusion_pytorch_model.safetensors"} <= set(os.listdir(os.path.join(folder, "ControlNetModel")))
    state = torch.load(os.path.join(folder, "ip-adapter.bin"), weights_only=True)
    assert state["image_proj"]["latents"].shape[1] == 16 and "layers.3.1.3.weight" in state["image_proj"]
    assert not any("lora" in k for k in state["ip_adapter"])
    assert isinstance(adapter.projection, IPAdapterPlusImageProjection) and adapter.lora_rank == 0
    assert isinstance(adapter.identitynet.controlnet, ControlNetModel)
    with torch.no_grad():
        tokens = adapter.tokens([np.eye(512, dtype=np.float32)[0]], True)
    assert tokens.shape == (2, 1, 16, 64)
    assert model.applied["identity_methods"]["instantid"]["identitynet"] is True


def test_draw_kps_draws_instantids_limbs_and_points():
    from avatar_engine.model.adapters import KPS_COLORS, draw_kps, frontal_kps, kps_in_box

    kps = kps_in_box(frontal_kps(), (0.0, 0.0, 1.0, 1.0), 1024, 1024, face_frac=0.5)
    img = draw_kps(1024, 1024, [kps])
    for (x, y), colour in zip(kps, KPS_COLORS):
        assert tuple(img[int(y), int(x)]) == colour  # each keypoint a disc in its colour
    assert img[0, 0].tolist() == [0, 0, 0] and (img.sum(-1) > 0).mean() < 0.05
    nose, eye = kps[2], kps[0]
    mid = ((nose + eye) / 2).astype(int)
    assert tuple(img[mid[1], mid[0]]) == tuple(int(c * 0.6) for c in KPS_COLORS[0])  # a limb at 60 %


# ---- batching and per-image identities -----------------------------------------------------------

@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_percify_batched_equals_unbatched_with_own_identities(tiny_engine, faces, model):
    """Two people and a strength-0 request in one call: each image equals its solo run, the two
    people differ (each got its own embedding, crop and keypoints), strength 0 is plain."""
    method = SECOND[model]
    reqs = [_percify(model, method, faces["a"]), _percify(model, method, faces["b"]),
            _percify(model, method, faces["a"], identity_strength=0.0)]
    batched = tiny_engine.generate(reqs)
    assert [r.extra["batchImages"] for r in batched] == [[3]] * 3
    assert all(r.report.method == method for r in batched)
    alone = [tiny_engine.generate(req) for req in reqs]
    for res, solo in zip(batched, alone):
        assert _diff(res.images[0], solo.images[0]) <= 2
    assert np.abs(_pixels(batched[0].images[0]) - _pixels(batched[1].images[0])).mean() > 0.5
    plain = tiny_engine.generate(GenerationRequest(prompt="a portrait", seed=3, steps=STEPS, model=model))
    assert np.array_equal(_pixels(alone[2].images[0]), _pixels(plain.images[0]))  # adds exactly nothing
    faceid = tiny_engine.generate(_percify(model, "faceid", faces["a"]))
    assert faceid.report.method == "faceid"
    assert np.abs(_pixels(faceid.images[0]) - _pixels(batched[0].images[0])).mean() > 0.5  # another method


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_cast_batched_equals_unbatched_per_method(tiny_engine, faces, model):
    method = SECOND[model]

    def cast(first, second, seed):
        return CastRequest(prompt="two friends", model=model, steps=STEPS, seed=seed, identity_method=method,
                           characters=[CastCharacter("a", photos=[first]), CastCharacter("b", photos=[second])])

    reqs = [cast(faces["a"], faces["b"], 1), cast(faces["b"], faces["a"], 1)]
    batched = tiny_engine.generate(reqs)
    assert [r.extra["batchImages"] for r in batched] == [[2], [2]]
    assert all(r.report.identity_method == method for r in batched)
    for req, res in zip(reqs, batched):
        assert _diff(res.images[0], tiny_engine.generate(req).images[0]) <= 2
    assert np.abs(_pixels(batched[0].images[0]) - _pixels(batched[1].images[0])).mean() > 0.3  # swapped faces


def test_identitynet_residuals_stay_in_the_characters_region(tiny_engine):
    """Cast with InstantID: character k's ControlNet residuals are multiplied by its region
    mask, so they are exactly zero wherever the region does not reach; the hook exists only
    inside the call."""
    from avatar_engine.model.adapters import keypoint_images, kps_in_box
    from avatar_engine.model.regional import region_masks

    model = tiny_engine.load("tiny-sdxl")
    adapter, unet = identity_adapter(model, "instantid"), model.pipe.unet
    boxes = [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]
    masks = torch.cat([region_masks(boxes, 64, 64), torch.zeros(2, 64, 64)])[None]  # [1, 4, 64, 64]
    with torch.no_grad():
        tokens = adapter.tokens([np.stack([np.eye(512, dtype=np.float32)[i] for i in range(4)])], False)
    images = keypoint_images([[kps_in_box(None, boxes[0], 64, 64), None, None, None]], 64, 64, "cpu", torch.float32, False)
    sample = torch.randn(1, 4, 8, 8)
    added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    hooks_before = len(unet._forward_pre_hooks)
    with adapter.identitynet.applied(unet, tokens, images, torch.ones(1), masks=masks,
                                     active=[True, False, False, False]):
        hook = list(unet._forward_pre_hooks.values())[-1]
        with torch.no_grad():
            _, kwargs = hook(unet, (sample, torch.tensor(10)), {"encoder_hidden_states": torch.randn(1, 77, 64),
                                                                "added_cond_kwargs": added})
    assert len(unet._forward_pre_hooks) == hooks_before
    residuals = list(kwargs["down_block_additional_residuals"]) + [kwargs["mid_block_additional_residual"]]
    assert any(r.abs().max() > 0 for r in residuals)
    for r in residuals:
        w = r.shape[-1]
        if w > 1:
            assert r[..., w // 2:].abs().max() == 0  # right half: character 1's region (no face)


# ---- selection and refusals --------------------------------------------------------------------

def test_a_method_the_model_does_not_offer_is_refused(tiny_engine, faces):
    profile = tiny_engine.profile("tiny-sd15")
    assert profile.offered_identity_methods == ("faceid", "faceid-plus-v2")
    assert tiny_engine.profile("tiny-sdxl").offered_identity_methods == ("faceid", "instantid")
    cases = [
        (_percify("tiny-sd15", "instantid", faces["a"]), "identityMethod"),
        (_percify("tiny-sd15", "photomaker", faces["a"]), "identityMethod"),
        (PercifyRequest(prompt="x", identity_embedding=[1.0] + [0.0] * 511, identity_method="faceid-plus-v2"),
         "identityEmbedding"),
        (CastRequest(prompt="x", model="tiny-sdxl", identity_method="faceid-plus-v2",
                     characters=[CastCharacter("a", photos=[faces["a"]]), CastCharacter("b")]), "identityMethod"),
        (CastRequest(prompt="x", identity_method="faceid-plus-v2",
                     characters=[CastCharacter("a", identity_embedding=[1.0] + [0.0] * 511), CastCharacter("b")]),
         "characters[0].identityEmbedding"),
    ]
    for req, param in cases:
        with pytest.raises(RequestValidationError) as err:
            tiny_engine.generate(req)
        assert err.value.param == param, err.value.message
    default = tiny_engine.generate(_percify("tiny-sd15", None, faces["a"]))
    assert default.report.method == "faceid"


def test_release_leaves_the_pipeline_clean_and_reload_reproduces():
    eng = AvatarEngine(EngineConfig(device="cpu", default_model="tiny-sdxl"))
    model = eng.load("tiny-sdxl")
    unet = model.pipe.unet
    plain_req = GenerationRequest(prompt="a portrait", seed=5, steps=STEPS, model="tiny-sdxl")
    plain = _pixels(eng.generate(plain_req).images[0])
    req = PercifyRequest(prompt="a portrait", identity_embedding=[1.0] + [0.0] * 511, identity_method="instantid",
                         seed=5, steps=STEPS, model="tiny-sdxl", score_outputs=False)
    hooks = dict(unet._forward_pre_hooks)
    first = _pixels(eng.generate(req).images[0])
    assert dict(unet._forward_pre_hooks) == hooks  # the IdentityNet hook lives only inside its call
    assert release_identity_adapter(model)
    assert all(len(p.identities) == 0 for p in unet.attn_processors.values())
    assert "identity_methods" not in model.applied and "ip_adapter" not in model.state
    assert np.array_equal(_pixels(eng.generate(plain_req).images[0]), plain)
    assert np.array_equal(_pixels(eng.generate(req).images[0]), first)  # loaded again on demand
    assert set(model.applied["identity_methods"]) == {"instantid"}
