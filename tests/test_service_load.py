"""`benchmarks/service_load.py` stays alive: a tiny run against the real app (SQLite) prints its
ceiling and overhead figures (values are measured by the benchmark, never asserted here)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parent.parent


def test_service_load_prints_ceiling_and_overhead():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "service_load.py"), "--stores", "sqlite",
                          "-n", "8", "-c", "4", "--ceiling-runs", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["ceiling_512_images_per_s"] > 0 and out["ceiling_1024_images_per_s"] > 0
    assert out["stores"][0]["gpu_like"]["direct"]["images_per_s"] > 0
    assert set(out["encode_ms_per_image"]) == {"512x512", "1024x1024"}
    assert "ceiling 512²" in run.stderr and "overhead" in run.stderr
