"""Engine throughput, three sides in one interleaved run, and the three ratios between them:

- engine:         AvatarEngine, requests packed into batched calls, the profile's speed options.
- naive+options:  the same engine and pipeline (same weights, kernels, compiled graphs, prompt
                  cache) called with one image per call — what batching alone adds.
- plain:          a plain diffusers pipeline (same weights, scheduler, steps, prompts), no speed
                  options, one call per request — what most avatar services run (the official
                  Ray Serve Stable Diffusion example serves batch 1).

Ratios: batching = engine / naive+options; options = naive+options / plain; total = engine / plain.
The sides run in rotating order in every round, so machine noise hits all three alike; the
median round time per side is reported. All sides include text encoding, denoising, VAE decode
and PIL conversion; none includes PNG encoding. MFU (model FLOPs utilisation) is reported where
the device's bf16 peak is known (FLOPs per image from the UNet/VAE configs, benchmarks/flops.py).

    python benchmarks/engine_throughput.py               # tiny-sd15 AND sd15-random at 256 px (CPU: a few minutes)
    python benchmarks/engine_throughput.py --runs tiny   # only the tiny profile
    python benchmarks/engine_throughput.py --runs real --size 512 --steps 25 -n 16 --device cuda
    python benchmarks/engine_throughput.py --workload percify
    python benchmarks/engine_throughput.py --runs real --speed step_cache_interval=3   # an option on

On CPU the real-architecture run is compute-bound (a 256 px UNet step costs seconds), so its
batching ratio says little about a GPU; the tiny run mostly measures per-call overhead. Both
are regression guards; speed claims come from benchmarks/gpu_suite.py on a GPU.

Last line (JSON): {"runs": {"tiny": {"batching": .., "options": .., "total": ..}, "real": {...}}}
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


def interleaved(sides: dict, rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Warm each side once, then time every side once per round, rotating the order."""
    names = list(sides)
    for fn in sides.values():
        fn()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            sync(device)
            t0 = time.perf_counter()
            sides[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def run_one(label: str, model_name: str, size: int | None, steps: int | None, n: int, args) -> dict:
    profiles = load_profiles()
    profile = profiles[model_name]
    if size:
        profile = dataclasses.replace(profile, resolution=size, size_multiple=min(profile.size_multiple, 64))
    if args.speed:
        profile = dataclasses.replace(profile, speed=dataclasses.replace(profile.speed, **args.speed))
    profiles[model_name] = profile
    engine = AvatarEngine(EngineConfig(device=args.device, max_batch_size=args.max_batch_size), profiles=profiles)
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
    times = interleaved({"engine": sides.engine_batched, "naive+options": sides.naive_options,
                         "plain": sides.plain}, args.rounds, engine.device)
    n_images = sum(r.batch_size for r in resolved)
    ips = {name: n_images / statistics.median(ts) for name, ts in times.items()}
    first = resolved[0]
    report = {
        "run": label, "workload": args.workload, "model": model_name, "requests": len(resolved), "images": n_images,
        "steps": first.steps, "cfg": first.guidance_scale, "size": f"{first.width}x{first.height}",
        "device": str(engine.device), "dtype": str(model.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "rounds": args.rounds, "load_s": round(load_s, 1),
        "engine_options": model.applied, "speed_overrides": args.speed, "warmup": model.warmup,
        "max_batch": engine.max_batch(model, first.width, first.height),
        "images_per_s": {k: round(v, 3) for k, v in ips.items()},
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
          f"total {ratios['total']:.2f}x", file=sys.stderr)
    del engine, plain_pipe, sides
    return report


def _option(text: str) -> tuple[str, object]:
    key, _, raw = text.partition("=")
    value = yaml.safe_load(raw)  # true/false/null/numbers/strings as in models.yaml
    return key.strip(), value


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="tiny,real", help="comma list of: tiny, real (default both)")
    ap.add_argument("-n", "--requests", type=int, default=None, help="default: 16 tiny, 4 real")
    ap.add_argument("--model", default=None, help="override the profile of a single run")
    ap.add_argument("--size", type=int, default=None, help="image side; default: tiny native, real 256")
    ap.add_argument("--steps", type=int, default=None, help="default: profile's (tiny), 2 (real)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--max-batch-size", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per side (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    ap.add_argument("--workload", choices=("generate", "percify"), default="generate")
    ap.add_argument("--speed", action="append", default=[], metavar="OPTION=VALUE",
                    help="override a speed option of the engine sides, e.g. step_cache_interval=3 (repeatable)")
    args = ap.parse_args(argv)
    args.speed = dict(_option(kv) for kv in args.speed)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for label in [r.strip() for r in args.runs.split(",") if r.strip()]:
        model_name, size, steps, n = RUNS[label]
        report = run_one(label, args.model or model_name, args.size or size, args.steps or steps,
                         args.requests or n, args)
        results[label] = {**report["ratios"], "engine_images_per_s": report["images_per_s"]["engine"],
                          "model": report["model"], "size": report["size"], "mfu": report["mfu"]}
    out = {"runs": results}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
