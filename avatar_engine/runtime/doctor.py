"""`avatar-engine doctor`: can this machine serve a profile, and under which licences?

One verdict per profile from facts gathered without loading a model: the device (CUDA, driver,
memory available for work), the profile's files (hub cache / local paths / insightface pack,
from the same plan `models pull` uses), the face backend and scorer, and the memory a call of N
images needs. Memory comes from the engine's own arithmetic (memory.py: fixed + per-image bytes
from peaks at two batch sizes, `images_that_fit` within HEADROOM of the budget); since nothing is
loaded here, the peaks are the ones measured on an H200 in bf16 (README, GPU suite), the resident
weights are counted from parameter counts, and the budget is free memory minus those weights —
as the engine's probe sees it after loading. These are computed figures, not a measurement.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass, field

from ..config import ModelProfile
from ..faces.compat import arcface_mismatch, trained_identity_methods
from ..faces.scoring import dlib_available
from .hub import UNKNOWN_LICENCE, Licence, hub_status, insightface_item, licence_of, manual_missing, pull_plan
from .memory import HEADROOM, MemoryProfile, cuda_budget, fit_line, images_that_fit

GB = 1e9
#: Peak allocated bytes of one call (weights included) at two batch sizes and the probe's pixels:
#: the GPU suite on an H200, bf16, FaceID rank-128 attached (benchmarks/results/h200-2026-11-30).
REFERENCE_PEAKS = {"sd15": ({1: 2.96 * GB, 4: 4.97 * GB}, 512 * 512),
                   "sdxl": ({1: 13.12 * GB, 4: 18.93 * GB}, 1024 * 1024)}
#: Resident weights in 2-byte dtypes from parameter counts (UNet + text encoders + VAE), FaceID included.
WEIGHT_BYTES = {"sd15": (1066.3e6 * 2 + 0.05 * GB), "sdxl": (3469.0e6 * 2 + 0.54 * GB)}
#: Extra resident weights of other identity methods (parameter counts, 2 bytes each): Plus v2's
#: CLIP-ViT-H vision tower (632M) + its projection; InstantID's IdentityNet ControlNet (1.25B) +
#: Resampler IP-Adapter.
EXTRA_METHOD_BYTES = {"faceid-plus-v2": 1.35 * GB, "instantid": 3.35 * GB}


@dataclass(frozen=True)
class DeviceFacts:
    cuda: bool
    name: str | None = None
    driver: str | None = None  # CUDA runtime torch was built with
    total_bytes: int = 0
    available_bytes: int = 0  # free for new work (memory.available_for_work)


def device_facts() -> DeviceFacts:
    import torch

    if not torch.cuda.is_available():
        return DeviceFacts(cuda=False)
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    return DeviceFacts(cuda=True, name=props.name, driver=torch.version.cuda, total_bytes=int(props.total_memory),
                       available_bytes=cuda_budget(dev))


def resident_bytes(profile: ModelProfile) -> float:
    extra = sum(EXTRA_METHOD_BYTES.get(m, 0.0) for m in profile.identity_methods)
    return WEIGHT_BYTES[profile.architecture] + extra


def call_profile(profile: ModelProfile, available_bytes: float) -> MemoryProfile:
    """The engine's MemoryProfile for `profile` from the reference peaks; budget as after loading."""
    peaks, probe_pixels = REFERENCE_PEAKS[profile.architecture]
    fixed, per_image = fit_line(peaks)
    activation_fixed = max(0.0, fixed - WEIGHT_BYTES[profile.architecture])
    return MemoryProfile(activation_fixed, per_image, probe_pixels,
                         budget_bytes=max(0.0, available_bytes - resident_bytes(profile)))


def bytes_for_batch(profile: ModelProfile, batch: int) -> float:
    """Peak bytes of one call of `batch` images at the profile's native size, weights included."""
    mp = call_profile(profile, 0.0)
    pixels = profile.resolution ** 2
    return resident_bytes(profile) + mp.fixed_bytes * pixels / mp.probe_pixels + batch * mp.per_image(pixels)


def max_batch_that_fits(profile: ModelProfile, available_bytes: float) -> int:
    """images_that_fit on the computed profile; 0 when not even one image fits."""
    mp = call_profile(profile, available_bytes)
    pixels = profile.resolution ** 2
    if mp.budget_bytes * HEADROOM < mp.fixed_bytes * pixels / mp.probe_pixels + mp.per_image(pixels):
        return 0
    return images_that_fit(mp, pixels)


@dataclass
class Verdict:
    profile: str
    status: str  # ready | missing files | not enough GPU memory | backend unusable | no GPU
    line: str
    ready: bool
    missing: list[str] = field(default_factory=list)
    needs_bytes: float | None = None
    max_batch: int | None = None
    licences: list[dict] = field(default_factory=list)
    non_commercial: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _backend_problems(profile: ModelProfile, face_backend: str, face_model_root: str, face_model_name: str,
                      face_scorer: str) -> list[str]:
    problems = []
    mismatch = arcface_mismatch(profile, face_backend)
    if mismatch:
        problems.append(mismatch)
    if face_backend == "insightface" and (profile.identity_methods or face_scorer == "arcface"):
        if importlib.util.find_spec("insightface") is None or importlib.util.find_spec("onnxruntime") is None:
            problems.append("the insightface backend needs `pip install --no-deps insightface onnx onnxruntime`")
    if face_scorer == "dlib" and not dlib_available():
        problems.append("face scorer dlib: dlib or its model files are not installed")
    if face_scorer == "arcface" and face_backend != "insightface":
        problems.append("face scorer arcface needs face backend insightface")
    return problems


def diagnose(profile: ModelProfile, device: DeviceFacts, *, batch: int = 1, face_backend: str = "embedded",
             face_model_root: str = "~/.insightface", face_model_name: str = "buffalo_l", face_scorer: str = "auto",
             cache_dir: str | None = None) -> Verdict:
    """One profile's verdict. Checks in order of what a user fixes first: files, face backend, device."""
    plan = pull_plan(profile, face_model_root=face_model_root)
    missing: list[str] = []
    licences: dict[str, Licence] = {}
    for item in plan.hub:
        licences[item.repo_id] = item.licence
        _snap, _found, absent = hub_status(item, cache_dir)
        missing += [f"{item.repo_id}/{p}" for p in absent]
    for path in plan.local:
        if not os.path.exists(os.path.expanduser(path)):
            missing.append(path)
    trained = trained_identity_methods(profile)
    for item in plan.manual:
        licences[item.name] = item.licence
    if trained and face_backend == "insightface":  # the configured pack is the one the backend reads
        pack = insightface_item(face_model_name, face_model_root, ", ".join(trained))
        licences.setdefault(pack.name, pack.licence)
        missing += [f"{pack.folder}/{f}" for f in manual_missing(pack)]
    if profile.local_path and not plan.hub:
        licences.setdefault(profile.local_path, licence_of(profile.repo_id or ""))
    non_commercial = [name for name, lic in licences.items() if lic.commercial is False]
    unknown = [name for name, lic in licences.items() if lic is UNKNOWN_LICENCE]
    note = ""
    if non_commercial:
        note = f"; licence: non-commercial ({', '.join(non_commercial)})"
    elif unknown:
        note = f"; licence: check the model card of {', '.join(unknown)}"
    base = dict(profile=profile.name, missing=missing, non_commercial=non_commercial,
                licences=[{"item": n, "licence": lic.describe(), "commercial": lic.commercial}
                          for n, lic in licences.items()])
    if missing:
        return Verdict(status="missing files", ready=False,
                       line=f"{profile.name}: missing files ({len(missing)}): {', '.join(missing[:4])}"
                            f"{' …' if len(missing) > 4 else ''} — run `avatar-engine models pull {profile.name}`{note}",
                       **base)
    problems = _backend_problems(profile, face_backend, face_model_root, face_model_name, face_scorer)
    if problems:
        return Verdict(status="backend unusable", ready=False, line=f"{profile.name}: backend unusable: "
                       f"{problems[0]}{note}", **base)
    if profile.tiny:
        return Verdict(status="ready", ready=True, line=f"{profile.name}: ready (tiny, built from config; "
                       f"{'CUDA' if device.cuda else 'CPU'}){note}", **base)
    if not device.cuda:
        return Verdict(status="no GPU", ready=False, line=f"{profile.name}: no CUDA GPU: real-size profiles need one "
                       f"(install a CUDA build of torch){note}", **base)
    needs = bytes_for_batch(profile, batch)
    fits = max_batch_that_fits(profile, device.available_bytes)
    if fits < batch:
        return Verdict(status="not enough GPU memory", ready=False, needs_bytes=needs, max_batch=fits,
                       line=f"{profile.name}: not enough GPU memory for batch {batch}: needs ~{needs / GB:.1f} GB "
                            f"(computed), {device.available_bytes / GB:.1f} GB available; batch {fits} fits{note}",
                       **base)
    return Verdict(status="ready", ready=True, needs_bytes=needs, max_batch=fits,
                   line=f"{profile.name}: ready on {device.name}: batch {batch} needs ~{needs / GB:.1f} GB (computed), "
                        f"up to {fits} images per call{note}", **base)


def memory_table(profiles: dict[str, ModelProfile], batches=(1, 4, 8, 16)) -> list[dict]:
    """Computed peak GB per real profile and batch (README's GPU quick start table)."""
    rows = []
    for name, p in profiles.items():
        if p.tiny or p.architecture not in REFERENCE_PEAKS:
            continue
        rows.append({"profile": name, "resolution": p.resolution, "identity_methods": list(p.identity_methods),
                     **{f"batch_{b}": round(bytes_for_batch(p, b) / GB, 1) for b in batches}})
    return rows
