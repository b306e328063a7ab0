"""Percify-yourself on the tiny pipelines with the tiny FaceID adapter and real photos
(scikit-image's astronaut; crops of insightface's t1.jpg group photo for other people)."""
from __future__ import annotations

import dataclasses

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from avatar_engine import AvatarEngine, EngineConfig, GenerationRequest, NoFaceError, RequestValidationError
from avatar_engine.requests import PercifyRequest
from avatar_engine.protocol import result_to_wire
from avatar_engine.tasks.identity import identity_similarity
from face_support import require_dlib
from pg_support import in_ci


def dlib_ok() -> bool:
    from avatar_engine.faces.scoring import dlib_available

    return dlib_available()

STEPS = 4  # enough denoising for identity to move pixels; keeps the file fast


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _pixels(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    import insightface
    import skimage.data

    astronaut = Image.fromarray(skimage.data.astronaut())
    group = Image.open(os.path.join(os.path.dirname(insightface.__file__), "data", "images", "t1.jpg")).convert("RGB")
    return {
        "astronaut": _jpeg(astronaut),
        # the same person again, smaller and brighter: a second reference photo
        "astronaut2": _jpeg(Image.eval(astronaut.resize((400, 400)), lambda v: min(255, int(v * 1.1)))),
        "person_b": _jpeg(group.crop((850, 0, 1070, 260))),  # one face, another person
        "pair": _jpeg(group.crop((0, 120, 400, 440))),  # two faces; the left one is larger
        "tiny_face": _jpeg(astronaut.resize((150, 150))),  # face about 25 px across
        "landscape": _jpeg(Image.fromarray(skimage.data.rocket())),  # no face
        "person_c": _jpeg(group.crop((0, 170, 240, 430))),  # the left person of the pair
    }


@pytest.fixture(scope="module")
def engine(tiny_engine):
    return tiny_engine


def _percify(**kw) -> PercifyRequest:
    base = dict(prompt="portrait of an explorer", seed=11, steps=STEPS)
    base.update(kw)
    return PercifyRequest(**base)


def _embedding(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(512).astype(np.float32)
    return v / np.linalg.norm(v)


# ---- face policy and validation --------------------------------------------------------------

def test_photo_without_face_is_named(engine, photos):
    with pytest.raises(NoFaceError) as err:
        engine.generate(_percify(photos=[photos["astronaut"], photos["landscape"]]))
    assert err.value.param == "photos[1]"
    assert "photo 2" in err.value.message and "no face" in err.value.message


def test_too_small_face_is_refused(engine, photos):
    with pytest.raises(NoFaceError) as err:
        engine.generate(_percify(photos=[photos["tiny_face"]]))
    assert err.value.param == "photos[0]"
    assert "too small" in err.value.message


@pytest.mark.parametrize("kwargs, param", [
    (dict(photos=[]), "photos"),
    (dict(photos=[b"x"] * 6), "photos"),
    (dict(photos=["not an image"]), "photos[0]"),
    (dict(photos=[b"GIF89a not allowed"]), "photos[0]"),
    (dict(photos=[b"\x89PNG\r\n\x1a\n", ]), "photos[0]"),
    (dict(identity_strength=2.5, identity_embedding=np.ones(512)), "identityStrength"),
    (dict(identity_strength=float("nan"), identity_embedding=np.ones(512)), "identityStrength"),
    (dict(identity_embedding=np.ones(128)), "identityEmbedding"),
    (dict(identity_embedding=np.zeros(512)), "identityEmbedding"),
])
def test_invalid_fields_name_the_field(engine, kwargs, param):
    with pytest.raises(RequestValidationError) as err:
        engine.generate(_percify(**kwargs))
    assert err.value.param == param


def test_several_faces_uses_the_largest_and_says_so(engine, photos):
    res = engine.generate(_percify(photos=[photos["pair"]], steps=2))
    face = res.report.faces[0]
    assert face["photo"] == "photos[0]" and face["found"] == 2 and face["usedRule"] == "largest"
    x0, y0, x1, y1 = face["used"]["bbox"]
    assert x1 < 200  # the left (larger) face of the pair, not the right one
    assert any("largest" in note for note in res.report.notes)


# ---- one person per request -------------------------------------------------------------------

def _edited(img_bytes: bytes) -> list[bytes]:
    """The same photo rescaled, recompressed, darkened and mirrored: one person's photos."""
    from PIL import ImageEnhance, ImageOps

    img = Image.open(io.BytesIO(img_bytes)).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=35)
    return [_jpeg(img.resize((320, 320))), buf.getvalue(), _jpeg(ImageEnhance.Brightness(img).enhance(0.5)),
            _jpeg(ImageOps.mirror(img))]


def test_photos_of_different_people_are_refused_naming_the_photo(engine, photos):
    from avatar_engine import IdentityMismatchError

    require_dlib()
    req = _percify(photos=[photos["astronaut"], photos["astronaut2"], photos["person_b"]])
    with pytest.raises(IdentityMismatchError) as err:
        req.validate()  # no engine: the check a service runs at submit time
    assert err.value.param == "photos[2]" and err.value.code == "invalid_request"
    assert "photos[2] does not show the same person as the other 2 photos" in err.value.message
    with pytest.raises(IdentityMismatchError) as err:  # the engine refuses too, before any pipeline call
        engine.generate(_percify(photos=[photos["person_b"], photos["person_c"]]))
    assert err.value.param == "photos[1]"
    with pytest.raises(IdentityMismatchError) as err:
        engine.generate(_percify(photos=[photos["person_c"], photos["astronaut"], photos["astronaut2"]]))
    assert err.value.param == "photos[0]"  # the odd one out, wherever it is


def test_edited_copies_of_one_photo_are_one_person(engine, photos):
    require_dlib()
    res = engine.generate(_percify(photos=[photos["astronaut"], *_edited(photos["astronaut"])], steps=2))
    ident = res.report.to_json()["identity"]
    assert ident["scorer"]["name"] == "dlib-resnet" and ident["scorer"]["fallback"] is False
    check = ident["referenceCheck"]
    assert check["consistent"] and check["enforced"] and check["dropped"] == []
    assert [p["photo"] for p in check["photos"]] == [f"photos[{i}]" for i in range(5)]
    assert all(p["sameIdentity"] and p["distance"] < 0.35 for p in check["photos"])
    assert ident["consistency"] > 0.98


def test_drop_option_leaves_out_the_other_person(engine, photos):
    require_dlib()
    kw = dict(steps=2, seed=21)
    dropped = engine.generate(_percify(photos=[photos["astronaut"], photos["person_b"], photos["astronaut2"]],
                                       mismatched_photos="drop", **kw))
    ident = dropped.report.to_json()["identity"]
    assert [f["dropped"] for f in ident["faces"]] == [False, True, False]
    assert ident["referenceCheck"]["dropped"] == ["photos[1]"]
    assert any("photos[1] was dropped" in n for n in ident["notes"])
    # the identity is that of the two kept photos: the same pixels as sending only those
    kept = engine.generate(_percify(photos=[photos["astronaut"], photos["astronaut2"]], **kw))
    assert np.abs(_pixels(dropped.images[0]) - _pixels(kept.images[0])).max() <= 2
    with pytest.raises(RequestValidationError) as err:
        _percify(photos=[photos["astronaut"]], mismatched_photos="ignore").validate()
    assert err.value.param == "mismatchedPhotos"


def test_fallback_scorer_is_labelled_in_the_report(engine, photos, monkeypatch):
    """An engine scoring with the hand-crafted fallback (what `auto` falls back to without dlib)
    says so in every report; its verdict never refuses photos."""
    from avatar_engine.faces.scoring import scorer_from_config

    assert AvatarEngine(EngineConfig(device="cpu", face_scorer="handcrafted")).config.face_scorer == "handcrafted"
    monkeypatch.setattr(engine.identity, "scorer", scorer_from_config("handcrafted", analyzer=engine.face_analyzer))
    res = engine.generate(_percify(photos=[photos["astronaut"], photos["astronaut2"]], steps=1))
    ident = res.report.to_json()["identity"]
    assert engine.identity.scorer.name == ident["scorer"]["name"] == "handcrafted-hog-lbp" and ident["scorer"]["fallback"] is True
    assert ident["referenceCheck"]["enforced"] is False
    assert any("not a face-recognition model" in n for n in ident["notes"])


# ---- conditioning ----------------------------------------------------------------------------

def test_strength_zero_equals_plain_pipeline(engine, photos):
    plain = engine.generate(GenerationRequest(prompt="portrait of an explorer", seed=11, steps=STEPS))
    zero = engine.generate(_percify(photos=[photos["astronaut"]], identity_strength=0.0))
    assert np.array_equal(_pixels(zero.images[0]), _pixels(plain.images[0]))
    full = engine.generate(_percify(photos=[photos["astronaut"]]))
    assert np.abs(_pixels(full.images[0]) - _pixels(plain.images[0])).mean() > 1.0


def test_different_faces_give_different_outputs(engine, photos):
    a1, a2, b = engine.generate([_percify(photos=[photos["astronaut"]]), _percify(photos=[photos["astronaut"]]),
                                 _percify(photos=[photos["person_b"]])])
    # same face, same seed: the same image (up to batch-position rounding: they shared one call)
    assert np.abs(_pixels(a1.images[0]) - _pixels(a2.images[0])).max() <= 2  # float reassociation across batch sizes only
    assert np.abs(_pixels(a1.images[0]) - _pixels(b.images[0])).mean() > 1.0


def test_several_photos_combine_into_one_identity(engine, photos):
    from avatar_engine.faces import combine_embeddings, largest_face
    from avatar_engine.images import load_image

    both = engine.generate(_percify(photos=[photos["astronaut"], photos["astronaut2"]]))
    ident = both.report.to_json()["identity"]
    assert ident["referencePhotos"] == 2 and [f["found"] for f in ident["faces"]] == [1, 1]
    assert 0.5 < ident["consistency"] <= 1.0
    # the identity is the normed mean of the two photos' embeddings: same pixels as passing it directly
    embs = [largest_face(engine.face_analyzer.embed(load_image(photos[k]))).embedding for k in ("astronaut", "astronaut2")]
    direct = engine.generate(_percify(identity_embedding=combine_embeddings(embs)))
    assert np.abs(_pixels(both.images[0]) - _pixels(direct.images[0])).max() <= 2  # renormalising the embedding rounds
    one = engine.generate(_percify(photos=[photos["astronaut"]]))
    assert np.abs(_pixels(both.images[0]) - _pixels(one.images[0])).mean() > 0.5


def test_batched_equals_unbatched(engine, photos):
    reqs = [
        _percify(photos=[photos["astronaut"]], batch_size=2, seed=3),
        _percify(identity_embedding=_embedding(1), batch_size=2, seed=4, prompt="a knight"),
        _percify(identity_embedding=_embedding(2), seed=5, identity_strength=0.5),  # strength is per image
        _percify(identity_embedding=_embedding(2), seed=5, identity_strength=0.0),  # 0: the plain pixels
        GenerationRequest(prompt="portrait of an explorer", seed=6, steps=STEPS),  # plain, same engine call
    ]
    batched = engine.generate(reqs)
    assert batched[0].extra["batchImages"] == [6]  # every percify request shared one call, whatever its strength
    assert batched[4].extra["batchImages"] == [1]
    for req, res in zip(reqs, batched):
        alone = engine.generate(req)
        for got, want in zip(res.images, alone.images):
            assert np.abs(_pixels(got) - _pixels(want)).max() <= 2  # float reassociation across batch sizes only


def test_identity_report_shape(engine, photos):
    res = engine.generate(_percify(photos=[photos["astronaut"]], batch_size=2))
    doc = json.loads(json.dumps(result_to_wire(res)))  # JSON-serialisable end to end
    ident = doc["identity"]
    assert doc["kind"] == "percify"
    assert ident["source"] == "photos" and ident["strength"] == 0.8 and ident["backend"] == "embedded"
    assert ident["referencePhotos"] == 1
    face = ident["faces"][0]
    assert face["found"] == 1 and face["usedRule"] == "only" and len(face["used"]["bbox"]) == 4
    assert face["used"]["size"] >= 32 and 0 < face["used"]["detScore"] <= 1
    assert len(ident["similarity"]) == len(ident["outputFaces"]) == len(ident["sameIdentity"]) == 2
    assert len(ident["distance"]) == 2
    for sim, dist, same, n in zip(ident["similarity"], ident["distance"], ident["sameIdentity"], ident["outputFaces"]):
        assert (sim is None) == (n == 0) == (dist is None) == (same is None)
    scorer = ident["scorer"]
    for dist, same in zip(ident["distance"], ident["sameIdentity"]):
        if dist is not None:  # the verdict is the documented threshold applied to the distance
            assert same == (dist < scorer["threshold"])
    assert {"name", "label", "detector", "metric", "threshold", "verdict", "fallback"} <= set(scorer)
    assert ident["consistency"] == 1.0 and ident["referenceCheck"]["consistent"] is True


def test_identity_similarity_scores_the_output_face(engine, photos):
    """The per-image score, by the dlib scorer against the reference photos: the same person
    (another photo) is the same identity, another person is not; no face → None."""
    from avatar_engine.faces.descriptors import reference_descriptor
    from avatar_engine.tasks import face_scorer
    from avatar_engine.images import load_image

    require_dlib()
    scorer = face_scorer(engine)
    assert scorer.name == "dlib-resnet"
    ref = engine.generate(_percify(photos=[photos["astronaut"]], steps=1))
    ref_desc = reference_descriptor(scorer, load_image(photos["astronaut"]))
    same, n_same = identity_similarity(scorer, ref_desc, load_image(photos["astronaut2"]))
    other, n_other = identity_similarity(scorer, ref_desc, load_image(photos["person_b"]))
    none, n_none = identity_similarity(scorer, ref_desc, ref.images[0])
    assert n_same == n_other == 1
    assert same.same and not other.same and same.similarity > other.similarity
    assert same.distance < 0.6 <= other.distance
    assert none is None and n_none == 0


# ---- adapter lifecycle -----------------------------------------------------------------------

def test_plain_generate_unaffected_by_adapter():
    """The adapter is attached at load, into the lifetime processors (no peft, no processor
    swaps): plain output with it attached == after percify ran == after it is released; a
    reload gives the same identity images."""
    from avatar_engine.model.adapters import release_identity_adapter
    from avatar_engine.model.attention import AvatarAttnProcessor

    eng = AvatarEngine(EngineConfig(device="cpu", default_model="tiny-sd15"))
    model = eng.load("tiny-sd15")
    procs = model.pipe.unet.attn_processors
    assert all(isinstance(p, AvatarAttnProcessor) and p.identity is not None for p in procs.values())
    assert model.state["ip_adapter"].lora_rank == 4  # the tiny adapter carries a FaceID LoRA like real checkpoints
    assert not getattr(model.pipe.unet, "peft_config", {}) and model.pipe.unet.encoder_hid_proj is None
    plain_req = GenerationRequest(prompt="portrait of an explorer", seed=8, steps=STEPS)
    before = _pixels(eng.generate(plain_req).images[0])
    p1 = eng.generate(_percify(identity_embedding=_embedding(1), seed=8, score_outputs=False))
    assert p1.report.scored is False and p1.report.similarity == [None]
    assert p1.report.source == "embedding" and p1.report.faces == []
    assert np.abs(_pixels(p1.images[0]) - before).mean() > 1.0
    assert np.array_equal(_pixels(eng.generate(plain_req).images[0]), before)
    assert release_identity_adapter(model) and "ip_adapter" not in model.state
    assert all(p.identity is None for p in model.pipe.unet.attn_processors.values())
    assert "ip_adapter" not in model.applied  # the report follows the modules
    assert np.array_equal(_pixels(eng.generate(plain_req).images[0]), before)
    again = eng.generate(_percify(identity_embedding=_embedding(1), seed=8, score_outputs=False))
    assert np.array_equal(_pixels(again.images[0]), _pixels(p1.images[0]))


def test_faceid_checkpoint_file_loads_like_the_in_memory_weights(tmp_path):
    """The real loading route: an h94-layout `.bin` file through `local_path` gives the same
    identity images as the same weights built in memory."""
    from avatar_engine import IPAdapterSource, load_profiles
    from avatar_engine.model.adapters import write_faceid_checkpoint

    profiles = load_profiles()
    eng = AvatarEngine(EngineConfig(device="cpu", default_model="tiny-sd15"), profiles=profiles)
    write_faceid_checkpoint(eng.load("tiny-sd15").pipe.unet, tmp_path / "ip-adapter-faceid_tiny.bin")
    from_file = dataclasses.replace(profiles["tiny-sd15"], name="tiny-sd15-file", ip_adapter=IPAdapterSource(
        local_path=str(tmp_path), weight_name="ip-adapter-faceid_tiny.bin"))
    eng.profiles[from_file.name] = from_file
    req = dict(identity_embedding=_embedding(3), seed=2, score_outputs=False)
    a = eng.generate(_percify(**req))
    b = eng.generate(_percify(model="tiny-sd15-file", **req))
    assert np.array_equal(_pixels(a.images[0]), _pixels(b.images[0]))
    assert b.report.adapter == "faceid"


def test_tiny_sdxl_identity(engine):
    """The tiny adapter builds for the SDXL UNet too: strength 0 is the plain pipeline, and two
    identities in one call give two different images."""
    kw = dict(model="tiny-sdxl", seed=9, score_outputs=False)
    plain = engine.generate(GenerationRequest(prompt="portrait of an explorer", seed=9, steps=STEPS, model="tiny-sdxl"))
    zero, a, b = engine.generate([_percify(identity_embedding=_embedding(1), identity_strength=0.0, **kw),
                                  _percify(identity_embedding=_embedding(1), **kw),
                                  _percify(identity_embedding=_embedding(2), **kw)])
    assert np.array_equal(_pixels(zero.images[0]), _pixels(plain.images[0]))
    assert a.extra["batchImages"] == [3]  # strength is per image: all three shared one call
    assert np.abs(_pixels(a.images[0]) - _pixels(b.images[0])).mean() > 1.0


# ---- CLI -------------------------------------------------------------------------------------

def test_cli_percify_end_to_end(tmp_path, photos, capsys):
    from avatar_engine.cli import main

    photo = tmp_path / "me.jpg"
    photo.write_bytes(photos["astronaut"])
    out = tmp_path / "out"
    rc = main(["percify", str(photo), "--prompt", "as a cyberpunk hero", "--identity-strength", "0.9",
               "--seed", "7", "--steps", "2", "--batch-size", "2", "-o", str(out)])
    assert rc == 0
    sidecars = list(out.glob("*.json"))
    assert len(sidecars) == 1
    meta = json.loads(sidecars[0].read_text())
    assert meta["kind"] == "percify" and meta["seed"] == 7 and len(meta["files"]) == 2
    assert meta["identity"]["strength"] == 0.9 and meta["identity"]["photoFiles"] == [str(photo)]
    for name in meta["files"]:
        assert Image.open(out / name).size == (meta["width"], meta["height"])

    landscape = tmp_path / "landscape.jpg"
    landscape.write_bytes(photos["landscape"])
    capsys.readouterr()
    rc = main(["percify", str(landscape), "--steps", "1", "-o", str(out)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert rc == 2
    assert len(errors) == 1 and "no face" in errors[0] and "(photos[0])" in errors[0]

    if dlib_ok() or in_ci():  # the astronaut's report is dlib's; another person's photo is refused by name
        require_dlib()
        assert meta["identity"]["scorer"]["name"] == "dlib-resnet"
        assert meta["identity"]["sameIdentity"] == [None, None]  # the tiny model draws no face
        other = tmp_path / "other.jpg"
        other.write_bytes(photos["person_b"])
        rc = main(["percify", str(photo), str(other), "--steps", "1", "-o", str(out)])
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
        assert rc == 2 and len(errors) == 1
        assert "photos[1] does not show the same person" in errors[0] and "(photos[1])" in errors[0]


def test_adapter_configuration_errors_are_clear(tmp_path):
    from types import SimpleNamespace

    from avatar_engine import IPAdapterSource, ModelProfile, ProfileError
    from avatar_engine.model.adapters import identity_adapter

    bare = SimpleNamespace(state={}, applied={}, pipe=None,
                           profile=ModelProfile(name="bare", architecture="sd15", tiny=True))
    with pytest.raises(RequestValidationError) as err:
        identity_adapter(bare)
    assert err.value.param == "model" and "no IP-Adapter" in err.value.message

    missing = SimpleNamespace(state={}, applied={}, pipe=None, profile=ModelProfile(
        name="local", architecture="sd15", tiny=True,
        ip_adapter=IPAdapterSource(local_path=str(tmp_path), weight_name="ip-adapter-faceid_sd15.bin")))
    with pytest.raises(ProfileError) as perr:
        identity_adapter(missing)
    assert "ip-adapter-faceid_sd15.bin" in perr.value.message and "huggingface-cli download" in perr.value.message
