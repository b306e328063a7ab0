"""Micro checks before the GPU suite (seconds): FP8 vs bf16 matmul on SD1.5's real linear shapes
(batch 8, CFG, 64×64 latents) and GroupNorm+SiLU compiled vs eager, channels_last vs contiguous.
Tells in a minute whether FP8 and the whole-UNet graph can pay off on this GPU. Prints JSON.

    python benchmarks/micro_checks.py            # CUDA; on CPU only the GroupNorm rows (small)
"""
from __future__ import annotations

import json
import sys
import time

import bench_env  # noqa: F401 - sets up imports and the offline environment

import torch

# (tokens, in, out): SD1.5 level-1 self-attention fused QKV, FF in/out, at batch 8 × CFG 2 × 64² tokens
SD15_LINEARS = [(16 * 4096, 320, 960), (16 * 4096, 320, 2560), (16 * 4096, 1280, 320), (16 * 1024, 640, 1920)]


def timed_ms(fn, device, n: int = 20) -> float:
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return round((time.perf_counter() - t0) / n * 1e3, 4)


def fp8_rows(device) -> list[dict]:
    """bf16 matmul vs row-wise-scaled FP8 (`torch._scaled_mm`, what torchao's float8 runs)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return [{"check": "fp8 matmul", "skipped": "needs CUDA SM 8.9+"}]
    rows = []
    for m, k, n in SD15_LINEARS:
        a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        a8, w8 = a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
        sa = torch.ones(m, 1, device=device)
        sw = torch.ones(1, n, device=device)
        bf16 = timed_ms(lambda: a @ w.t(), device)
        fp8 = timed_ms(lambda: torch._scaled_mm(a8, w8.t(), scale_a=sa, scale_b=sw, out_dtype=torch.bfloat16), device)
        rows.append({"check": f"matmul {m}x{k}x{n}", "bf16_ms": bf16, "fp8_ms": fp8, "speedup": round(bf16 / fp8, 2)})
    return rows


def groupnorm_rows(device) -> list[dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = (16, 320, 64, 64) if device.type == "cuda" else (2, 64, 16, 16)
    norm = torch.nn.GroupNorm(32, shape[1]).to(device, dtype)

    def f(x):
        return torch.nn.functional.silu(norm(x))

    compiled = torch.compile(f, fullgraph=True, backend="inductor" if device.type == "cuda" else "eager")
    rows = []
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=layout)
        with torch.inference_mode():
            rows.append({"check": f"GroupNorm+SiLU {tuple(shape)} {str(layout).split('.')[-1]}",
                         "eager_ms": timed_ms(lambda: f(x), device), "compiled_ms": timed_ms(lambda: compiled(x), device)})
    return rows


def main() -> list[dict]:
    device = torch.device(sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for check in (fp8_rows, groupnorm_rows):
        try:
            rows += check(device)
        except Exception as exc:  # noqa: BLE001 - one failed check must not hide the others
            rows.append({"check": check.__name__, "error": f"{type(exc).__name__}: {exc}"[:300]})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"micro": rows}))
    return rows


if __name__ == "__main__":
    main()
