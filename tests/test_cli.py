"""CLI end to end on the tiny model, and resumable batch generation."""
import json

import pytest
from PIL import Image

from avatar_engine import AvatarEngine, EngineConfig
from avatar_engine.batch import generate_batch, read_jsonl
from avatar_engine.cli import main
from avatar_engine.errors import RequestValidationError


def test_generate_writes_pngs_and_sidecar(tmp_path, capsys):
    rc = main(["generate", "portrait of a pilot", "--style", "anime", "--aspect-ratio", "16:9", "--seed", "42",
               "--batch-size", "2", "--steps", "4", "-o", str(tmp_path)])
    assert rc == 0
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 2 and Image.open(pngs[0]).size == (80, 48)
    meta = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert meta["seed"] == 42 and meta["seeds"] == [42, 43] and meta["model"] == "tiny-sd15"
    assert meta["stylePreset"] == "anime" and meta["files"] == [p.name for p in pngs]
    assert "generationMs" in meta["timings"]


def test_invalid_flag_value_is_one_line_error(tmp_path, capsys):
    assert main(["generate", "x", "--seed", "-3", "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error (seed):") and "Traceback" not in err


def test_models_lists_profiles(capsys):
    assert main(["models", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tiny-sd15"]["default"] is True and "sdxl" in data


def write_jsonl(path, lines):
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")


def test_batch_is_resumable(tmp_path):
    jsonl = tmp_path / "prompts.jsonl"
    write_jsonl(jsonl, [{"id": f"r{i}", "prompt": f"face {i}", "seed": i, "steps": 3} for i in range(4)])
    out = tmp_path / "out"
    engine = AvatarEngine(EngineConfig(device="cpu"))
    first = generate_batch(engine, jsonl, out, chunk_size=3, show_progress=False)
    assert (first.generated, first.skipped) == (4, 0)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    # A crash after r1: its sidecar is gone, so only r1 is redone.
    (out / "r1.json").unlink()
    second = generate_batch(engine, jsonl, out, show_progress=False)
    assert (second.generated, second.skipped) == (1, 3)
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert after["r0_0.png"] == before["r0_0.png"] and after["r1_0.png"] != before["r1_0.png"]
    assert json.loads((out / "r2.json").read_text())["seed"] == 2


def test_batch_cli_and_bad_line(tmp_path, capsys):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('"just a prompt"\n{"prompt": "x", "steps": 2, "seed": 1}\n')
    assert main(["batch", str(jsonl), "-o", str(tmp_path / "o"), "-q"]) == 0
    assert len(list((tmp_path / "o").glob("*.json"))) == 2
    jsonl.write_text('{"prompt": "x"}\n{"prompt": "y", "batchSize": 9}\n')
    with pytest.raises(RequestValidationError) as err:
        read_jsonl(jsonl)
    assert ":2:" in err.value.message and err.value.param == "batchSize"
