"""Engine throughput, three sides in one interleaved run, and the three ratios between them:

- engine:         AvatarEngine, requests packed into batched calls, the profile's speed options.
- naive+options:  the same engine and pipeline (same weights, kernels, compiled graphs, prompt
                  cache) called with one image per call — what batching alone adds.
- plain:          a plain diffusers pipeline (same weights, scheduler, steps, prompts), no speed
                  options, one call per request — what most avatar services run (the official
                  Ray Serve Stable Diffusion example serves batch 1).

Ratios: batching = engine / naive+options; options = naive+options / plain; total = engine / plain.
The sides run in rotating order in every round, so machine noise hits all three alike; the
median round time per side is reported, with the median CPU seconds per image (process time,
all threads) beside it.

`--workload styles` (benchmarks/styles_workload.py) compares other sides: 8 one-image requests
over three resident LoRA styles and none (A, B, C, none, ...) as ONE mixed call (each image its
own adapter) vs the same images grouped per style (one engine call per style, what a server that
swaps or fuses one LoRA at a time must do) vs a plain diffusers pipeline fusing and unfusing each
group's LoRA (`--no-swap` drops it); ratios mixed/grouped and mixed/swap, the largest pixel
difference between mixed and grouped (must be <= 2/255) and the stacked LoRAs' bytes per LoRA.

All sides include text encoding, denoising, VAE decode and PIL conversion; none includes PNG
encoding. MFU (model FLOPs utilisation) is reported where the device's bf16 peak is known (FLOPs
per image from the UNet/VAE configs, benchmarks/flops.py).

    python benchmarks/engine_throughput.py               # tiny-sd15 AND sd15-random at 256 px (CPU: a few minutes)
    python benchmarks/engine_throughput.py --runs tiny   # only the tiny profile
    python benchmarks/engine_throughput.py --runs real --size 512 --steps 25 -n 16 --device cuda
    python benchmarks/engine_throughput.py --workload percify
    python benchmarks/engine_throughput.py --workload styles --runs tiny
    python benchmarks/engine_throughput.py --workload styles --runs real --size 128 --steps 2 --rounds 2 --speed warmup=false
                                                         # styles on the real SD1.5 architecture: ~7.5 min on 2 CPU cores
    python benchmarks/engine_throughput.py --runs real --speed step_cache_interval=3   # an option on

On CPU the real-architecture run is compute-bound (a 256 px UNet step costs seconds), so its
batching ratio says little about a GPU; the tiny run mostly measures per-call overhead. Both
are regression guards; speed claims come from benchmarks/gpu_suite.py on a GPU.

Last line (JSON): {"runs": {"tiny": {"batching": .., "options": .., "total": ..}, "real": {...}}}
(styles: {"runs": {"tiny": {"mixed_vs_grouped": .., "mixed_vs_swap": .., "pixels_match": .., ...}}})
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_env  # noqa: E402,F401 - sets up imports and the offline environment

import torch  # noqa: E402
import yaml  # noqa: E402

from avatar_engine import AvatarEngine, EngineConfig, GenerationRequest, load_profiles  # noqa: E402
from avatar_engine.engine import load_pipeline  # noqa: E402

PROMPTS = ["an astronaut", "a medieval knight", "a cyberpunk hacker", "a renaissance noble", "an elf archer",
           "a jazz musician", "a deep sea diver", "a samurai", "a mountain climber", "a chef", "a pilot", "a painter"]
RUNS = {  # name: (profile, size, steps, requests) — the CPU defaults
    "tiny": ("tiny-sd15", None, None, 16),
    "real": ("sd15-random", 256, 2, 4),
}


def make_requests(n: int, model: str, steps: int | None) -> list[GenerationRequest]:
    return [GenerationRequest(prompt=f"portrait of {PROMPTS[i % len(PROMPTS)]}, variant {i}", seed=1000 + i,
                              model=model, steps=steps) for i in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Sides:
    """The three ways of running the same requests. Every run gets prompts no side has seen
    (a run counter is appended), so the prompt-embedding cache only keeps what real traffic
    repeats: style templates and negative prompts, not the users' prompts."""

    def __init__(self, engine: AvatarEngine, resolved, plain_pipe, plain_requests, plain_kwargs):
        self.engine, self.resolved = engine, resolved
        self.plain_pipe, self.plain_requests, self.plain_kwargs = plain_pipe, plain_requests, plain_kwargs
        self.runs = 0

    def _fresh(self, requests):
        self.runs += 1
        return [dataclasses.replace(r, prompt=f"{r.prompt}, take {self.runs}") for r in requests]

    def engine_batched(self) -> None:
        self.engine.generate(self._fresh(self.resolved))

    def naive_options(self) -> None:
        cap = self.engine.config.max_batch_size
        self.engine.config.max_batch_size = 1  # one image per pipeline call, everything else identical
        try:
            for r in self._fresh(self.resolved):
                self.engine.generate(r)
        finally:
            self.engine.config.max_batch_size = cap

    def plain(self) -> None:
        for r in self._fresh(self.plain_requests):
            self.plain_pipe(prompt=r.prompt, negative_prompt=r.negative_prompt, num_inference_steps=r.steps,
                            guidance_scale=r.guidance_scale, height=r.height, width=r.width,
                            generator=torch.Generator("cpu").manual_seed(r.seed), **self.plain_kwargs(r))


def interleaved(sides: dict, rounds: int, device: torch.device, cpu: dict | None = None,
                warm: dict | None = None) -> dict[str, list[float]]:
    """Warm each side once, then time every side once per round, rotating the order. Fills
    `cpu` (if given) with each round's process CPU seconds (all threads) per side and `warm`
    with what each side's warm-up call returned."""
    names = list(sides)
    for name, fn in sides.items():
        out = fn()
        if warm is not None:
            warm[name] = out
    times: dict[str, list[float]] = {n: [] for n in names}
    for n in names:
        if cpu is not None:
            cpu[n] = []
    for i in range(rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            sides[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            if cpu is not None:
                cpu[name].append(time.process_time() - c0)
    return times


def cpu_per_image(cpu: dict[str, list[float]], n_images: int) -> dict[str, float]:
    """Median CPU seconds (process time, all threads) per image of each side."""
    return {k: round(statistics.median(v) / n_images, 3) for k, v in cpu.items()}


def bench_engine(model_name: str, size: int | None, args, adapt=None):
    """The engine both sides of a run measure: profile `model_name` at `size` with the run's
    `--speed` options (and `adapt(profile)`, e.g. the styles workload's LoRA styles)."""
    profiles = load_profiles()
    profile = profiles[model_name]
    if size:
        profile = dataclasses.replace(profile, resolution=size, size_multiple=min(profile.size_multiple, 64))
    if args.speed:
        profile = dataclasses.replace(profile, speed=dataclasses.replace(profile.speed, **args.speed))
    if adapt is not None:
        profile = adapt(profile)
    profiles[model_name] = profile
    engine = AvatarEngine(EngineConfig(device=args.device, max_batch_size=args.max_batch_size), profiles=profiles)
    return engine, profile


def run_one(label: str, model_name: str, size: int | None, steps: int | None, n: int, args) -> dict:
    engine, profile = bench_engine(model_name, size, args)
    if args.workload == "percify":
        from percify_workload import make_percify_requests, naive_percify_setup

        requests = make_percify_requests(n, model_name, steps)
    else:
        requests = make_requests(n, model_name, steps)
    t_load = time.perf_counter()
    model = engine.load(model_name)
    load_s = time.perf_counter() - t_load
    resolved = [engine.resolve(r) for r in requests]
    # Same prompts on every side: the engine's prompt builder output is what the plain peer gets.
    plain_requests = []
    for r in resolved:
        built = model.prompt_builder.build(r.prompt, r.style_preset, r.negative_prompt)
        plain_requests.append(dataclasses.replace(r, prompt=built.prompt, negative_prompt=built.negative_prompt))
    plain_pipe = load_pipeline(profile, engine.device, model.dtype)
    plain_kwargs = (naive_percify_setup(engine, plain_pipe, resolved) if args.workload == "percify"
                    else (lambda r: {}))
    sides = Sides(engine, resolved, plain_pipe, plain_requests, plain_kwargs)
    cpu: dict = {}
    times = interleaved({"engine": sides.engine_batched, "naive+options": sides.naive_options,
                         "plain": sides.plain}, args.rounds, engine.device, cpu)
    n_images = sum(r.batch_size for r in resolved)
    ips = {name: n_images / statistics.median(ts) for name, ts in times.items()}
    cpu_s = cpu_per_image(cpu, n_images)
    first = resolved[0]
    report = {
        "run": label, "workload": args.workload, "model": model_name, "requests": len(resolved), "images": n_images,
        "steps": first.steps, "cfg": first.guidance_scale, "size": f"{first.width}x{first.height}",
        "device": str(engine.device), "dtype": str(model.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "rounds": args.rounds, "load_s": round(load_s, 1),
        "engine_options": model.applied, "speed_overrides": args.speed, "warmup": model.warmup,
        "max_batch": engine.max_batch(model, first.width, first.height),
        "images_per_s": {k: round(v, 3) for k, v in ips.items()}, "cpu_s_per_image": cpu_s,
        "round_seconds": {k: [round(t, 2) for t in ts] for k, ts in times.items()},
        "includes": "text encode + denoise + VAE decode + PIL; excludes PNG encode", "host": platform.node(),
    }
    ratios = {"batching": ips["engine"] / ips["naive+options"], "options": ips["naive+options"] / ips["plain"],
              "total": ips["engine"] / ips["plain"]}
    report["ratios"] = {k: round(v, 2) for k, v in ratios.items()}
    from flops import device_peak, image_flops

    cfg = first.guidance_scale > 1
    flops = image_flops(model.pipe, first.height, first.width, first.steps, cfg)
    peak, device_name = device_peak(engine.device)
    report["tflop_per_image"] = round(flops / 1e12, 4)
    report["achieved_tflops"] = round(flops * ips["engine"] / 1e12, 3)
    report["mfu"] = round(flops * ips["engine"] / peak, 4) if peak else None
    report["peak"] = device_name
    if engine.device.type == "cuda":
        report["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    print(json.dumps(report, indent=2), file=sys.stderr)
    print(f"[{label}] engine {ips['engine']:.2f} | naive+options {ips['naive+options']:.2f} | plain "
          f"{ips['plain']:.2f} images/s -> batching {ratios['batching']:.2f}x, options {ratios['options']:.2f}x, "
          f"total {ratios['total']:.2f}x; CPU s/image: engine {cpu_s['engine']}, naive+options "
          f"{cpu_s['naive+options']}, plain {cpu_s['plain']}", file=sys.stderr)
    del engine, plain_pipe, sides
    return report


def run_styles(label: str, model_name: str, size: int | None, steps: int | None, n: int, args) -> dict:
    """`--workload styles`: one mixed-style call vs the same images grouped per style (and the
    plain-diffusers weight-swapping peer), interleaved; pixels of mixed and grouped compared."""
    from styles_workload import (groups, make_style_requests, max_diff, plain_generate, styles_profile, swap_call,
                                 swap_setup)

    engine, profile = bench_engine(model_name, size, args, lambda p: styles_profile(p, rank=args.style_rank))
    requests = make_style_requests(n, model_name, steps)
    t_load = time.perf_counter()
    model = engine.load(model_name)
    load_s = time.perf_counter() - t_load
    resolved = [engine.resolve(r) for r in requests]
    parts = groups(resolved)
    plain_requests = []
    for r in resolved:
        built = model.prompt_builder.build(r.prompt, r.style_preset, r.negative_prompt)
        plain_requests.append(dataclasses.replace(r, prompt=built.prompt, negative_prompt=built.negative_prompt))
    swap_note = None
    plain_pipe = scales = None
    if args.swap:
        try:
            import peft  # noqa: F401 - diffusers' LoRA adapters need it

            plain_pipe = load_pipeline(profile, engine.device, model.dtype)
            scales = swap_setup(engine, model, plain_pipe)
        except Exception as exc:  # noqa: BLE001 - the peer is optional; say why it is missing
            swap_note = f"swap side skipped: {type(exc).__name__}: {exc}"[:300]
            plain_pipe = None
            print(swap_note, file=sys.stderr)
    else:
        swap_note = "swap side off (--no-swap)"
    counter = {"runs": 0}
    seen: set[str] = set()

    def take(side: str, reqs: list) -> list:
        """A side's first (warm-up) call gets the base prompts, identical on every side (pixels
        compared); timed calls get prompts no side has seen (no prompt-cache hits)."""
        if side not in seen:
            seen.add(side)
            return reqs
        counter["runs"] += 1
        return [dataclasses.replace(r, prompt=f"{r.prompt}, take {counter['runs']}") for r in reqs]

    def mixed():
        res = engine.generate(take("mixed", resolved))
        return [r.images[0] for r in res], [r.extra["batchImages"] for r in res]

    def grouped():
        reqs = take("grouped", resolved)
        images, calls = [None] * n, [None] * n
        for g in parts:
            for i, r in zip(g, engine.generate([reqs[i] for i in g])):
                images[i], calls[i] = r.images[0], r.extra["batchImages"]
        return images, calls

    def swap():
        reqs = take("swap", plain_requests)
        images = [None] * n
        for g in parts:
            batch = [reqs[i] for i in g]
            out = swap_call(plain_pipe, scales, batch[0].style_preset, lambda: plain_generate(plain_pipe, batch))
            for i, img in zip(g, out):
                images[i] = img
        return images, [[len(g)] for g in parts for _ in g]

    sides = {"mixed": mixed, "grouped": grouped}
    if plain_pipe is not None:
        sides["swap"] = swap
    cpu: dict = {}
    warm: dict = {}
    times = interleaved(sides, args.rounds, engine.device, cpu, warm)
    ips = {name: n / statistics.median(ts) for name, ts in times.items()}
    cpu_s = cpu_per_image(cpu, n)
    diff_grouped = [max_diff(a, b) for a, b in zip(warm["mixed"][0], warm["grouped"][0])]
    diff_swap = ([max_diff(a, b) for a, b in zip(warm["mixed"][0], warm["swap"][0])] if "swap" in warm else None)
    # The LoRAs must change pixels for the comparisons to mean anything: the first style's images
    # again at styleStrength 0 (the plain path), untimed.
    g0 = parts[0]
    unstyled = engine.generate([dataclasses.replace(resolved[i], style_strength=0.0) for i in g0])
    lora_effect = [max_diff(warm["mixed"][0][i], r.images[0]) for i, r in zip(g0, unstyled)]
    calls = {name: sorted({tuple(c) for c in out[1]}) for name, out in warm.items()}
    mixed_calls = [list(c) for c in calls["mixed"]]
    style_mem = model.applied.get("style_loras", {})
    first = resolved[0]
    report = {
        "run": label, "workload": "styles", "model": model_name, "requests": n, "images": n,
        "styles": [r.style_preset for r in resolved], "style_rank": args.style_rank,
        "steps": first.steps, "cfg": first.guidance_scale, "size": f"{first.width}x{first.height}",
        "device": str(engine.device), "dtype": str(model.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "rounds": args.rounds, "load_s": round(load_s, 1),
        "engine_options": model.applied, "speed_overrides": args.speed, "warmup": model.warmup,
        "calls": {k: [list(c) for c in v] for k, v in calls.items()}, "mixed_one_call": mixed_calls == [[n]],
        "images_per_s": {k: round(v, 3) for k, v in ips.items()}, "cpu_s_per_image": cpu_s,
        "round_seconds": {k: [round(t, 2) for t in ts] for k, ts in times.items()},
        "max_abs_diff_mixed_vs_grouped": diff_grouped, "pixels_match": max(diff_grouped) <= 2,
        "max_abs_diff_mixed_vs_swap": diff_swap, "swap_note": swap_note,
        "lora_effect": {"style": resolved[g0[0]].style_preset, "max_abs_diff_vs_strength_0": lora_effect},
        "style_loras": {k: style_mem.get(k) for k in ("mode", "adapters", "layers", "bytes", "bytesPerLoRA")},
        "includes": "text encode + denoise + VAE decode + PIL; excludes PNG encode", "host": platform.node(),
    }
    ratios = {"mixed_vs_grouped": ips["mixed"] / ips["grouped"]}
    if "swap" in ips:
        ratios["mixed_vs_swap"] = ips["mixed"] / ips["swap"]
    report["ratios"] = {k: round(v, 2) for k, v in ratios.items()}
    print(json.dumps(report, indent=2), file=sys.stderr)
    swap_txt = (f" | swap {ips['swap']:.3f}" if "swap" in ips else "")
    print(f"[{label} styles] {n} images, styles {'/'.join(r.style_preset or 'none' for r in resolved)}; calls: "
          f"mixed {mixed_calls}, grouped {[list(c) for c in calls['grouped']]}", file=sys.stderr)
    print(f"[{label} styles] mixed {ips['mixed']:.3f} | grouped {ips['grouped']:.3f}{swap_txt} images/s -> "
          f"mixed/grouped {ratios['mixed_vs_grouped']:.2f}x"
          + (f", mixed/swap {ratios['mixed_vs_swap']:.2f}x" if "mixed_vs_swap" in ratios else "")
          + "; CPU s/image: " + ", ".join(f"{k} {v}" for k, v in cpu_s.items()), file=sys.stderr)
    print(f"[{label} styles] max abs diff mixed vs grouped (8-bit levels, per image): {diff_grouped} -> "
          f"{'ok (<= 2/255)' if report['pixels_match'] else 'MISMATCH (> 2/255)'}"
          + (f"; mixed vs swap (plain diffusers + peft, fused): {diff_swap}" if diff_swap is not None else "")
          + f"; {resolved[g0[0]].style_preset} vs the same images at styleStrength 0: {lora_effect}", file=sys.stderr)
    n_lora = len(style_mem.get("adapters") or [])
    print(f"[{label} styles] resident LoRAs {n_lora} (rank {args.style_rank}, stacked, {style_mem.get('layers')} "
          f"layers): {style_mem.get('bytes', 0) / 2**20:.1f} MiB, {style_mem.get('bytesPerLoRA', 0) / 2**20:.2f} "
          f"MiB per LoRA (model.applied['style_loras'], as /v1/health reports)", file=sys.stderr)
    if swap_note:
        print(f"[{label} styles] {swap_note}", file=sys.stderr)
    del engine, plain_pipe
    return report


def _option(text: str) -> tuple[str, object]:
    key, _, raw = text.partition("=")
    value = yaml.safe_load(raw)  # true/false/null/numbers/strings as in models.yaml
    return key.strip(), value


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="tiny,real", help="comma list of: tiny, real (default both)")
    ap.add_argument("-n", "--requests", type=int, default=None, help="default: 16 tiny, 4 real; 8 with --workload styles")
    ap.add_argument("--model", default=None, help="override the profile of a single run")
    ap.add_argument("--size", type=int, default=None, help="image side; default: tiny native, real 256")
    ap.add_argument("--steps", type=int, default=None, help="default: profile's (tiny), 2 (real)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--max-batch-size", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per side (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    ap.add_argument("--workload", choices=("generate", "percify", "styles"), default="generate",
                    help="styles: one mixed-style batch vs the same images grouped per style (default 8 requests)")
    ap.add_argument("--style-rank", type=int, default=16, help="styles: rank of the three tiny LoRAs")
    ap.add_argument("--swap", action=argparse.BooleanOptionalAction, default=True,
                    help="styles: also the plain-diffusers weight-swapping peer (fuse/unfuse per group)")
    ap.add_argument("--speed", action="append", default=[], metavar="OPTION=VALUE",
                    help="override a speed option of the engine sides, e.g. step_cache_interval=3 (repeatable)")
    args = ap.parse_args(argv)
    args.speed = dict(_option(kv) for kv in args.speed)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for label in [r.strip() for r in args.runs.split(",") if r.strip()]:
        model_name, size, steps, n = RUNS[label]
        if args.workload == "styles":
            report = run_styles(label, args.model or model_name, args.size or size, args.steps or steps,
                                args.requests or 8, args)
            results[label] = {**report["ratios"], "images_per_s": report["images_per_s"],
                              "cpu_s_per_image": report["cpu_s_per_image"], "model": report["model"],
                              "size": report["size"], "pixels_match": report["pixels_match"],
                              "mixed_one_call": report["mixed_one_call"],
                              "bytes_per_lora": report["style_loras"]["bytesPerLoRA"]}
            continue
        report = run_one(label, args.model or model_name, args.size or size, args.steps or steps,
                         args.requests or n, args)
        results[label] = {**report["ratios"], "engine_images_per_s": report["images_per_s"]["engine"],
                          "model": report["model"], "size": report["size"], "mfu": report["mfu"],
                          "cpu_s_per_image": report["cpu_s_per_image"]}
    out = {"runs": results}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
