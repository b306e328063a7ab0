"""Restart to first image, cold vs warm compile cache (README "Cold start").

Each run is a fresh process on a clean inductor cache (its own empty TORCHINDUCTOR_CACHE_DIR, as
on a new replica): load the profile (compile + warm-up) and generate one image. `cold`: the
engine's compile cache directory is empty; `warm`: it holds what the cold run saved after its
warm-up (runtime/compile_cache.py). Prints one JSON line per run and a summary.

    python benchmarks/cold_start.py                          # tiny-sd15, inductor, whole UNet, CPU
    python benchmarks/cold_start.py --device cuda --profile sd15-random --scope full
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_env  # noqa: F401 - sets up imports and the offline environment


def one_run(args) -> dict:
    """In the child: restart → load (compile, warm-up) → first image."""
    t0 = time.perf_counter()
    import torch

    from avatar_engine import AvatarEngine, EngineConfig, GenerationRequest, load_profiles

    profiles = load_profiles()
    base = profiles[args.profile]
    speed = dataclasses.replace(base.speed, compile=True, compile_backend="inductor", compile_scope=args.scope,
                                batch_buckets=True)
    identity = {} if args.identity else dict(ip_adapter=None, identity_methods={}, identity_method=None)
    profile = dataclasses.replace(base, speed=speed, max_batch_size=args.max_batch, **identity)
    profiles[args.profile] = profile
    torch.set_num_threads(args.threads)
    engine = AvatarEngine(EngineConfig(device=args.device, default_model=args.profile,
                                       compile_cache_dir=args.cache_dir), profiles=profiles)
    t_import = time.perf_counter() - t0
    model = engine.load(args.profile)
    t_load = time.perf_counter() - t0
    engine.generate(GenerationRequest(prompt="first image", seed=1, steps=args.steps))
    first_image = time.perf_counter() - t0
    warm = model.warmup
    return {"import_s": round(t_import, 1), "load_s": round(t_load, 1), "first_image_s": round(first_image, 1),
            "graphs": warm.get("graphs"), "cacheHits": warm.get("cacheHits"), "cacheMisses": warm.get("cacheMisses"),
            "compileSeconds": warm.get("compileSeconds"), "cacheHitSeconds": warm.get("cacheHitSeconds"),
            "compileCache": warm.get("compileCache")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="tiny-sd15")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scope", default="full", choices=("regional", "blocks", "full"))
    ap.add_argument("--max-batch", type=int, default=1, help="batch buckets up to this (each a graph set)")
    ap.add_argument("--identity", action="store_true", help="keep the profile's identity methods (more graphs)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout-s", type=float, default=1800)
    ap.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(one_run(args)), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="cold-start-") as tmp:
        cache = Path(tmp) / "compile-cache"
        results = {}
        for run in ("cold", "warm"):
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(Path(tmp) / f"inductor-{run}"))  # a clean machine
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--cache-dir", str(cache)]
            for flag in ("profile", "device", "scope", "max_batch", "steps", "threads"):
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            cmd += ["--identity"] if args.identity else []
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"{run} run failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
            results[run] = {"restart_to_first_image_s": round(time.perf_counter() - t0, 1),
                            **json.loads(lines[-1][7:])}
            print(json.dumps({"run": run, **results[run]}), flush=True)
    cold, warm = results["cold"]["restart_to_first_image_s"], results["warm"]["restart_to_first_image_s"]
    print(json.dumps({"profile": args.profile, "device": args.device, "scope": args.scope, "cold_s": cold,
                      "warm_s": warm, "speedup": round(cold / warm, 2) if warm else None}))


if __name__ == "__main__":
    main()
