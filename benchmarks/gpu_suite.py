"""One-shot GPU suite: the engine's speed on the real architectures, as one command.

On one CUDA GPU, within about 8 minutes including compiles (`--budget-s`, default 450 s; cases
past the budget are reported as skipped, never silently dropped):
- SD1.5 architecture (sd15-random), 512², 25 steps, CFG: batch 1 / 4 / 8 / 16 — images/s and
  batch-1 latency;
- percify (FaceID, rank-128 LoRA in the released layout) and cast (2 characters, identities)
  at 512²;
- SDXL architecture (sdxl-random), 1024², 30 steps: batch 1 / 4;
- per case: peak memory, time of the first (compiling) call, achieved TFLOP/s and % of the
  device's bf16 peak (FLOPs per image counted from the configs, benchmarks/flops.py);
- the model's load + warm-up time and the speed options read back from the modules.
Weights are random (no download); speed does not depend on weight values.

    python benchmarks/gpu_suite.py                     # GPU; writes gpu_suite.json + gpu_suite.md
    python benchmarks/gpu_suite.py --smoke             # CPU, tiny profiles, seconds (CI runs this)
    python benchmarks/gpu_suite.py --ablate            # + each speed option toggled, SD1.5 batch 8 (~25 min)
    python benchmarks/gpu_suite.py --only 'sd15 generate' --ablate --ablations 'blocks,full UNet'
                                                       # a subset that fits a short device lease

Timing: after the first call of a case (which may compile), `--repeats` calls are timed with
CUDA synchronisation around each; the median is reported. Includes text encoding, denoising, VAE
decode and PIL conversion; excludes PNG encoding. Last line: the JSON summary.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_env  # noqa: E402,F401 - sets up imports and the offline environment

import torch  # noqa: E402

from avatar_engine import AvatarEngine, EngineConfig, load_profiles  # noqa: E402
from avatar_engine.requests import PercifyRequest  # noqa: E402
from avatar_engine.runtime.warmup import variant_requests, warmup_photo  # noqa: E402


@dataclasses.dataclass
class Case:
    name: str
    profile: str
    size: int
    steps: int
    kind: str  # generate | percify | percify-photo | cast
    batches: tuple[int, ...]


FULL = [
    Case("sd15 generate", "sd15-random", 512, 25, "generate", (1, 4, 8, 16)),
    Case("sd15 percify", "sd15-random", 512, 25, "percify", (8,)),
    Case("sd15 cast (2 characters)", "sd15-random", 512, 25, "cast", (4,)),
    Case("sd15 percify from a photo", "sd15-random", 512, 25, "percify-photo", (1,)),
    Case("sdxl generate", "sdxl-random", 1024, 30, "generate", (1, 4)),
]
SMOKE = [
    Case("tiny-sd15 generate", "tiny-sd15", 64, 2, "generate", (1, 2)),
    Case("tiny-sd15 percify", "tiny-sd15", 64, 2, "percify", (2,)),
    Case("tiny-sd15 cast (2 characters)", "tiny-sd15", 64, 2, "cast", (2,)),
    Case("tiny-sd15 percify from a photo", "tiny-sd15", 64, 2, "percify-photo", (1,)),
    Case("tiny-sdxl generate", "tiny-sdxl", 64, 2, "generate", (1, 2)),
]
ABLATIONS = [  # (label, speed overrides) measured against the profile's defaults, SD1.5 batch 8
    ("compile off", {"compile": False}),
    ("compile ResNet blocks too (scope blocks)", {"compile_scope": "blocks"}),
    ("full UNet, static shapes, channels_last", {"compile_scope": "full", "compile_dynamic": False}),
    ("fuse_qkv off", {"fuse_qkv": False}),
    ("channels_last off", {"channels_last": False}),
    ("cudnn_benchmark off", {"cudnn_benchmark": False}),
    ("prompt_cache off", {"prompt_cache": 0}),
    ("compile_vae off", {"compile_vae": False}),
    ("max-autotune + inductor flags", {"compile_mode": "max-autotune"}),
    ("cuda_graphs on", {"cuda_graphs": True}),
    ("step cache interval 3", {"step_cache_interval": 3}),
    ("fp8 on", {"fp8": True}),
]
TARGETS = {"sd15 generate": "≥ 11 images/s at batch ≥ 8, batch-1 latency ≤ 0.15 s (H200)",
           "sdxl generate": "≥ 1.2 images/s (H200)"}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_engine(case: Case, device: str | None, speed_overrides: dict | None = None,
                warmup_kinds: bool = False) -> AvatarEngine:
    profiles = load_profiles()
    profile = profiles[case.profile]
    speed = dataclasses.replace(profile.speed, **(speed_overrides or {}))
    if not warmup_kinds:
        # The suite warms what it measures (its first call per case is reported as compile time);
        # `--full-warmup` measures the profile's whole load-time warm-up instead.
        speed = dataclasses.replace(speed, warmup=False)
    profiles[case.profile] = dataclasses.replace(profile, resolution=case.size, steps=case.steps, speed=speed,
                                                 max_batch_size=max(max(c.batches) for c in FULL + SMOKE))
    return AvatarEngine(EngineConfig(device=device), profiles=profiles)


def measure(engine: AvatarEngine, case: Case, batch: int, repeats: int) -> dict:
    model = engine.load(case.profile)
    if case.kind == "percify-photo":
        # A user's identity request end to end: face analysis of a real photo with the
        # configured backend, the embedding, then the identity pipeline, in the profile's defaults.
        requests = [PercifyRequest(prompt="portrait photo", photos=[warmup_photo()], seed=0, steps=case.steps,
                                   batch_size=batch, model=case.profile, score_outputs=False)]
    else:
        requests = variant_requests(model, case.kind, batch, steps=case.steps)
    for r in requests:
        if hasattr(r, "score_outputs"):
            r.score_outputs = False
    device = engine.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    engine.generate(requests)  # first call: compiles whatever this shape needs
    sync(device)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        results = engine.generate(requests)
        sync(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    calls = sorted({tuple(r.extra["batchImages"]) for r in results})
    row = {"case": case.name, "batch": batch, "images_per_s": round(batch / med, 3),
           "seconds_per_call": round(med, 4), "first_call_s": round(first, 2), "calls": [list(c) for c in calls]}
    if device.type == "cuda":
        row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    return row


def error_row(case: Case, batch: int, exc: Exception, what: str = "") -> dict:
    traceback.print_exc()
    return {"case": case.name, "batch": batch, "images_per_s": None,
            "error": f"{what}{type(exc).__name__}: {exc}"[:300]}


def measured_row(engine: AvatarEngine, case: Case, batch: int, repeats: int) -> dict:
    """`measure` + FLOPs, or an error row: one broken case must not cost the others' numbers."""
    try:
        row = measure(engine, case, batch, repeats)
        add_flops(row, engine, case)
        return row
    except Exception as exc:  # noqa: BLE001
        return error_row(case, batch, exc)


def measure_uncompiled(case: Case, device: str, batch: int, repeats: int) -> dict:
    """The same case without torch.compile, after a compiled run failed: the failure is reported
    and the eager speed still measured."""
    engine = make_engine(case, device, {"compile": False})
    row = measured_row(engine, case, batch, repeats)
    row["case"] += " (compile off, after the compiled run failed)"
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return row


def add_flops(row: dict, engine: AvatarEngine, case: Case) -> None:
    from flops import device_peak, image_flops

    model = engine.load(case.profile)
    flops = image_flops(model.pipe, case.size, case.size, case.steps, cfg=model.profile.guidance_scale > 1)
    peak, _ = device_peak(engine.device)
    row["tflop_per_image"] = round(flops / 1e12, 6)
    row["achieved_tflops"] = round(flops * row["images_per_s"] / 1e12, 1)
    row["pct_of_bf16_peak"] = round(100 * flops * row["images_per_s"] / peak, 1) if peak else None


def markdown(report: dict) -> str:
    lines = [f"GPU suite — {report['device_name']}, torch {report['torch']}, diffusers {report['diffusers']}, "
             f"dtype {report.get('dtype', '?')}; random weights; includes text encode + denoise + VAE decode + PIL.", "",
             "| case | batch | images/s | s/call | first call (s) | peak GB | TFLOP/s | % bf16 peak |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        if r.get("error"):
            lines.append(f"| {r['case']} | {r['batch']} | failed: {r['error'][:100]} | | | | | |")
            continue
        lines.append(f"| {r['case']} | {r['batch']} | {r['images_per_s']} | {r['seconds_per_call']} | "
                     f"{r['first_call_s']} | {r.get('peak_memory_gb', '-')} | {r.get('achieved_tflops', '-')} | "
                     f"{r.get('pct_of_bf16_peak') if r.get('pct_of_bf16_peak') is not None else '-'} |")
    for name, info in report["models"].items():
        lines.append(f"\n{name}: load {info['load_s']} s (warm-up {info['warmup'].get('seconds', 0)} s, "
                     f"{info['warmup'].get('graphs', 0)} graphs); options: {json.dumps(info['applied'])}")
    if report.get("ablation"):
        lines += ["", "| option toggled (sd15, batch 8) | images/s | vs defaults |", "|---|---:|---:|"]
        for r in report["ablation"]:
            lines.append(f"| {r['option']} | {r['images_per_s']} | {r['relative']} |")
    if report["skipped"]:
        lines.append(f"\nskipped (over the {report['budget_s']} s budget): {', '.join(report['skipped'])}")
    return "\n".join(lines) + "\n"


def select(items: list, spec: str, name) -> list:
    """The items whose name contains one of the comma-separated parts of `spec` (all if empty)."""
    parts = [p.strip().lower() for p in spec.split(",") if p.strip()]
    return [it for it in items if not parts or any(p in name(it).lower() for p in parts)]


def ablate(report: dict, ablations: list, engines: dict, device: str, args, t_start: float) -> list:
    """SD1.5 batch 8 with each option toggled, against the defaults measured in this run (measured
    first here if the main cases did not include them). Each variant starts from clean dynamo
    state and the inductor settings of the start: options that set global inductor flags (CUDA
    graphs, diffusion-fast's flags) must not leak into the next variant."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    case = FULL[0]
    rows = []
    base = next((r for r in report["rows"] if r["case"] == case.name and r["batch"] == 8 and r.get("images_per_s")),
                None)
    plan = ([("defaults", {})] if base is None else []) + list(ablations)
    saved = inductor_config.save_config()
    for option, overrides in plan:
        if time.perf_counter() - t_start > args.ablate_budget_s:
            report["skipped"].append(f"ablation {option}")
            continue
        engines.clear()
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
        inductor_config.load_config(saved)
        try:
            engine = make_engine(case, device, overrides)
            row = measure(engine, case, 8, args.repeats)
            del engine
        except Exception as exc:  # noqa: BLE001 - e.g. fp8 on a GPU without float8 support
            rows.append({"option": option, "images_per_s": None, "relative": f"failed: {exc}"[:120]})
            continue
        if base is None:
            base = row
        rows.append({"option": option, "images_per_s": row["images_per_s"],
                     "relative": round(row["images_per_s"] / base["images_per_s"], 3)})
        report["ablation"] = rows
        write_report(report, args.out, t_start)
    inductor_config.load_config(saved)
    return rows


def write_report(report: dict, out: str, t_start: float) -> str:
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    Path(f"{out}.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    Path(f"{out}.md").write_text(md)
    return md


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny profiles on CPU, in seconds")
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=450.0)
    ap.add_argument("--ablate", action="store_true", help="also SD1.5 batch 8 with each speed option toggled")
    ap.add_argument("--ablate-budget-s", type=float, default=1500.0, help="time limit including the ablations")
    ap.add_argument("--full-warmup", action="store_true", help="run the profiles' whole load-time warm-up")
    ap.add_argument("--only", default="", help="comma-separated parts of case names to run (default: all), e.g. "
                    "'sd15 generate,sdxl' — to fit a short device lease")
    ap.add_argument("--ablations", default="", help="with --ablate: comma-separated parts of option names to "
                    "toggle (default: all), e.g. 'blocks,full UNet'")
    ap.add_argument("--out", default="gpu_suite", help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    device = args.device or ("cpu" if args.smoke else "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_suite: no CUDA device (use --smoke for the CPU check)")
    cases = select(SMOKE if args.smoke else FULL, args.only, lambda c: c.name)
    t_start = time.perf_counter()
    import diffusers

    report = {"device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor()
              or "cpu", "torch": torch.__version__, "diffusers": diffusers.__version__, "rows": [], "models": {},
              "skipped": [], "budget_s": args.budget_s, "targets": TARGETS}
    engines: dict[str, AvatarEngine] = {}
    for case in cases:
        for batch in case.batches:
            if time.perf_counter() - t_start > args.budget_s:
                report["skipped"].append(f"{case.name} b{batch}")
                continue
            if case.profile not in engines:
                for name in list(engines):  # one full-size model in memory at a time
                    del engines[name]
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
                engine = make_engine(case, device, warmup_kinds=args.full_warmup)
                t0 = time.perf_counter()
                try:
                    model = engine.load(case.profile)
                except Exception as exc:  # noqa: BLE001 - report it, go on with the next profile
                    report["rows"].append(error_row(case, batch, exc, "load: "))
                    write_report(report, args.out, t_start)
                    break
                report["models"][case.profile] = {"load_s": round(time.perf_counter() - t0, 1),
                                                  "warmup": model.warmup, "applied": model.applied}
                report["dtype"] = str(model.dtype).replace("torch.", "")
                engines[case.profile] = engine
            engine = engines[case.profile]
            row = measured_row(engine, case, batch, args.repeats)
            if row.get("error") and engine.load(case.profile).compiled and device == "cuda":
                report["rows"].append(row)
                row = measure_uncompiled(case, device, batch, args.repeats)
            report["rows"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            write_report(report, args.out, t_start)  # a run cut short still leaves what it measured
    if args.ablate and not args.smoke:
        report["ablation"] = ablate(report, select(ABLATIONS, args.ablations, lambda a: a[0]), engines, device,
                                    args, t_start)
    md = write_report(report, args.out, t_start)
    print(md, file=sys.stderr)
    summary = {"device": report["device_name"], "total_s": report["total_s"], "skipped": report["skipped"],
               "rows": [{k: r[k] for k in ("case", "batch", "images_per_s")} for r in report["rows"]]}
    print(json.dumps(summary))
    return report


if __name__ == "__main__":
    main()
