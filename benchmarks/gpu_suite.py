"""One-shot GPU suite: the engine's speed on the real architectures, as one command.

On one CUDA GPU, within about 8 minutes including compiles (`--budget-s`, default 450 s; cases
past the budget are reported as skipped, never silently dropped):
- SD1.5 architecture (sd15-random), 512², 25 steps, CFG: batch 1 / 4 / 8 / 16 — images/s and
  batch-1 latency;
- percify (FaceID, rank-128 LoRA in the released layout) and cast (2 characters, identities)
  at 512²;
- SDXL architecture (sdxl-random), 1024², 30 steps: batch 1 / 4;
- style LoRAs (`styles`): 8 one-image requests over three resident rank-16 LoRA styles and none,
  one mixed call vs the same images grouped per style (one call per style), SD1.5 512², with
  the pixel difference between the two and the bytes per resident LoRA (benchmarks/styles_workload.py);
- per case: peak memory, time of the first (compiling) call, achieved TFLOP/s and % of the
  device's bf16 peak (FLOPs per image counted from the configs, benchmarks/flops.py);
- the model's load + warm-up time and the speed options read back from the modules;
- plain diffusers in the same run (benchmarks/plain_baseline.py): eager, and with diffusers'
  compile recipe, before each generate case, with engine/plain ratios beside every engine row;
- engine configurations (`--configs`, CONFIGS): the profile's default (regional compile) and the
  whole-UNet candidates (`full-graphs`: + CUDA graphs, max-autotune; `full-graphs-fp8`).
Every plain variant, and on CUDA every engine configuration, runs in its own process with a
timeout (`--child-timeout-s`); its rows are appended to OUT.json/OUT.md as they come.
Weights are random (no download); speed does not depend on weight values.

    python benchmarks/gpu_suite.py                     # GPU; writes gpu_suite.json + gpu_suite.md
    python benchmarks/gpu_suite.py --smoke             # CPU, tiny profiles, incl. the plain rows (CI runs this)
    python benchmarks/gpu_suite.py --only 'sd15 generate' --batches 1,8 --configs full-graphs,default
                                                       # the decisive rows first (README "Prepared GPU run")
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
from quality import compare as compare_images, save_images  # noqa: E402
from plain_baseline import (PLAIN_VARIANTS, add_plain_ratios, child_models, plain_rows, run_child,  # noqa: E402
                            timed_calls)


@dataclasses.dataclass
class Case:
    name: str
    profile: str
    size: int
    steps: int
    kind: str  # generate | percify | percify-photo | cast | styles
    batches: tuple[int, ...]
    plain_baseline: bool = True  # generate cases: plain diffusers measured before it


FULL = [
    Case("sd15 generate", "sd15-random", 512, 25, "generate", (1, 4, 8, 16)),
    Case("sd15 percify", "sd15-random", 512, 25, "percify", (8,)),
    Case("sd15 cast (2 characters)", "sd15-random", 512, 25, "cast", (4,)),
    Case("sd15 percify from a photo", "sd15-random", 512, 25, "percify-photo", (1,)),
    Case("sdxl generate", "sdxl-random", 1024, 30, "generate", (1, 4)),
    Case("sd15 styles (3 LoRAs + none, mixed)", "sd15-random", 512, 25, "styles", (8,), plain_baseline=False),
]
SMOKE = [
    Case("tiny-sd15 generate", "tiny-sd15", 64, 2, "generate", (1, 2)),
    Case("tiny-sd15 percify", "tiny-sd15", 64, 2, "percify", (2,)),
    Case("tiny-sd15 cast (2 characters)", "tiny-sd15", 64, 2, "cast", (2,)),
    Case("tiny-sd15 percify from a photo", "tiny-sd15", 64, 2, "percify-photo", (1,)),
    Case("tiny-sdxl generate", "tiny-sdxl", 64, 2, "generate", (1, 2), plain_baseline=False),  # CI time
    Case("tiny-sd15 styles (3 LoRAs + none, mixed)", "tiny-sd15", 64, 2, "styles", (4,), plain_baseline=False),
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
# Engine configurations (speed overrides of the profile); rows of a non-default one carry its name
# in brackets. `full-graphs` is the CUDA candidate of issue 19 (whole UNet, VAE decoder, CUDA
# graphs per bucket, max-autotune); `default` is what the profile serves today (regional).
CONFIGS = {
    "default": {},
    "full-graphs": {"compile_scope": "full", "cuda_graphs": True, "compile_mode": "max-autotune",
                    "compile_vae": True, "channels_last": True},
    "full-graphs-fp8": {"compile_scope": "full", "cuda_graphs": True, "compile_mode": "max-autotune",
                        "compile_vae": True, "channels_last": True, "fp8": True},
    "full": {"compile_scope": "full", "compile_vae": True, "channels_last": True},
    "full-graphs-stepcache": {"compile_scope": "full", "cuda_graphs": True, "compile_mode": "max-autotune",
                              "compile_vae": True, "channels_last": True, "step_cache_interval": 3},
}
IMAGES = "_images"  # a measured row's images (saved with --images-dir, never in the report)
TARGETS = {"sd15 generate": "≥ 11 images/s at batch ≥ 8, batch-1 latency ≤ 0.15 s (H200)",
           "sdxl generate": "≥ 1.2 images/s (H200)"}


def make_engine(case: Case, device: str | None, speed_overrides: dict | None = None,
                warmup_kinds: bool = False) -> AvatarEngine:
    profiles = load_profiles()
    profile = profiles[case.profile]
    if case.kind == "styles":  # three rank-16 tiny LoRA styles (benchmarks/styles_workload.py)
        from styles_workload import styles_profile

        profile = styles_profile(profile, rank=16)
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
    elif case.kind == "styles":
        return measure_styles(engine, case, batch, repeats)
    else:
        requests = variant_requests(model, case.kind, batch, steps=case.steps)
    for r in requests:
        if hasattr(r, "score_outputs"):
            r.score_outputs = False
    device = engine.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    results: list = []
    first, med = timed_calls(lambda: results.__setitem__(slice(None), engine.generate(requests)), device, repeats)
    calls = sorted({tuple(r.extra["batchImages"]) for r in results})
    row = {"case": case.name, "batch": batch, "images_per_s": round(batch / med, 3),
           "seconds_per_call": round(med, 4), "first_call_s": round(first, 2), "calls": [list(c) for c in calls]}
    if device.type == "cuda":
        row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    row[IMAGES] = [im for r in results for im in r.images]  # same seeds in every configuration
    return row


def measure_styles(engine: AvatarEngine, case: Case, batch: int, repeats: int) -> dict:
    """`batch` one-image requests over three LoRA styles and none (A, B, C, none, ...): one mixed
    call (each image its own adapter), then the same images grouped per style (one call per
    style, what a weight-swapping server must do), same engine; the row is the mixed side with
    the grouped side's images/s, the ratio and the largest pixel difference between the two."""
    from styles_workload import groups, make_style_requests, max_diff

    requests = make_style_requests(batch, case.profile, case.steps)
    parts = groups(requests)
    device = engine.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    mixed: list = []
    grouped: list = [None] * batch
    first, med = timed_calls(lambda: mixed.__setitem__(slice(None), engine.generate(requests)), device, repeats)

    def run_grouped() -> None:
        for g in parts:
            for i, r in zip(g, engine.generate([requests[i] for i in g])):
                grouped[i] = r

    g_first, g_med = timed_calls(run_grouped, device, repeats)
    calls = sorted({tuple(r.extra["batchImages"]) for r in mixed})
    style_mem = engine.load(case.profile).applied.get("style_loras", {})
    row = {"case": case.name, "batch": batch, "images_per_s": round(batch / med, 3),
           "seconds_per_call": round(med, 4), "first_call_s": round(first, 2), "calls": [list(c) for c in calls],
           "grouped_images_per_s": round(batch / g_med, 3), "grouped_first_call_s": round(g_first, 2),
           "vs_grouped": round(g_med / med, 3),
           "max_abs_diff_vs_grouped": max(max_diff(a.images[0], b.images[0]) for a, b in zip(mixed, grouped)),
           "style_lora_bytes": style_mem.get("bytes"), "bytes_per_lora": style_mem.get("bytesPerLoRA")}
    if device.type == "cuda":
        row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    return row


def error_row(case: Case, batch: int, exc: Exception, what: str = "") -> dict:
    traceback.print_exc()
    return {"case": case.name, "batch": batch, "images_per_s": None,
            "error": f"{what}{type(exc).__name__}: {exc}"[:300]}


def measured_row(engine: AvatarEngine, case: Case, batch: int, repeats: int, keep_images=None) -> dict:
    """`measure` + FLOPs, or an error row: one broken case must not cost the others' numbers.
    `keep_images(images)` receives the row's images (they never go into the report)."""
    try:
        row = measure(engine, case, batch, repeats)
        images = row.pop(IMAGES, None)
        if images and keep_images is not None:
            keep_images(images)
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
             "| case | batch | images/s | vs plain eager | vs plain compiled | s/call | first call (s) | peak GB | "
             "TFLOP/s | % bf16 peak |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        if r.get("error"):
            lines.append(f"| {r['case']} | {r['batch']} | failed: {r['error'][:100]} | | | | | | | |")
            continue
        lines.append(f"| {r['case']} | {r['batch']} | {r['images_per_s']} | {r.get('vs_plain_eager', '-')} | "
                     f"{r.get('vs_plain_compiled', '-')} | {r['seconds_per_call']} | "
                     f"{r['first_call_s']} | {r.get('peak_memory_gb', '-')} | {r.get('achieved_tflops', '-')} | "
                     f"{r.get('pct_of_bf16_peak') if r.get('pct_of_bf16_peak') is not None else '-'} |")
    for r in report["rows"]:
        if r.get("vs_grouped") is not None:
            lines.append(f"\n{r['case']}, batch {r['batch']}: mixed {r['images_per_s']} images/s vs grouped per style "
                         f"{r['grouped_images_per_s']} images/s ({r['vs_grouped']}x), one call {r['calls']}, max pixel "
                         f"difference {r['max_abs_diff_vs_grouped']}/255, {r['bytes_per_lora']} bytes per resident LoRA")
    for name, info in report["models"].items():
        lines.append(f"\n{name}: load {info['load_s']} s (warm-up {info['warmup'].get('seconds', 0)} s, "
                     f"{info['warmup'].get('graphs', 0)} graphs); options: {json.dumps(info['applied'])}")
    if report.get("ablation"):
        lines += ["", "| option toggled (sd15, batch 8) | images/s | vs defaults |", "|---|---:|---:|"]
        for r in report["ablation"]:
            lines.append(f"| {r['option']} | {r['images_per_s']} | {r['relative']} |")
    if report.get("quality"):
        lines += ["", "| case | batch | configuration | vs | PSNR dB (mean / min) | max abs diff |",
                  "|---|---:|---|---|---:|---:|"]
        for q in report["quality"]:
            db = "identical" if q["identical"] else f"{q['psnr_db_mean']} / {q['psnr_db_min']}"
            lines.append(f"| {q['case']} | {q['batch']} | {q['config']} | {q['vs']} | {db} | {q['max_abs_diff']} |")
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
            row.pop(IMAGES, None)
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


def parse_args(argv):
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
    ap.add_argument("--configs", default="default", help=f"engine configurations, in order ({', '.join(CONFIGS)})")
    ap.add_argument("--batches", default="", help="comma-separated batch sizes to keep (default: each case's)")
    ap.add_argument("--plain", default=",".join(PLAIN_VARIANTS),
                    help="plain-diffusers variants measured before each generate case ('' for none)")
    ap.add_argument("--plain-backend", default=None, help="torch.compile backend of the plain compiled variant "
                    "(default: inductor; eager with --smoke)")
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                    help="engine configurations in their own processes too (default: on CUDA)")
    ap.add_argument("--child-timeout-s", type=float, default=None,
                    help="time limit of one child process (default: 300 s on CUDA, 120 s with --smoke)")
    ap.add_argument("--out", default="gpu_suite", help="writes OUT.json and OUT.md")
    ap.add_argument("--images-dir", default=None, help="save each engine row's images here; the report then "
                    "gives every configuration's PSNR against the exact one (benchmarks/quality.py)")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # child processes: one case, exact name
    ap.add_argument("--plain-worker", default=None, help=argparse.SUPPRESS)  # child: one plain variant
    ap.add_argument("--engine-worker", action="store_true", help=argparse.SUPPRESS)  # child: one engine config
    return ap.parse_args(argv)


def case_batches(case: Case, args) -> tuple[int, ...]:
    keep = {int(b) for b in args.batches.split(",") if b.strip()}
    return tuple(b for b in case.batches if not keep or b in keep)


def child_argv(args, case: Case, device: str, *extra: str) -> list[str]:
    argv = ["--case", case.name, "--device", device, "--repeats", str(args.repeats), "--batches",
            ",".join(map(str, case_batches(case, args))), *extra]
    if args.images_dir:
        argv += ["--images-dir", args.images_dir]
    return argv + (["--smoke"] if args.smoke else []) + (["--full-warmup"] if args.full_warmup else [])


def engine_rows(case: Case, config: str, device: str, args, report: dict, emit, t_start: float) -> None:
    """Every batch of one case in one engine configuration, in this process; `emit(row)` as each
    is measured. A compiled case that fails on CUDA is measured again without compile."""
    engine = make_engine(case, device, CONFIGS[config], warmup_kinds=args.full_warmup)
    label = case.name if config == "default" else f"{case.name} [{config}]"
    labelled = dataclasses.replace(case, name=label)
    loaded = False
    for batch in case_batches(case, args):
        if time.perf_counter() - t_start > args.budget_s:
            report["skipped"].append(f"{label} b{batch}")
            continue
        if not loaded:
            t0 = time.perf_counter()
            try:
                model = engine.load(case.profile)
            except Exception as exc:  # noqa: BLE001 - report it, go on with the next case
                emit(error_row(labelled, batch, exc, "load: "))
                return
            report["models"][label] = {"load_s": round(time.perf_counter() - t0, 1), "warmup": model.warmup,
                                       "applied": model.applied, "dtype": str(model.dtype).replace("torch.", ""),
                                       "profile": case.profile}
            loaded = True
            emit({"model": label, "info": report["models"][label]})
        keep = None
        if args.images_dir:  # for benchmarks/quality.py: PSNR against the exact configuration
            keep = lambda images, b=batch: save_images(args.images_dir, case.name, config, b, images)  # noqa: E731
        row = measured_row(engine, case, batch, args.repeats, keep)
        row["case"] = label
        if row.get("error") and engine.load(case.profile).compiled and device == "cuda":
            emit(row)
            row = measure_uncompiled(case, device, batch, args.repeats)
        emit(row)
    del engine
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = args.device or ("cpu" if args.smoke else "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_suite: no CUDA device (use --smoke for the CPU check)")
    all_cases = SMOKE if args.smoke else FULL
    if args.plain_worker or args.engine_worker:  # a child process: print rows, nothing else
        case = next(c for c in all_cases if c.name == args.case)
        if args.plain_worker:
            plain_rows(dataclasses.replace(case, batches=case_batches(case, args)), torch.device(device),
                       args.plain_worker, args.plain_backend or ("eager" if args.smoke else "inductor"), args.repeats)
        else:
            report = {"models": {}, "skipped": []}
            emit = lambda r: print("ROW " + json.dumps(r), flush=True)  # noqa: E731
            engine_rows(case, args.configs, device, args, report, emit, time.perf_counter())
        return {}
    cases = select(all_cases, args.only, lambda c: c.name)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        sys.exit(f"gpu_suite: unknown --configs {unknown}; known: {', '.join(CONFIGS)}")
    plain = [p.strip() for p in args.plain.split(",") if p.strip()]
    isolate = args.isolate if args.isolate is not None else device == "cuda"
    timeout = args.child_timeout_s or (120.0 if args.smoke else 300.0)
    t_start = time.perf_counter()
    import diffusers

    report = {"device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor()
              or "cpu", "torch": torch.__version__, "diffusers": diffusers.__version__, "rows": [], "models": {},
              "skipped": [], "budget_s": args.budget_s, "targets": TARGETS, "configs": {c: CONFIGS[c] for c in configs}}

    def emit(row: dict) -> None:  # each row is written out as soon as it is measured
        if "model" in row:
            report["models"][row["model"]] = row["info"]
            report["dtype"] = row["info"].get("dtype", report.get("dtype"))
            return
        report["rows"].append(row)
        add_plain_ratios(report)
        print(json.dumps(row), file=sys.stderr, flush=True)
        write_report(report, args.out, t_start)  # a run cut short still leaves what it measured

    def child(name: str, case: Case, argv: list[str]) -> None:
        if time.perf_counter() - t_start > args.budget_s:
            report["skipped"].append(f"{name} ({case.name})")
            return
        rows, error = run_child(argv, min(timeout, max(30.0, args.budget_s - (time.perf_counter() - t_start))))
        measured, models = child_models(rows)
        for label, info in models.items():
            emit({"model": label, "info": info})
        for row in measured:
            emit(row)
        if error:
            emit({"case": f"{name}: {case.name}", "batch": None, "images_per_s": None, "error": error})

    for case in cases:
        baseline = plain if case.kind == "generate" and case.plain_baseline else []
        # Decisive rows first: plain eager, the engine configurations, then the plain compiled
        # recipe (its max-autotune compile takes minutes on a GPU).
        for variant in [v for v in baseline if v == "eager"]:
            child(f"plain diffusers {variant}", case, child_argv(args, case, device, "--plain-worker", variant))
        for config in configs:
            if isolate:
                child(f"engine {config}", case, child_argv(args, case, device, "--engine-worker", "--configs", config))
            else:
                engine_rows(case, config, device, args, report, emit, t_start)
        for variant in [v for v in baseline if v != "eager"]:
            child(f"plain diffusers {variant}", case, child_argv(args, case, device, "--plain-worker", variant))
    if args.ablate and not args.smoke:
        report["ablation"] = ablate(report, select(ABLATIONS, args.ablations, lambda a: a[0]), {}, device,
                                    args, t_start)
    if args.images_dir:
        report["quality"] = compare_images(args.images_dir)
    md = write_report(report, args.out, t_start)
    print(md, file=sys.stderr)
    summary = {"device": report["device_name"], "total_s": report["total_s"], "skipped": report["skipped"],
               "rows": [{k: r.get(k) for k in ("case", "batch", "images_per_s", "vs_plain_eager",
                                               "vs_plain_compiled")} for r in report["rows"]]}
    print(json.dumps(summary))
    return report


if __name__ == "__main__":
    main()
