"""Plain diffusers, the baseline the engine must beat, measured by gpu_suite.py in the same run
on the same machine, each variant in its own process (`run_child`): the profile's pipeline (same
random weights, scheduler, dtype, prompt, steps, guidance, size, batch) called as a diffusers user
would, (a) eager with diffusers' SDPA processors, (b) with the compile recipe diffusers documents.
Also the timing helpers both share."""
from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import bench_env  # noqa: F401 - sets up imports and the offline environment

import torch

from avatar_engine import load_profiles
from avatar_engine.runtime.loading import load_pipeline
from avatar_engine.runtime.optimize import resolve_dtype


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PLAIN_VARIANTS = ("eager", "compiled")  # diffusers as documented: bf16 + SDPA; + its compile recipe
PROMPT = "warm-up portrait"  # the engine cases' prompt (warmup.variant_requests)


def plain_pipeline(case, device: torch.device, variant: str, backend: str):
    """The profile's pipeline (same random weights, scheduler and dtype) used as a user would:
    diffusers' default SDPA processors; `compiled` adds the recipe diffusers documents
    (fast_diffusion tutorial): fused QKV, channels_last, `torch.compile(unet, mode="max-autotune",
    fullgraph=True)` and the same for the VAE decode."""
    profile = dataclasses.replace(load_profiles()[case.profile], resolution=case.size, steps=case.steps)
    dtype = resolve_dtype(profile, device)
    pipe = load_pipeline(profile, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    if variant == "compiled":
        pipe.fuse_qkv_projections()
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        kwargs = dict(mode="max-autotune", fullgraph=True) if backend == "inductor" else dict(backend=backend,
                                                                                             fullgraph=True)
        pipe.unet = torch.compile(pipe.unet, **kwargs)
        pipe.vae.decode = torch.compile(pipe.vae.decode, **kwargs)
    return pipe, profile


def plain_rows(case, device: torch.device, variant: str, backend: str, repeats: int) -> None:
    """Child process: one plain-diffusers variant, every batch of its case; prints each row as a
    `ROW {...}` line as soon as it is measured."""
    pipe, profile = plain_pipeline(case, device, variant, backend)
    for batch in case.batches:
        gen = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]

        def call():
            return pipe(prompt=[PROMPT] * batch, num_inference_steps=case.steps, guidance_scale=profile.guidance_scale,
                        height=case.size, width=case.size, generator=gen, output_type="pil").images

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        first, med = timed_calls(call, device, repeats)
        row = {"case": plain_case_name(case.name, variant), "batch": batch, "images_per_s": round(batch / med, 3),
               "seconds_per_call": round(med, 4), "first_call_s": round(first, 2), "calls": [[batch]]}
        if device.type == "cuda":
            row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
        print("ROW " + json.dumps(row), flush=True)


def plain_case_name(case_name: str, variant: str) -> str:
    return f"plain diffusers {variant}: {case_name}"


def timed_calls(call, device, repeats: int) -> tuple[float, float]:
    """(seconds of the first call, which may compile; median seconds of `repeats` more)."""
    sync(device)
    t0 = time.perf_counter()
    call()
    sync(device)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        call()
        sync(device)
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def run_child(argv: list[str], timeout_s: float) -> tuple[list[dict], str | None]:
    """This script with `argv` in its own process (a crash, a hang or leaked global state costs
    only that variant): the `ROW` lines it printed, and an error when it failed or timed out
    (rows measured before that still count)."""
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "gpu_suite.py"), *argv]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        out, error = proc.stdout, None if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr[-240:]}"
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        error = f"timed out after {timeout_s:.0f} s"
    rows = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")]
    return rows, error


def child_models(out_rows: list[dict]) -> tuple[list[dict], dict]:
    """Split a child's printed records into measured rows and the `models` entries it reported."""
    rows = [r for r in out_rows if "model" not in r]
    models = {r["model"]: r["info"] for r in out_rows if "model" in r}
    return rows, models


def add_plain_ratios(report: dict) -> None:
    """Engine images/s ÷ plain diffusers images/s at the same case and batch, on each engine row."""
    plain = {(r["case"], r["batch"]): r["images_per_s"] for r in report["rows"] if r.get("images_per_s")}
    for row in report["rows"]:
        if row["case"].startswith("plain diffusers") or not row.get("images_per_s"):
            continue
        case = row["case"].split(" [", 1)[0]  # "sd15 generate [full-graphs]" compares with "sd15 generate"
        for variant in PLAIN_VARIANTS:
            base = plain.get((plain_case_name(case, variant), row["batch"]))
            if base:
                row[f"vs_plain_{variant}"] = round(row["images_per_s"] / base, 3)
