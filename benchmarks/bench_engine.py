"""BENCHMARK-ONLY engines: they measure the service, not a model. Never for production; not part
of the `serve` package.

`BenchEngine` stands in for `AvatarEngine` when the service is started with
`engine_factory="benchmarks.bench_engine:BenchEngine"` and `engine_args={"spec": ...}`
(`ServiceSettings`; the repository root must be importable, as it is for `benchmarks/service_load.py`).
Its profiles are named `bench-…`, so every response and `/v1/health` says what answered:

- `null` → profiles `bench-null` (512²) and `bench-null-1024` (1024²): generation costs (almost) nothing; it returns deterministic
  noise images at the requested size (a textured pattern chosen and shifted by the seed, so
  PNG encoding costs about what it costs for a generated picture, unlike a flat colour).
  This shows the service's ceiling: everything around the model.
- `sleep:<ms>` → profiles `bench-sleep` / `bench-sleep-1024`: the same images after sleeping `<ms>` per 512² image
  (scaled by pixel count, e.g. ×4 at 1024²), the GIL released like a GPU kernel: what a GPU
  spends per image, to measure the service's overhead over direct engine calls.

The engine interface is the subset of `AvatarEngine` the worker and the ingress use (`profiles`,
`default_model`, `load`, `generate`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from avatar_engine.requests import GenerationRequest, GenerationResult

REFERENCE_PIXELS = 512 * 512
_TEXTURES = 8


@dataclass(frozen=True)
class BenchProfile:
    name: str
    credit_cost: int = 1
    resolution: int = 512
    size_multiple: int = 8
    steps: int = 1
    guidance_scale: float = 1.0
    supported_kinds: tuple[str, ...] = ("generate", "remix")


def parse_spec(spec: str) -> tuple[str, float]:
    """`null` → ("bench-null", 0); `sleep:<ms>` → ("bench-sleep", seconds per 512² image)."""
    if spec == "null":
        return "bench-null", 0.0
    kind, _, value = spec.partition(":")
    if kind == "sleep":
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if ms >= 0:
            return "bench-sleep", ms / 1000.0
    raise ValueError(f"the benchmark engine's spec must be 'null' or 'sleep:<ms per 512² image>', got {spec!r}")


class BenchEngine:
    """Deterministic noise images at the requested size; optional sleep per image (see module)."""

    def __init__(self, spec: str = "null"):
        name, self.seconds_per_reference_image = parse_spec(spec)
        self.spec = spec
        # 512² by default; `<name>-1024` for 1024² (the API takes the size from the profile).
        self.profiles = {name: BenchProfile(name), f"{name}-1024": BenchProfile(f"{name}-1024", resolution=1024)}
        self.default_model = name
        self._textures: dict[tuple[int, int], list[np.ndarray]] = {}

    def load(self, name: str) -> None:
        if name not in self.profiles:
            raise KeyError(f"benchmark engine {self.spec!r} serves only {list(self.profiles)}")

    def _texture(self, width: int, height: int, seed: int) -> np.ndarray:
        pool = self._textures.get((width, height))
        if pool is None:
            pool = []
            for k in range(_TEXTURES):
                rng = np.random.default_rng(k)
                coarse = Image.fromarray(rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3),
                                                      dtype=np.uint8)).resize((width, height), Image.BILINEAR)
                grain = rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
                pool.append(np.clip(np.asarray(coarse, dtype=np.int16) + grain, 0, 255).astype(np.uint8))
            self._textures[(width, height)] = pool
        return np.roll(pool[seed % _TEXTURES], shift=(seed * 7) % height, axis=0)

    def generate(self, requests: list[GenerationRequest],
                 progress: Callable[[int, int], None] | None = None) -> list[GenerationResult]:
        out = []
        t0 = time.perf_counter()
        pixels = 0
        for r in requests:
            r = r.resolve(self.profiles[r.model or self.default_model])
            seeds = r.image_seeds()
            pixels += r.width * r.height * len(seeds)
            images = [Image.fromarray(self._texture(r.width, r.height, s)) for s in seeds]
            out.append(GenerationResult(request=r, images=images, seeds=seeds,
                                        extra={"benchmarkEngine": self.spec}))
        if self.seconds_per_reference_image:
            time.sleep(self.seconds_per_reference_image * pixels / REFERENCE_PIXELS)
        if progress:
            progress(1, 1)
        elapsed = time.perf_counter() - t0
        for res in out:
            res.timings = {"total": elapsed}
        return out

