"""Service load: concurrent clients against the Avatar API (Ray Serve) and against the naive
peer (benchmarks/naive_server.py: FastAPI + diffusers, one request at a time), same run, same
tiny model and steps; plus the service's overhead over calling the engine directly.

Clients of the service submit (POST /v1/avatars/generate), poll GET /v1/avatars/{id} until
completed, then download the PNG; clients of the naive peer POST and wait for the PNG.
Latency is submit → PNG in hand. Each server runs alone (they would share the CPUs otherwise).

    python benchmarks/service_load.py [-n 32] [-c 8] [--steps 20]

Last line: {"service_images_per_s", "naive_images_per_s", "speedup", "service_p50_s", ...}
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PROMPTS = ["an astronaut", "a knight", "a hacker", "a noble", "an elf", "a diver", "a samurai", "a chef"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def run_clients(n: int, concurrency: int, one) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, range(n)))
    return time.perf_counter() - t0, latencies


def bench_service(args, env) -> tuple[float, list[float]]:
    data = tempfile.mkdtemp(prefix="ae-load-")
    cli = [sys.executable, "-m", "serve.cli"]
    key = subprocess.run(cli + ["create-key", "--tier", "enterprise", "--credits", "1000000", "-q", "--data-dir", data],
                         env=env, cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()
    port = free_port()
    proc = subprocess.Popen(cli + ["run", "--port", str(port), "--data-dir", data, "--num-cpus", "2"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        wait_http(f"{base}/health", proc)
        headers = {"Authorization": f"Bearer {key}"}
        client = httpx.Client(headers=headers, timeout=60)

        def one(i: int) -> float:
            t0 = time.perf_counter()
            r = client.post(f"{base}/avatars/generate", json={"prompt": f"portrait of {PROMPTS[i % 8]} {i}", "seed": i,
                                                               "steps": args.steps})
            r.raise_for_status()
            avatar_id = r.json()["id"]
            while True:
                a = client.get(f"{base}/avatars/{avatar_id}").json()
                if a["status"] == "completed":
                    break
                if a["status"] in ("failed", "cancelled"):
                    raise RuntimeError(a)
                time.sleep(args.poll)
            client.get(f"{base}/avatars/{avatar_id}/images/0").raise_for_status()
            return time.perf_counter() - t0

        one(10_000)  # warm-up
        return run_clients(args.requests, args.concurrency, one)
    finally:
        proc.terminate()
        proc.wait(60)


def bench_naive(args, env) -> tuple[float, list[float]]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "naive_server.py"), "--port", str(port)],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc)
        client = httpx.Client(timeout=600)

        def one(i: int) -> float:
            t0 = time.perf_counter()
            client.post(f"http://127.0.0.1:{port}/generate",
                        json={"prompt": f"portrait of {PROMPTS[i % 8]} {i}", "seed": i, "steps": args.steps}).raise_for_status()
            return time.perf_counter() - t0

        one(10_000)
        return run_clients(args.requests, args.concurrency, one)
    finally:
        proc.terminate()
        proc.wait(60)


def bench_direct(args) -> float:
    """The same requests through AvatarEngine in-process, in the chunks a worker would claim."""
    import torch

    torch.set_num_threads(2)
    from avatar_engine import AvatarEngine, GenerationRequest

    engine = AvatarEngine()
    reqs = [GenerationRequest(prompt=f"portrait of {PROMPTS[i % 8]} {i}", seed=i, steps=args.steps)
            for i in range(args.requests)]
    engine.generate(reqs[:2])
    t0 = time.perf_counter()
    for s in range(0, len(reqs), args.concurrency):
        engine.generate(reqs[s:s + args.concurrency])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--requests", type=int, default=32)
    ap.add_argument("-c", "--concurrency", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--poll", type=float, default=0.25, help="seconds between status polls (each poll costs CPU the worker shares on small machines)")
    args = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "AVATAR_TIERS": json.dumps({"free": [10, 1], "pro": [60, 5], "enterprise": [100000, 1000]}),
           "PYTHONPATH": str(ROOT)}
    svc_s, svc_lat = bench_service(args, env)
    naive_s, naive_lat = bench_naive(args, env)
    direct_s = bench_direct(args)
    n = args.requests
    out = {
        "service_images_per_s": round(n / svc_s, 3), "naive_images_per_s": round(n / naive_s, 3),
        "speedup": round(naive_s / svc_s, 2),
        "service_p50_s": round(statistics.median(svc_lat), 3), "service_p95_s": round(percentile(svc_lat, 0.95), 3),
        "naive_p50_s": round(statistics.median(naive_lat), 3), "naive_p95_s": round(percentile(naive_lat, 0.95), 3),
        "direct_engine_images_per_s": round(n / direct_s, 3),
        "service_overhead": round(svc_s / direct_s, 2),
        "requests": n, "concurrency": args.concurrency, "steps": args.steps, "model": "tiny-sd15",
    }
    print(f"service: {out['service_images_per_s']} images/s, p50 {out['service_p50_s']}s p95 {out['service_p95_s']}s",
          file=sys.stderr)
    print(f"naive:   {out['naive_images_per_s']} images/s, p50 {out['naive_p50_s']}s p95 {out['naive_p95_s']}s",
          file=sys.stderr)
    print(f"direct engine: {out['direct_engine_images_per_s']} images/s; service wall time / direct = "
          f"{out['service_overhead']}x", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
