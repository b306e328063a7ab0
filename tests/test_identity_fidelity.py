"""benchmarks/identity_fidelity.py stays alive: the tiny profile through percify and cast (numbers
meaningless there: the tiny model draws no faces), a user's identities folder, and the FaceSim
arithmetic on outputs that do hold the person's face."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import identity_fidelity as bench  # noqa: E402
from face_support import require_dlib  # noqa: E402

TINY = ["--models", "tiny-sd15", "--steps", "2", "--prompts", "1", "--strengths", "0.8", "--clip", "none",
        "--threads", "2"]


def _last_json(capsys) -> dict:
    out = capsys.readouterr()
    return json.loads(out.out.strip().splitlines()[-1]), out.err


def test_tiny_profile_prints_the_table_and_json(capsys, tiny_engine):
    require_dlib()
    result = bench.main(TINY + ["--max-identities", "2", "--cast-pairs", "1"], engine=tiny_engine)
    last, table = _last_json(capsys)
    assert last == json.loads(json.dumps(result))
    assert last["scorer"] == "dlib-resnet" and last["identities"] == 2
    rows = {(r["method"], r["task"]): r for r in last["rows"]}
    assert set(rows) == {(m, t) for m in ("faceid", "faceid-plus-v2") for t in ("percify", "cast")}
    assert all(r["images"] == 2 and r["model"] == "tiny-sd15" for r in rows.values())
    for r in last["rows"]:
        assert r["faceRate"] is not None and 0.0 <= r["faceRate"] <= 1.0 and r["clipT"] is None
    assert "FaceSim" in table and "IP-Adapter FaceID  FaceSim 0.619" in table and "CLIP-T n/a" in table
    assert "faceid-plus-v2" in table


def test_tiny_sdxl_instantid_rows(capsys, tiny_engine):
    """InstantID on the tiny SDXL profile: IdentityNet + IP-Adapter through percify and cast."""
    require_dlib()
    argv = [a if a != "tiny-sd15" else "tiny-sdxl" for a in TINY]
    bench.main(argv + ["--methods", "instantid", "--max-identities", "2", "--cast-pairs", "1"], engine=tiny_engine)
    last, table = _last_json(capsys)
    rows = {(r["model"], r["method"], r["task"]): r for r in last["rows"]}
    assert set(rows) == {("tiny-sdxl", "instantid", "percify"), ("tiny-sdxl", "instantid", "cast")}
    assert all(r["images"] == 2 and 0.0 <= r["faceRate"] <= 1.0 for r in rows.values())
    assert "instantid" in table


def test_identities_folder_and_facesim_on_real_faces(tmp_path, capsys, monkeypatch, tiny_engine):
    """A user's folder (one subfolder per person). The tiny model draws no faces, so the
    pipeline's output is replaced by the person's own photo: FaceSim must then be ~1 and the
    verdict 'same' for every image — the harness's arithmetic on real faces."""
    require_dlib()
    import skimage.data

    from avatar_engine.tasks import PercifyTask

    me = tmp_path / "people" / "astronaut"
    me.mkdir(parents=True)
    astronaut = Image.fromarray(skimage.data.astronaut())
    astronaut.save(me / "a.jpg", quality=92)
    astronaut.resize((300, 300)).save(me / "b.png")
    (tmp_path / "people" / "empty").mkdir()
    assert list(bench.load_identities(str(tmp_path / "people"))) == ["astronaut"]

    monkeypatch.setattr(PercifyTask, "run", lambda self, model, requests, items, callback: [astronaut] * len(items))
    bench.main(TINY + ["--identities", str(tmp_path / "people"), "--cast-pairs", "0", "--methods", "faceid"],
               engine=tiny_engine)
    last, _ = _last_json(capsys)
    (row,) = last["rows"]
    assert row["images"] == 1 and row["faceRate"] == 1.0 and row["sameRate"] == 1.0
    assert row["faceSim"] > 0.98 and row["faceSimStd"] == 0.0
    with pytest.raises(SystemExit):
        bench.load_identities(str(tmp_path / "nowhere"))
