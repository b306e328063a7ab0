"""What an approximate speed option costs in pixels: PSNR (and the largest difference) of its
images against the exact output of the same seeds, requests and batch.

Two uses:

    python benchmarks/quality.py compare gpu_run_out/images      # after gpu_suite.py --images-dir
    python benchmarks/quality.py measure --profile sd15-random --size 128 --steps 25 \\
        --speed step_cache_interval=3 --speed step_cache_interval=2      # in-process, CPU or GPU

`compare` reads the `.npz` files `gpu_suite.py --images-dir DIR` writes (one per case ×
configuration × batch) and compares every configuration with the exact one of the same case and
batch: `full-graphs` (bf16, whole UNet), else `default`, else `full` — those change nothing but
float reassociation. `measure` generates the exact and each variant itself (same engine profile
and seeds) and also reports the variant's time relative to the exact one (interleaved rounds).

Random-weight profiles (`sd15-random`, what a machine without hub access has) give a numeric
PSNR, not a perceptual verdict: their images are not pictures of anything. Identity similarity
for percify needs real weights and a real face, so it is not computed here.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np

EXACT_CONFIGS = ("full-graphs", "default", "full")  # the reference of a case, first one present


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def image_stats(exact: list[np.ndarray], other: list[np.ndarray]) -> dict:
    """Mean and worst PSNR over the images, and the largest absolute difference."""
    if len(exact) != len(other):
        raise ValueError(f"{len(exact)} exact images but {len(other)} to compare")
    values = [psnr(a, b) for a, b in zip(exact, other)]
    finite = [v for v in values if math.isfinite(v)]
    return {"images": len(values),
            "psnr_db_mean": round(sum(finite) / len(finite), 2) if finite else None,  # None: all identical
            "psnr_db_min": round(min(values), 2) if finite else None,
            "identical": len(finite) == 0,
            "max_abs_diff": int(max(int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
                                    for a, b in zip(exact, other)))}


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def save_images(directory: str | Path, case: str, config: str, batch: int, images) -> Path:
    """The images of one measured row (PIL images or uint8 arrays), in request order."""
    path = Path(directory) / f"{slug(case)}__{slug(config)}__b{int(batch)}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, *[np.asarray(im, dtype=np.uint8) for im in images])
    return path


def load_images(path: Path) -> list[np.ndarray]:
    with np.load(path) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


def compare(directory: str | Path) -> list[dict]:
    """Every non-exact configuration of each case and batch against that case's exact one."""
    groups: dict[tuple[str, str], dict[str, Path]] = {}
    for path in sorted(Path(directory).glob("*.npz")):
        case, config, batch = path.stem.split("__")
        groups.setdefault((case, batch), {})[config] = path
    rows = []
    for (case, batch), configs in sorted(groups.items()):
        exact = next((c for c in EXACT_CONFIGS if c in configs), None)
        if exact is None:
            continue
        reference = load_images(configs[exact])
        for config, path in sorted(configs.items()):
            if config == exact:
                continue
            rows.append({"case": case, "batch": int(batch[1:]), "config": config, "vs": exact,
                         **image_stats(reference, load_images(path))})
    return rows


def measure(profile_name: str, size: int, steps: int, batch: int, variants: list[dict], rounds: int,
            device: str | None) -> dict:
    """The exact profile and each variant (speed overrides) on the same requests, interleaved."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_env  # noqa: F401 - offline environment, repository on the path
    from avatar_engine import AvatarEngine, EngineConfig, GenerationRequest, load_profiles

    profiles = load_profiles()
    base = profiles[profile_name]
    names = ["exact"] + [",".join(f"{k}={v}" for k, v in v.items()) for v in variants]
    for name, overrides in zip(names, [{}] + variants):
        profiles[name] = dataclasses.replace(base, name=name, resolution=size, steps=steps, max_batch_size=batch,
                                             speed=dataclasses.replace(base.speed, warmup=False, **overrides))
    engine = AvatarEngine(EngineConfig(device=device), profiles=profiles)
    requests = [GenerationRequest(prompt="a portrait photo of a woman, studio light", seed=s, batch_size=batch)
                for s in (1, 2)]
    images: dict[str, list] = {}
    seconds: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}  # process CPU seconds (all threads)
    for name in names:  # load and a first (compiling, if any) call outside the timed rounds
        engine.generate([dataclasses.replace(r, model=name, steps=min(steps, 2)) for r in requests[:1]])
    for i in range(rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            out = engine.generate([dataclasses.replace(r, model=name) for r in requests])
            seconds[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            images[name] = [im for res in out for im in res.images]
    exact = [np.asarray(im) for im in images["exact"]]
    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    n_images = len(images["exact"])
    t_exact = median(seconds["exact"])
    rows = []
    for name in names[1:]:
        t = median(seconds[name])
        rows.append({"variant": name, **image_stats(exact, [np.asarray(im) for im in images[name]]),
                     "seconds": round(t, 3), "cpu_seconds_per_image": round(median(cpu[name]) / n_images, 3),
                     "speedup_vs_exact": round(t_exact / t, 3)})
    return {"profile": profile_name, "size": size, "steps": steps, "batch": batch, "requests": len(requests),
            "device": str(engine.device), "rounds": rounds, "exact_seconds": round(t_exact, 3),
            "exact_cpu_seconds_per_image": round(median(cpu["exact"]) / n_images, 3), "variants": rows}


def parse_speed(items: list[str]) -> list[dict]:
    out = []
    for item in items:
        pairs = {}
        for part in item.split(","):
            key, _, value = part.partition("=")
            try:
                pairs[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                pairs[key.strip()] = None if value.strip() in ("", "None") else value.strip()
        out.append(pairs)
    return out


def main(argv=None) -> object:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    cmp_ = sub.add_parser("compare", help="PSNR of gpu_suite.py --images-dir files against the exact configuration")
    cmp_.add_argument("directory")
    mea = sub.add_parser("measure", help="exact vs variants of one profile, generated here")
    mea.add_argument("--profile", default="sd15-random")
    mea.add_argument("--size", type=int, default=128)
    mea.add_argument("--steps", type=int, default=25)
    mea.add_argument("--batch", type=int, default=2)
    mea.add_argument("--rounds", type=int, default=3)
    mea.add_argument("--device", default=None)
    mea.add_argument("--speed", action="append", default=[], help="a variant: key=value[,key=value] (repeatable)")
    args = ap.parse_args(argv)
    if args.command == "compare":
        result: object = compare(args.directory)
    else:
        result = measure(args.profile, args.size, args.steps, args.batch,
                         parse_speed(args.speed or ["step_cache_interval=3"]), args.rounds, args.device)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
