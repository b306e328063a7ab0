"""models.yaml parsing and the errors that tell a user what to do."""
import textwrap

import pytest

from avatar_engine import AvatarEngine, EngineConfig, GenerationRequest, ProfileError, RequestValidationError, load_profiles
from avatar_engine.config import parse_profiles


def test_shipped_profiles_parse():
    profiles = load_profiles()
    assert {"tiny-sd15", "tiny-sdxl", "sd15", "sdxl", "sdxl-turbo"} <= set(profiles)
    sd15 = profiles["sd15"]
    assert sd15.repo_id and sd15.ip_adapter and sd15.ip_adapter.weight_name
    assert profiles["tiny-sd15"].tiny and profiles["tiny-sd15"].ip_adapter.tiny
    assert profiles["sdxl-turbo"].steps <= 4


def test_unknown_key_is_rejected_with_name():
    with pytest.raises(ProfileError, match="colour"):
        parse_profiles({"profiles": {"x": {"architecture": "sd15", "tiny": True, "colour": 1}}})


def test_bad_architecture_and_missing_source():
    with pytest.raises(ProfileError, match="architecture"):
        parse_profiles({"profiles": {"x": {"architecture": "sd3", "tiny": True}}})
    with pytest.raises(ProfileError, match="repo_id"):
        parse_profiles({"profiles": {"x": {"architecture": "sd15"}}})


def test_unknown_profile_lists_known_ones():
    engine = AvatarEngine(EngineConfig(device="cpu"))
    with pytest.raises(RequestValidationError) as err:
        engine.generate(GenerationRequest(prompt="a", model="sd9"))
    assert err.value.param == "model"
    assert "tiny-sd15" in err.value.message and "sdxl" in err.value.message


def test_missing_local_path_says_what_to_put_there(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(textwrap.dedent(f"""
        default: mine
        profiles:
          mine: {{architecture: sd15, local_path: {tmp_path / 'nope'}, repo_id: org/model, resolution: 512}}
    """))
    engine = AvatarEngine(EngineConfig(device="cpu", profiles_path=str(path)))
    with pytest.raises(ProfileError) as err:
        engine.load("mine")
    assert "does not exist" in err.value.message and "model_index.json" in err.value.message


def test_unreachable_hub_names_files_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "models.yaml"
    path.write_text("default: real\nprofiles:\n  real: {architecture: sd15, repo_id: example-org/not-cached-model}\n")
    engine = AvatarEngine(EngineConfig(device="cpu", profiles_path=str(path)))
    with pytest.raises(ProfileError) as err:
        engine.load("real")
    assert "huggingface-cli download example-org/not-cached-model" in err.value.message


def test_aliases_resolve_to_their_profile_and_must_be_unique():
    profiles = load_profiles()
    assert set(profiles["tiny-sd15"].aliases) >= {"flux", "imagen3", "reality4"}  # Percify's names
    engine = AvatarEngine(EngineConfig(device="cpu"))
    assert engine.profile("flux").name == "tiny-sd15" and engine.profile("tiny-sd15").name == "tiny-sd15"
    with pytest.raises(RequestValidationError):
        engine.profile("dall-e")
    tiny = {"architecture": "sd15", "tiny": True}
    with pytest.raises(ProfileError, match="'flux' is declared by both 'a' and 'b'"):
        parse_profiles({"profiles": {"a": {**tiny, "aliases": ["flux"]}, "b": {**tiny, "aliases": ["flux"]}}})
    with pytest.raises(ProfileError, match="alias 'b' of profile 'a' is itself a profile name"):
        parse_profiles({"profiles": {"a": {**tiny, "aliases": ["b"]}, "b": tiny}})
    with pytest.raises(ProfileError, match="aliases"):
        parse_profiles({"profiles": {"a": {**tiny, "aliases": "flux"}}})


def test_identity_methods_per_profile():
    profiles = load_profiles()
    assert profiles["tiny-sd15"].offered_identity_methods == ("faceid", "faceid-plus-v2")
    assert profiles["tiny-sdxl"].offered_identity_methods == ("faceid", "instantid")
    sdxl = profiles["sdxl"]
    assert sdxl.offered_identity_methods == ("faceid", "faceid-plus-v2", "instantid")
    assert sdxl.identity_methods["instantid"].repo_id == "InstantX/InstantID"
    assert sdxl.identity_methods["instantid"].controlnet == "ControlNetModel"
    assert profiles["sd15"].identity_methods["faceid-plus-v2"].weight_name == "ip-adapter-faceid-plusv2_sd15.bin"
    assert sdxl.ip_adapter is sdxl.identity_methods["faceid"]  # ip_adapter: the default method's source
    alias = parse_profiles({"profiles": {"x": {"architecture": "sd15", "tiny": True,
                                               "ip_adapter": {"variant": "faceid-plusv2", "tiny": True}}}})["x"]
    assert alias.identity_method == "faceid-plus-v2"
    bad = [({"architecture": "sd15", "tiny": True, "identity_methods": {"instantid": {"tiny": True}}}, "sdxl"),
           ({"architecture": "sdxl", "tiny": True, "identity_methods": {"photomaker": {}}}, "photomaker"),
           ({"architecture": "sdxl", "tiny": True, "identity_method": "instantid",
             "identity_methods": {"faceid": {"tiny": True}}}, "identity_method")]
    for body, match in bad:
        with pytest.raises(ProfileError, match=match):
            parse_profiles({"profiles": {"x": body}})
