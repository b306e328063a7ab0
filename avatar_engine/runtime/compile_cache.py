"""Compiled artifacts kept across restarts: a replica that restarts loads what an earlier run
compiled instead of compiling every graph again.

PyTorch's portable compile cache (`torch.compiler.save_cache_artifacts()` /
`load_cache_artifacts()`: inductor's FX graph cache, AOTAutograd's cache and the autotuning
results in one blob) is written after warm-up to `<compile_cache_dir>/<profile>-<key>.bin` and
loaded before compiling. The key hashes everything a compiled graph depends on (torch version,
device, dtype, the profile's speed options and model source), so a changed option or another
GPU never loads a stale blob; a blob that fails to load is logged and ignored (compiling is
always correct). Ship the directory with the model cache (README "Cold start").
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch

from ..config import ModelProfile

log = logging.getLogger(__name__)


def cache_key(profile: ModelProfile, device: torch.device, dtype: torch.dtype) -> str:
    """A short hash of what the compiled graphs depend on."""
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    facts = {"torch": torch.__version__, "device": device_name, "dtype": str(dtype),
             "speed": dataclasses.asdict(profile.speed), "architecture": profile.architecture,
             "source": profile.source, "resolution": profile.resolution,
             "identity_methods": list(profile.offered_identity_methods)}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_path(directory: str, profile: ModelProfile, device: torch.device, dtype: torch.dtype) -> Path:
    return Path(directory) / f"{profile.name}-{cache_key(profile, device, dtype)}.bin"


def load_artifacts(path: Path) -> dict:
    """Load a saved blob into this process's compile caches (before compiling). Returns what
    happened, for the warm-up report."""
    if not path.is_file():
        return {"file": str(path), "loaded": False, "reason": "no saved artifacts"}
    t0 = time.perf_counter()
    try:
        info = torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - a broken or foreign blob: compile instead
        log.warning("compile cache %s not loaded (%s: %s); compiling", path, type(exc).__name__, exc)
        return {"file": str(path), "loaded": False, "reason": f"{type(exc).__name__}: {exc}"[:200]}
    return {"file": str(path), "loaded": info is not None, "loadSeconds": round(time.perf_counter() - t0, 3),
            "bytes": path.stat().st_size, "artifacts": _artifact_counts(info)}


def save_artifacts(path: Path) -> dict:
    """Write this process's compile artifacts (after warm-up) atomically; nothing is written
    when nothing was compiled by a caching backend (eager / aot_eager)."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return {"saved": False, "reason": "no compile artifacts (backend without code generation)"}
    blob, info = saved
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(blob)
    os.replace(tmp, path)
    return {"saved": True, "bytes": len(blob), "artifacts": _artifact_counts(info)}


def _artifact_counts(info) -> dict:
    """Artifacts per kind (inductor graphs, AOTAutograd entries, autotune results) of a
    save/load info object."""
    if info is None:
        return {}
    return {kind: len(names) for kind, names in getattr(info, "artifacts", {}).items()}
