"""How many images fit in one pipeline call, from figures measured once at load.

The first engine divided `torch.cuda.mem_get_info()`'s free memory by a 0.6 GB/image constant
at every call. `mem_get_info` counts the blocks PyTorch's caching allocator holds but no tensor
uses as taken, so after the first big call the estimate shrank and drifted (and on a compiled
model every new batch size is another graph); the constant ignored VAE decode, cast's extra
attention passes and the FaceID weights.

Here: memory available for work is `free + reserved - allocated`; the cost of a call is probed
at load as fixed + per-image bytes (peak memory of a 1-step call, VAE decode included, at two
batch sizes), once for plain calls and once for cast's regional calls; the result is computed
once per image size and rounded down to a batch bucket, so it never drifts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

HEADROOM = 0.85  # share of the measured budget a call may plan to use (fragmentation, other models)
MAX_IMAGES_PER_CALL = 64
PROBE_BATCHES = (1, 4)


@dataclass(frozen=True)
class MemoryProfile:
    """Peak bytes of one call ≈ fixed_bytes + n · per_image_bytes · (pixels / probe_pixels)."""

    fixed_bytes: float
    per_image_bytes: float
    probe_pixels: int
    regional_per_image_bytes: float | None = None  # cast calls (several text and identity passes)
    budget_bytes: float = 0.0  # memory available for work when the model was loaded

    def per_image(self, pixels: int, regional: bool = False) -> float:
        per = self.regional_per_image_bytes if regional and self.regional_per_image_bytes else self.per_image_bytes
        return per * pixels / self.probe_pixels


def available_for_work(free: int, reserved: int, allocated: int) -> int:
    """Bytes a new call can use: what the driver reports free plus what PyTorch's caching
    allocator holds without a live tensor in it."""
    return int(free + max(0, reserved - allocated))


def fit_line(peaks: dict[int, float]) -> tuple[float, float]:
    """(fixed, per_image) from peak bytes measured at two batch sizes."""
    (b1, p1), (b2, p2) = sorted(peaks.items())[:2]
    per = max(0.0, (p2 - p1) / (b2 - b1))
    return max(0.0, p1 - per * b1), per


def images_that_fit(profile: MemoryProfile, pixels: int, regional: bool = False, headroom: float = HEADROOM,
                    cap: int = MAX_IMAGES_PER_CALL) -> int:
    """Largest n with fixed + n · per_image within headroom × budget (at least 1, at most cap)."""
    per = profile.per_image(pixels, regional)
    room = profile.budget_bytes * headroom - profile.fixed_bytes * pixels / profile.probe_pixels
    if per <= 0:
        return cap
    return int(max(1, min(cap, math.floor(room / per))))


def round_to_bucket(n: int) -> int:
    """Largest power of two <= n: calls stay on warmed batch buckets."""
    return 1 << (max(1, n).bit_length() - 1)


def measure_peaks(run: Callable[[int], None], device, batches=PROBE_BATCHES) -> dict[int, float]:
    """Peak allocated bytes above the baseline while `run(n)` makes a call of n images (CUDA)."""
    import torch

    peaks = {}
    for n in batches:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run(n)
        torch.cuda.synchronize(device)
        peaks[n] = float(torch.cuda.max_memory_allocated(device) - base)
    return peaks


def cuda_budget(device) -> int:
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    return available_for_work(free, torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device))
