"""The service's face settings (serve/face_settings.py): carried into the engine config, reported
by /v1/health through the real app, and a backend that cannot condition trained identity weights
refused at start (before any weights load, so no weights are needed here)."""
from __future__ import annotations

import pytest

from avatar_engine.config import load_profiles
from avatar_engine.faces.compat import arcface_mismatch, trained_identity_methods
from serve import cli as serve_cli
from serve import engine_client
from serve.face_settings import FaceSetupError, check_face_setup
from serve.settings import ServiceSettings

from test_api import Harness


def _settings(tmp_path, **over) -> ServiceSettings:
    return ServiceSettings.from_dict({"data_dir": str(tmp_path), "device": "cpu", **over}, env=False)


def build_engine(settings):
    """The engine a model replica would serve with these settings (face check included)."""
    return engine_client.build_engine(settings).engine


def test_trained_identity_weights_are_told_apart_from_tiny_ones():
    profiles = load_profiles()
    assert trained_identity_methods(profiles["sd15"]) == ["faceid", "faceid-plus-v2"]
    assert trained_identity_methods(profiles["sdxl"]) == ["faceid", "faceid-plus-v2", "instantid"]
    for tiny in ("tiny-sd15", "tiny-sdxl", "sd15-random", "sdxl-random"):
        assert trained_identity_methods(profiles[tiny]) == [], tiny
        assert arcface_mismatch(profiles[tiny], "embedded") is None
    assert arcface_mismatch(profiles["sd15"], "insightface") is None
    assert "ArcFace" in arcface_mismatch(profiles["sd15"], "embedded")


def test_health_reports_the_face_settings_the_engine_was_built_with(tmp_path):
    over = {"models": ["tiny-sd15"], "face_scorer": "handcrafted", "face_model_name": "antelopev2"}
    engine = build_engine(_settings(tmp_path, **over))
    assert (engine.config.face_backend, engine.config.face_scorer, engine.config.face_model_name) == \
        ("embedded", "handcrafted", "antelopev2")
    assert engine.loaded() == ["tiny-sd15"]
    h = Harness(tmp_path, engine=engine, device="cpu", **over)
    try:
        resp = h.client.get("/v1/health")
        assert resp.status_code == 200, resp.text
        assert resp.json()["face"] == {"backend": "embedded", "modelName": None, "scorer": "handcrafted",
                                       "arcfaceEmbeddings": False, "nonArcfaceOverride": False}
    finally:
        h.store.close()


def test_a_real_faceid_profile_with_the_embedded_backend_is_refused_before_loading(tmp_path):
    settings = _settings(tmp_path, models=["sd15"])  # no sd15 weights here: a load would fail differently
    with pytest.raises(FaceSetupError) as caught:
        build_engine(settings)
    message = str(caught.value)
    assert "\n" not in message
    assert "'sd15'" in message and "faceid" in message and "'embedded'" in message
    assert "AVATAR_FACE_ALLOW_NON_ARCFACE" in message
    # An alias resolves to its profile before the check.
    assert check_face_setup(_settings(tmp_path, models=["flux"])) == []


def test_the_explicit_override_starts_and_health_says_so(tmp_path):
    assert check_face_setup(_settings(tmp_path, models=["sd15"], face_allow_non_arcface=True)) == ["sd15"]
    h = Harness(tmp_path, engine=build_engine(_settings(tmp_path, models=["tiny-sd15"])), device="cpu",
                face_allow_non_arcface=True)
    try:
        face = h.client.get("/v1/health").json()["face"]
        assert face["nonArcfaceOverride"] is True and face["arcfaceEmbeddings"] is False
    finally:
        h.store.close()


def test_avatar_serve_run_refuses_in_one_line_before_ray_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(serve_cli, "start_ray", lambda *a, **k: pytest.fail("Ray started despite the refusal"))
    monkeypatch.delenv("AVATAR_FACE_ALLOW_NON_ARCFACE", raising=False)
    monkeypatch.setenv("AVATAR_FACE_BACKEND", "embedded")
    code = serve_cli.main(["run", "--data-dir", str(tmp_path), "--models", "sdxl", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and err.startswith("error: profile 'sdxl'") and "instantid" in err


@pytest.mark.parametrize("field, value", [("face_backend", "dlib"), ("face_scorer", "arcfce")])
def test_bad_face_settings_name_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        _settings(tmp_path, **{field: value})
