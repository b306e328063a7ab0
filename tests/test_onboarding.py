"""`models pull` plans, the hub-cache "already present" path and `doctor` verdicts — offline
(HF_HUB_OFFLINE=1, conftest), with a temp cache laid out as huggingface_hub's and faked device facts."""
from __future__ import annotations

import json
import os

import pytest

from avatar_engine import cli
from avatar_engine.config import load_profiles
from avatar_engine.runtime.doctor import GB, DeviceFacts, bytes_for_batch, diagnose, max_batch_that_fits, memory_table
from avatar_engine.errors import ProfileError
from avatar_engine.runtime.hub import (HubItem, cached_snapshot, config_patterns, hub_status, matched_files, pull_item,
                               pull_plan)

PROFILES = load_profiles()
COMMIT = "0123456789abcdef0123456789abcdef01234567"
H200 = DeviceFacts(cuda=True, name="fake H200", driver="13.0", total_bytes=int(141 * GB), available_bytes=int(139 * GB))


def _fill_cache(cache, repo_id: str, files: list[str], commit: str = COMMIT) -> None:
    """A repository in the hub cache layout: blobs, snapshots/<commit>/<file> links, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for i, name in enumerate(files):
        blob = repo / "blobs" / f"blob{i}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(b"x")
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)


def _concrete(pattern: str) -> str:
    return pattern.replace("*.json", "tokenizer_config.json").replace("*.txt", "merges.txt")


def _hub_files(plan) -> dict[str, set[str]]:
    return {item.repo_id: set(item.patterns) for item in plan.hub}


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile_has_a_plan_that_names_its_weights(name):
    profile = PROFILES[name]
    plan = pull_plan(profile)
    if profile.tiny or profile.random_weights:
        assert plan.empty
        return
    files = _hub_files(plan)
    pipeline = files[profile.repo_id]
    suffix = f".{profile.variant}" if profile.variant else ""
    assert f"unet/diffusion_pytorch_model{suffix}.safetensors" in pipeline
    assert f"vae/diffusion_pytorch_model{suffix}.safetensors" in pipeline
    assert f"text_encoder/model{suffix}.safetensors" in pipeline and "model_index.json" in pipeline
    assert (f"text_encoder_2/model{suffix}.safetensors" in pipeline) == (profile.architecture == "sdxl")
    for method, src in profile.identity_methods.items():
        assert src.weight_name in files[src.repo_id], method
    for item in plan.hub:
        assert len(item.patterns) == len(set(item.patterns))  # FaceID and Plus v2 share one repo item
    assert [m.name for m in plan.manual] == sorted({"insightface buffalo_l"} | (
        {"insightface antelopev2"} if "instantid" in profile.identity_methods else set()), reverse=True)


def test_method_specific_files():
    sdxl = _hub_files(pull_plan(PROFILES["sdxl"]))
    assert sdxl["InstantX/InstantID"] == {"ip-adapter.bin", "ControlNetModel/config.json",
                                          "ControlNetModel/diffusion_pytorch_model.safetensors"}
    assert sdxl["laion/CLIP-ViT-H-14-laion2B-s32B-b79K"] == {"config.json", "preprocessor_config.json",
                                                             "model.safetensors"}
    assert sdxl["h94/IP-Adapter-FaceID"] == {"ip-adapter-faceid_sdxl.bin", "ip-adapter-faceid-plusv2_sdxl.bin"}
    only = pull_plan(PROFILES["sdxl"], ["faceid"])
    assert set(_hub_files(only)) == {"stabilityai/stable-diffusion-xl-base-1.0", "h94/IP-Adapter-FaceID"}
    assert [m.name for m in only.manual] == ["insightface buffalo_l"]
    with pytest.raises(ProfileError, match="instantid"):
        pull_plan(PROFILES["sd15"], ["instantid"])
    assert "feature_extractor/preprocessor_config.json" in _hub_files(pull_plan(PROFILES["sd15"]))[
        "stable-diffusion-v1-5/stable-diffusion-v1-5"]
    assert not any(p.endswith(".safetensors") for p in config_patterns("sdxl"))


def test_already_present_files_are_found_in_the_hub_cache_layout(tmp_path):
    plan = pull_plan(PROFILES["sd15"], ["faceid"])
    for item in plan.hub:
        _fill_cache(tmp_path, item.repo_id, [_concrete(p) for p in item.patterns])
    for item in plan.hub:
        status = pull_item(item, cache_dir=tmp_path)  # offline: would raise if it tried the network
        assert status.state == "present"
        assert status.snapshot == tmp_path / f"models--{item.repo_id.replace('/', '--')}" / "snapshots" / COMMIT
        assert {p.relative_to(status.snapshot).as_posix() for p in status.files} == {
            _concrete(p) for p in item.patterns}


def test_a_partial_cache_names_what_is_missing_and_offline_does_not_download(tmp_path):
    item = HubItem("h94/IP-Adapter-FaceID", ("ip-adapter-faceid_sdxl.bin", "ip-adapter-faceid-plusv2_sdxl.bin"),
                   ("faceid weights",))
    _fill_cache(tmp_path, item.repo_id, ["ip-adapter-faceid_sdxl.bin"])
    snap, found, missing = hub_status(item, tmp_path)
    assert [p.name for p in found] == ["ip-adapter-faceid_sdxl.bin"] and missing == ["ip-adapter-faceid-plusv2_sdxl.bin"]
    with pytest.raises(ProfileError, match="HF_HUB_OFFLINE.*plusv2"):
        pull_item(item, cache_dir=tmp_path)
    assert cached_snapshot("h94/IP-Adapter-FaceID", COMMIT, tmp_path) == snap  # a commit pins the snapshot
    assert cached_snapshot("h94/IP-Adapter-FaceID", "v2", tmp_path) is None
    assert matched_files(item, None) == ([], list(item.patterns))


def test_doctor_on_the_embedded_default_passes_the_tiny_profiles(capsys):
    assert cli.main(["doctor", "--profile", "tiny-sd15", "--profile", "tiny-sdxl"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [ln.split(":")[0] for ln in out[1:]] == ["ok   tiny-sd15", "ok   tiny-sdxl"]
    assert cli.main(["doctor"]) == 1  # real profiles lack files (and a GPU) here
    lines = capsys.readouterr().out.splitlines()[1:]
    assert len(lines) == len(PROFILES)
    assert any(ln.startswith("FAIL sd15: missing files") and "models pull sd15" in ln for ln in lines)


def test_doctor_json_carries_the_same_facts(capsys):
    assert cli.main(["doctor", "--json", "--profile", "tiny-sd15,sd15"]) == 1
    doc = json.loads(capsys.readouterr().out)
    by = {p["profile"]: p for p in doc["profiles"]}
    assert doc["ready"] is False and by["tiny-sd15"]["status"] == "ready"
    assert by["sd15"]["status"] == "missing files" and "h94/IP-Adapter-FaceID" in by["sd15"]["non_commercial"]
    assert cli.main(["doctor", "--profile", "nope"]) == 2


def _everything_cached(tmp_path, profile, pack_root=None, pack="buffalo_l"):
    plan = pull_plan(profile)
    for item in plan.hub:
        _fill_cache(tmp_path, item.repo_id, [_concrete(p) for p in item.patterns])
    if pack_root:
        from avatar_engine.faces.insightface_backend import KNOWN_PACKS

        folder = pack_root / "models" / pack
        folder.mkdir(parents=True)
        for f in KNOWN_PACKS[pack]:
            (folder / f).write_bytes(b"onnx")


def test_doctor_verdicts_with_faked_device_facts(tmp_path, monkeypatch):
    monkeypatch.setattr("avatar_engine.runtime.doctor.importlib.util.find_spec", lambda name: object())
    sd15 = PROFILES["sd15"]
    cache, packs = tmp_path / "hub", tmp_path / "insightface"
    _everything_cached(cache, sd15, packs)
    kw = dict(cache_dir=str(cache), face_model_root=str(packs))
    embedded = diagnose(sd15, H200, **kw)
    assert embedded.status == "backend unusable" and "ArcFace" in embedded.line
    ready = diagnose(sd15, H200, face_backend="insightface", **kw)
    assert ready.ready and ready.status == "ready" and "non-commercial" in ready.line and ready.max_batch >= 16
    cpu = diagnose(sd15, DeviceFacts(cuda=False), face_backend="insightface", **kw)
    assert cpu.status == "no GPU" and not cpu.ready
    small = DeviceFacts(cuda=True, name="fake 6 GB", driver="12.4", total_bytes=int(6 * GB),
                        available_bytes=int(5.5 * GB))
    tight = diagnose(sd15, small, batch=8, face_backend="insightface", **kw)
    assert tight.status == "not enough GPU memory" and "batch 8" in tight.line
    assert 1 <= tight.max_batch < 8 and tight.needs_bytes > small.available_bytes
    no_pack = diagnose(sd15, H200, face_backend="insightface", cache_dir=str(cache), face_model_root=str(tmp_path / "x"))
    assert no_pack.status == "missing files" and any("w600k_r50.onnx" in m for m in no_pack.missing)


def test_memory_arithmetic_is_monotonic_and_consistent():
    for name in ("sd15", "sdxl", "sdxl-turbo"):
        p = PROFILES[name]
        needs = [bytes_for_batch(p, b) for b in (1, 2, 4, 8)]
        assert needs == sorted(needs) and needs[0] > 2 * GB
        fits = max_batch_that_fits(p, needs[2] / 0.85 + 1)  # exactly room for batch 4 within the headroom
        assert fits >= 4 and max_batch_that_fits(p, needs[0] * 0.5) == 0
    assert bytes_for_batch(PROFILES["sdxl"], 1) > bytes_for_batch(PROFILES["sdxl-turbo"], 1)  # 1024² vs 512²
    rows = {r["profile"]: r for r in memory_table(PROFILES)}
    assert "tiny-sd15" not in rows and rows["sdxl"]["batch_4"] > rows["sd15"]["batch_4"]
