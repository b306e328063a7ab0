"""Face analysis: real detection on real photos, identity policy, and insightface's real code
path driven by tiny generated ONNX models."""
from __future__ import annotations

import importlib.util
import itertools
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from avatar_engine.errors import NoFaceError, ProfileError
from avatar_engine.faces import (ARCFACE_TEMPLATE, Face, analyze_reference_photos, combine_embeddings,
                                 cosine_similarity, face_analyzer_from_config, largest_face)

torch.set_num_threads(2)
skimage_data = pytest.importorskip("skimage.data")


def _insightface_dir() -> str | None:
    spec = importlib.util.find_spec("insightface")
    return os.path.dirname(spec.origin) if spec and spec.origin else None


@pytest.fixture(scope="module")
def analyzer():
    from avatar_engine.faces.mtcnn import mtcnn_weights_dir

    if mtcnn_weights_dir() is None:
        pytest.skip("MTCNN weights (pip install --no-deps facenet-pytorch==2.6.0) not installed")
    return face_analyzer_from_config("embedded", detector="mtcnn")


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skimage_data.astronaut())


@pytest.fixture(scope="module")
def group_photo() -> Image.Image:
    base = _insightface_dir()
    if base is None:
        pytest.skip("insightface (ships t1.jpg) not installed")
    return Image.open(os.path.join(base, "data", "images", "t1.jpg")).convert("RGB")


def perturb(img: Image.Image) -> Image.Image:
    """Same photo, re-shot: 80 % scale, +20 % brightness, shifted a few pixels."""
    small = img.resize((int(img.width * 0.8), int(img.height * 0.8)), Image.BICUBIC)
    bright = ImageEnhance.Brightness(small).enhance(1.2)
    return Image.fromarray(np.roll(np.asarray(bright), (7, -5), (0, 1)))


def test_astronaut_has_one_face_around_her_face(analyzer, astronaut):
    faces = analyzer.detect(astronaut)
    assert len(faces) == 1
    f = faces[0]
    x0, y0, x1, y1 = f.bbox
    # Her face spans roughly x 175..270, y 60..170 in the 512×512 image.
    assert 160 < x0 < 200 and 250 < x1 < 285 and 40 < y0 < 80 and 150 < y1 < 190
    assert f.det_score > 0.9
    left_eye, right_eye, nose, mouth_l, mouth_r = f.kps
    assert left_eye[0] < nose[0] < right_eye[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_l[1], mouth_r[1])
    assert f.embedding.shape == (512,) and f.embedding.dtype == np.float32
    assert np.linalg.norm(f.embedding) == pytest.approx(1.0, abs=1e-5)
    assert f.area == pytest.approx((x1 - x0) * (y1 - y0))


def test_group_photo_has_six_faces(analyzer, group_photo):
    faces = analyzer.detect(group_photo)
    assert 4 <= len(faces) <= 6
    areas = [f.area for f in faces]
    assert areas == sorted(areas, reverse=True)
    # no two detections of the same face
    centres = np.array([[(f.bbox[0] + f.bbox[2]) / 2, (f.bbox[1] + f.bbox[3]) / 2] for f in faces])
    dist = np.linalg.norm(centres[:, None] - centres[None], axis=-1) + np.eye(len(faces)) * 1e9
    assert dist.min() > 50


@pytest.mark.parametrize("name", ["coffee", "rocket"])
def test_landscape_photo_has_no_face(analyzer, name):
    img = Image.fromarray(getattr(skimage_data, name)())
    assert analyzer.detect(img) == []
    with pytest.raises(NoFaceError) as e:
        analyze_reference_photos(analyzer, [perturb(Image.fromarray(skimage_data.astronaut())), img])
    assert e.value.param == "photos[1]"
    assert "photo 2" in e.value.message and "no face" in e.value.message


def test_same_face_scores_higher_than_different_faces(analyzer, astronaut, group_photo):
    a = analyzer.detect(astronaut)[0].embedding
    b = analyzer.detect(perturb(astronaut))[0].embedding
    others = [f.embedding for f in analyzer.detect(group_photo)]
    same = cosine_similarity(a, b)
    different = [cosine_similarity(x, y) for i, x in enumerate(others) for y in others[i + 1:]]
    different += [cosine_similarity(a, x) for x in others]
    assert same > 0.85
    assert same > max(different) + 0.1


def test_deterministic(analyzer, astronaut):
    e1 = analyzer.detect(astronaut)[0].embedding
    e2 = analyzer.detect(astronaut.copy())[0].embedding
    np.testing.assert_array_equal(e1, e2)


def test_alignment_puts_landmarks_on_the_arcface_template(analyzer, astronaut):
    face = analyzer.detect(astronaut)[0]
    crop = analyzer.align(astronaut, face.kps)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    # Same transform as insightface's reference (skimage SimilarityTransform + warpAffine).
    from insightface.utils import face_align

    ref = face_align.norm_crop(np.asarray(astronaut), face.kps)
    assert np.abs(crop.astype(int) - ref.astype(int)).mean() < 1.0
    # A pure similarity transform of the template maps back onto it exactly.
    theta = np.deg2rad(20)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]) * 2.5
    kps = ARCFACE_TEMPLATE @ rot.T + [300, 200]
    from avatar_engine.faces import alignment_matrix

    m = alignment_matrix(kps)
    back = kps @ m[:, :2].T + m[:, 2]
    np.testing.assert_allclose(back, ARCFACE_TEMPLATE, atol=1e-3)


def test_reference_photos_combined_and_several_faces_reported(analyzer, astronaut, group_photo):
    ref = analyze_reference_photos(analyzer, [astronaut, perturb(astronaut)])
    assert ref.embedding.shape == (512,)
    assert np.linalg.norm(ref.embedding) == pytest.approx(1.0, abs=1e-5)
    assert ref.faces_per_photo == [1, 1] and not ref.multiple_faces and ref.notes == []
    assert ref.consistency > 0.9
    group = analyze_reference_photos(analyzer, [group_photo], param="characters[1].photos")
    assert group.faces_per_photo[0] >= 4 and group.multiple_faces
    assert group.used_faces[0] is not None
    assert group.used_faces[0].area == max(f.area for f in analyzer.detect(group_photo))
    assert "characters[1].photos[0]" in group.notes[0] and "largest" in group.notes[0]


def test_too_small_face_is_a_clear_error(analyzer, astronaut):
    with pytest.raises(NoFaceError, match="too small") as e:
        analyze_reference_photos(analyzer, [astronaut], min_face_size=200)
    assert e.value.param == "photos[0]"


def test_identity_helpers():
    rng = np.random.default_rng(3)
    embs = [rng.standard_normal(512).astype(np.float32) * s for s in (1.0, 5.0, 0.1)]
    c = combine_embeddings(embs)
    assert c.dtype == np.float32 and np.linalg.norm(c) == pytest.approx(1.0, abs=1e-6)
    # mean of the *normed* vectors: a photo's scale does not weigh more
    normed = [e / np.linalg.norm(e) for e in embs]
    np.testing.assert_allclose(c, np.mean(normed, 0) / np.linalg.norm(np.mean(normed, 0)), atol=1e-6)
    assert cosine_similarity(embs[0], embs[0] * 3) == pytest.approx(1.0)
    assert cosine_similarity(embs[0], -embs[0]) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        combine_embeddings([])
    small = Face((0, 0, 10, 10), np.zeros((5, 2)), 0.9)
    big = Face((0, 0, 50, 40), np.zeros((5, 2)), 0.5)
    assert largest_face([small, big]) is big and largest_face([]) is None


def test_unknown_backend_names_the_field():
    with pytest.raises(ProfileError) as e:
        face_analyzer_from_config("dlib")
    assert e.value.param == "faceBackend" and "embedded" in e.value.message


def test_cascade_fallback_detector(astronaut):
    fa = face_analyzer_from_config("embedded", detector="cascade")
    faces = fa.detect(astronaut)
    assert len(faces) == 1
    x0, y0, x1, y1 = faces[0].bbox
    assert 150 < x0 < 200 and 250 < x1 < 290 and 40 < y0 < 90 and 140 < y1 < 190
    assert fa.detect(Image.fromarray(skimage_data.coffee())) == []


# --------------------------------------------------------------------------- insightface path

def test_insightface_missing_models_says_what_to_download(tmp_path):
    pytest.importorskip("insightface")
    with pytest.raises(ProfileError) as e:
        face_analyzer_from_config("insightface", model_root=str(tmp_path), name="buffalo_l")
    msg = e.value.message
    assert "det_10g.onnx" in msg and "w600k_r50.onnx" in msg
    assert os.path.join(str(tmp_path), "models", "buffalo_l") in msg
    assert not any(tmp_path.iterdir())  # nothing was downloaded or created


def test_insightface_backend_runs_real_insightface_code(tmp_path, analyzer, astronaut):
    pytest.importorskip("insightface")
    import onnxruntime
    from insightface.utils import face_align

    from helpers_faces import export_tiny_pack

    ref = analyzer.detect(astronaut)[0]
    det_scale = 640 / 512  # insightface letterboxes the 512×512 photo into its 640×640 input
    box_det = np.array(ref.bbox) * det_scale
    kps_det = ref.kps * det_scale
    pack = tmp_path / "models" / "buffalo_l"
    _, rec_path = export_tiny_pack(str(pack), box_det, kps_det)

    fa = face_analyzer_from_config("insightface", model_root=str(tmp_path), name="buffalo_l",
                                   providers=["CPUExecutionProvider"])
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.model_zoo.scrfd import SCRFD

    assert isinstance(fa.detector, SCRFD) and isinstance(fa.recognizer, ArcFaceONNX)
    faces = fa.detect(astronaut)
    assert len(faces) == 1
    f = faces[0]
    np.testing.assert_allclose(f.bbox, ref.bbox, atol=0.5)
    np.testing.assert_allclose(f.kps, ref.kps, atol=0.5)
    assert f.det_score > 0.99
    assert f.embedding.shape == (512,) and np.linalg.norm(f.embedding) == pytest.approx(1.0, abs=1e-5)

    # Independent reference: BGR aligned crop, (x-127.5)/127.5, RGB channel order into the model.
    bgr = np.asarray(astronaut)[..., ::-1]
    crop = face_align.norm_crop(np.ascontiguousarray(bgr), f.kps)[..., ::-1].astype(np.float32)
    blob = ((crop - 127.5) / 127.5).transpose(2, 0, 1)[None]
    sess = onnxruntime.InferenceSession(rec_path, providers=["CPUExecutionProvider"])
    expected = sess.run(None, {"input.1": blob})[0][0]
    assert cosine_similarity(f.embedding, expected) > 0.9999
    # Wrong channel order would give a measurably different vector: the check can fail.
    wrong = sess.run(None, {"input.1": blob[:, ::-1].copy()})[0][0]
    assert cosine_similarity(f.embedding, wrong) < 0.9999

    # The insightface backend can score too: ArcFace embeddings, cosine verdict.
    from avatar_engine.faces.scoring import scorer_from_config

    arc = scorer_from_config("arcface", analyzer=fa)
    assert arc.name == "arcface" and arc.recognition_model and arc.metric == "cosine-distance"
    (scored,) = arc.describe(astronaut)
    np.testing.assert_allclose(scored.descriptor, f.embedding)
    m = arc.compare(scored.descriptor, f.embedding)
    assert m.same and m.similarity == pytest.approx(1.0, abs=1e-4) and arc.info()["verdict"] == "cosine similarity > 0.35"

    # The same analyzer drives the identity policy.
    ident = analyze_reference_photos(fa, [astronaut])
    assert ident.faces_per_photo == [1]
    # det_thresh reaches insightface's SCRFD: above the planted score (sigmoid(8)) nothing is found.
    strict = face_analyzer_from_config("insightface", model_root=str(tmp_path), det_thresh=0.9999,
                                       providers=["CPUExecutionProvider"])
    with pytest.raises(NoFaceError) as e:
        analyze_reference_photos(strict, [astronaut], param="photos")
    assert e.value.param == "photos[0]"


# --------------------------------------------------------------------------- scoring (dlib)

def edited_copies(img: Image.Image) -> dict[str, Image.Image]:
    """One photo of one person, edited the ways users' photos differ."""
    import io

    from PIL import ImageOps

    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=40)
    return {"rescaled": img.resize((300, 300), Image.BICUBIC), "jpeg": Image.open(io.BytesIO(buf.getvalue())).convert("RGB"),
            "darkened": ImageEnhance.Brightness(img).enhance(0.5), "mirrored": ImageOps.mirror(img)}


@pytest.fixture(scope="module")
def dlib_scorer():
    from face_support import require_dlib

    require_dlib()
    from avatar_engine.faces.scoring import default_scorer

    return default_scorer()


def test_dlib_scorer_separates_people_on_real_photos(dlib_scorer, astronaut, group_photo):
    """The calibrated verdict on the bundled real faces: every edited copy of the astronaut is
    the same person (L2 < 0.6), every pair of the six people of t1.jpg and the astronaut is not."""
    s = dlib_scorer
    assert s.name == "dlib-resnet" and s.recognition_model and s.metric == "l2" and s.threshold == 0.6
    assert s.detector == "mtcnn"  # the embedded detector when its weights are installed
    ref = s.describe(astronaut)
    assert len(ref) == 1 and ref[0].descriptor.shape == (128,)
    a = ref[0].descriptor
    for name, img in edited_copies(astronaut).items():
        m = s.compare(a, s.describe(img)[0].descriptor)
        assert m.same and m.distance < 0.35 and m.similarity > 0.98, (name, m)
    people = [a] + [f.descriptor for f in s.describe(group_photo)]
    assert len(people) == 7
    for i, j in itertools.combinations(range(7), 2):
        m = s.compare(people[i], people[j])
        assert not m.same and m.distance > 0.6, (i, j, m)
    info = s.info()
    assert info["name"] == "dlib-resnet" and info["fallback"] is False and "0.6" in info["verdict"]


def test_dlib_scorer_with_dlib_detector(astronaut):
    from face_support import require_dlib

    require_dlib()
    from avatar_engine.faces.scoring import scorer_from_config

    s = scorer_from_config("dlib", detector="dlib")
    assert s.detector == "dlib-hog"
    faces = s.describe(astronaut)
    assert faces and faces[0].descriptor.shape == (128,)
    x0, y0, x1, y1 = faces[0].bbox
    assert 150 < x0 < 220 and 240 < x1 < 300  # her face, the largest box
    m = s.compare(faces[0].descriptor, s.describe(edited_copies(astronaut)["darkened"])[0].descriptor)
    assert m.same
    assert s.describe(Image.fromarray(skimage_data.coffee())) == []


def test_dlib_model_files_located_by_path_and_never_the_68_point_model(dlib_scorer):
    from avatar_engine.faces.scoring import DLIB_MODEL_FILES, dlib_model_dir

    folder = dlib_model_dir()
    assert folder is not None and os.path.isfile(os.path.join(folder, "dlib_face_recognition_resnet_model_v1.dat"))
    assert "shape_predictor_5_face_landmarks.dat" in DLIB_MODEL_FILES.values()
    assert not any("68" in f for f in DLIB_MODEL_FILES.values())  # iBUG-300W: non-commercial


def test_reference_check_names_the_odd_photo(dlib_scorer, astronaut, group_photo):
    from avatar_engine.errors import IdentityMismatchError
    from avatar_engine.faces.scoring import check_same_person

    s = dlib_scorer
    a = [s.describe(img)[0].descriptor for img in [astronaut, *edited_copies(astronaut).values()]]
    others = [f.descriptor for f in s.describe(group_photo)]
    ok = check_same_person(s, a)
    assert ok.consistent and ok.enforced and ok.kept == list(range(5)) and ok.dropped == []
    assert all(m.same for m in ok.matches) and ok.consistency > 0.98
    assert ok.reference.shape == (128,)
    with pytest.raises(IdentityMismatchError) as e:
        check_same_person(s, [a[0], a[1], others[0], a[2]], param="characters[1].photos")
    assert e.value.param == "characters[1].photos[2]" and e.value.code == "invalid_request"
    assert "does not show the same person" in e.value.message and "0.6" in e.value.message
    with pytest.raises(IdentityMismatchError) as e:  # two photos, two people: the later one is named
        check_same_person(s, [a[0], others[1]])
    assert e.value.param == "photos[1]"
    dropped = check_same_person(s, [a[0], others[0], a[1]], policy="drop")
    assert dropped.kept == [0, 2] and dropped.dropped == [1] and dropped.consistent
    assert "photos[1] was dropped" in dropped.notes[0]
    with pytest.raises(IdentityMismatchError, match="too many"):  # no majority: refused even with drop
        check_same_person(s, [a[0], others[0], others[1]], policy="drop")
    unscored = check_same_person(s, [a[0], None, a[1]])
    assert unscored.unscored == [1] and unscored.kept == [0, 2] and "not checked" in unscored.notes[0]


def test_fallback_scorer_is_labelled_and_never_enforced(analyzer, astronaut, group_photo, monkeypatch):
    from avatar_engine.faces import scoring

    monkeypatch.setattr(scoring, "dlib_available", lambda: False)
    s = scoring.scorer_from_config("auto", analyzer=analyzer)
    assert s.name == "handcrafted-hog-lbp" and not s.recognition_model and s.info()["fallback"] is True
    assert "not a face-recognition model" in s.label
    a = s.describe(astronaut)[0].descriptor
    b = s.describe(group_photo)[0].descriptor
    check = scoring.check_same_person(s, [a, b])  # may disagree, but is only noted
    assert check.enforced is False and check.dropped == []
    with pytest.raises(ProfileError) as e:
        scoring.scorer_from_config("sift")
    assert e.value.param == "faceScorer"
    with pytest.raises(ProfileError, match="insightface"):
        scoring.scorer_from_config("arcface", analyzer=analyzer)
