"""Engine throughput: AvatarEngine (batched) vs the naive peer, in one run.

The naive peer is what most avatar services do (and what the official Ray Serve Stable
Diffusion example does): a plain diffusers pipeline, same weights, same scheduler and steps,
called once per request. Both get a warm-up call first; both include VAE decode and PIL
conversion; neither includes PNG encoding. The ratio is the result that travels between
machines; absolute numbers only hold on the machine that printed them.

    python benchmarks/engine_throughput.py                     # tiny-sd15, 16 requests, CPU
    python benchmarks/engine_throughput.py --model sd15-random --device cuda   # real architecture on a GPU
    python benchmarks/engine_throughput.py --workload percify

Last line: {"engine_images_per_s": ..., "naive_images_per_s": ..., "speedup": ...}
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402

from avatar_engine import AvatarEngine, EngineConfig, GenerationRequest  # noqa: E402
from avatar_engine.engine import load_pipeline  # noqa: E402
from avatar_engine.speed import resolve_dtype  # noqa: E402

PROMPTS = ["an astronaut", "a medieval knight", "a cyberpunk hacker", "a renaissance noble", "an elf archer",
           "a jazz musician", "a deep sea diver", "a samurai", "a mountain climber", "a chef", "a pilot", "a painter"]


def make_requests(n: int, model: str, steps: int | None) -> list[GenerationRequest]:
    return [GenerationRequest(prompt=f"portrait of {PROMPTS[i % len(PROMPTS)]}, variant {i}", seed=1000 + i,
                              model=model, steps=steps) for i in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_engine(engine: AvatarEngine, requests, repeats: int) -> float:
    engine.generate(requests[: min(len(requests), 4)])  # warm-up (batch shapes, allocator)
    engine.generate(requests)
    best = float("inf")
    for _ in range(repeats):
        sync(engine.device)
        t0 = time.perf_counter()
        engine.generate(requests)
        sync(engine.device)
        best = min(best, time.perf_counter() - t0)
    return best


def time_naive(pipe, requests, device: torch.device, repeats: int, call_kwargs=None) -> float:
    """One plain pipeline call per request: no packing, no shared calls."""
    call_kwargs = call_kwargs or (lambda r: {})

    def run_one(r):
        pipe(prompt=r.prompt, negative_prompt=r.negative_prompt, num_inference_steps=r.steps,
             guidance_scale=r.guidance_scale, height=r.height, width=r.width,
             generator=torch.Generator("cpu").manual_seed(r.seed), **call_kwargs(r))

    run_one(requests[0])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for r in requests:
            run_one(r)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--requests", type=int, default=16)
    ap.add_argument("--model", default="tiny-sd15")
    ap.add_argument("--steps", type=int, default=None, help="default: the profile's")
    ap.add_argument("--device", default=None)
    ap.add_argument("--max-batch-size", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is reported")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    ap.add_argument("--workload", choices=("generate", "percify"), default="generate")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    engine = AvatarEngine(EngineConfig(device=args.device, max_batch_size=args.max_batch_size))
    profile = engine.profile(args.model)
    if args.workload == "percify":
        from percify_workload import make_percify_requests, naive_percify_setup  # noqa: E402

        requests = make_percify_requests(args.requests, args.model, args.steps)
    else:
        requests = make_requests(args.requests, args.model, args.steps)
    resolved = [engine.resolve(r) for r in requests]
    # Same prompts on both sides: the engine's prompt builder output is what the naive peer gets.
    model = engine.load(args.model)
    naive_requests = []
    for r in resolved:
        built = model.prompt_builder.build(r.prompt, r.style_preset, r.negative_prompt)
        naive_requests.append(type(r)(**{**r.__dict__, "prompt": built.prompt, "negative_prompt": built.negative_prompt}))

    engine_s = time_engine(engine, resolved, args.repeats)
    n_images = sum(r.batch_size for r in resolved)

    # The naive peer: its own plain pipeline (same weights/scheduler), no speed options.
    dtype = resolve_dtype(profile, engine.device)
    naive_pipe = load_pipeline(profile, engine.device, dtype)
    naive_kwargs = None
    if args.workload == "percify":
        naive_kwargs = naive_percify_setup(engine, naive_pipe, resolved)
    naive_s = time_naive(naive_pipe, naive_requests, engine.device, args.repeats, naive_kwargs)

    report = {
        "workload": args.workload, "model": profile.name, "requests": len(resolved), "images": n_images,
        "steps": resolved[0].steps, "cfg": resolved[0].guidance_scale, "size": f"{resolved[0].width}x{resolved[0].height}",
        "device": str(engine.device), "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "engine_options": model.applied, "max_batch": engine.max_batch(profile, resolved[0].width, resolved[0].height),
        "includes": "text encode + denoise + VAE decode + PIL; excludes PNG encode", "host": platform.node(),
    }
    if engine.device.type == "cuda":
        report["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    engine_ips, naive_ips = n_images / engine_s, n_images / naive_s
    print(json.dumps(report, indent=2), file=sys.stderr)
    print(f"engine (batched): {n_images} images in {engine_s:.2f}s = {engine_ips:.2f} images/s", file=sys.stderr)
    print(f"naive (1 call/request): {n_images} images in {naive_s:.2f}s = {naive_ips:.2f} images/s", file=sys.stderr)
    print(f"speedup: {engine_ips / naive_ips:.2f}x", file=sys.stderr)
    result = {"engine_images_per_s": round(engine_ips, 3), "naive_images_per_s": round(naive_ips, 3),
              "speedup": round(engine_ips / naive_ips, 2)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
