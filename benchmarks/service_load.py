"""Service load: the Avatar API (real Ray Serve app on 127.0.0.1) end to end, with clients that
submit (POST /v1/avatars/generate with `Prefer: wait`, so the answer is the completed avatar;
GET /v1/avatars/{id} polls only if a wait times out), then download every PNG. Latency is
submit → last PNG in hand.

Default run, on SQLite and on PostgreSQL (each store its own service):

(a) ceiling — the BENCHMARK-ONLY engine `bench-null` (benchmarks/bench_engine.py: deterministic noise
    images at the requested size, generation costs nothing): images/s of 512² and of 1024² PNGs
    delivered; everything measured is the service (HTTP, database, queue, encoding, upload).
(b) overhead — the benchmark engine `sleep:<ms>` (sleeps `--gpu-ms` per 512² image, ≈ what a GPU
    spends on SD1.5 512²) through the service vs the same engine called directly in-process on
    the same requests in the chunks a worker claims: overhead = 1 − service / direct images/s.

Both report p50/p95/p99 latency and the PNG(+thumbnail) encode time per image read from the
worker's metrics. `--vs-naive` instead runs the earlier comparison with tiny-sd15 against
benchmarks/naive_server.py.

    python benchmarks/service_load.py [--stores sqlite,postgresql] [-c 24] [--requests 240]
        [--batch-size 2] [--gpu-ms 50] [--png-level 1] [--ceiling-runs 3]

Last line: JSON {"ceiling_512_images_per_s", "ceiling_1024_images_per_s", "overhead", ...} with one
block per store under "stores" and the figures of the first store at top level.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import shutil
import tempfile
import time
import uuid
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


# ---------------------------------------------------------------------------------------------
# Ceiling and overhead with the benchmark engine
# ---------------------------------------------------------------------------------------------
SERVE_CHILD = r"""
import os, sys, tempfile, threading, shutil, json
sys.path.insert(0, os.environ["AE_ROOT"])
os.environ["RAY_AUTH_MODE"] = "disabled"; os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
import ray
from ray import serve
from serve.deployments import default_config_path, run_config
tmp = tempfile.mkdtemp(prefix="aeb", dir="/tmp")
ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 1024 * 1024, _temp_dir=tmp,
         log_to_driver=False)
serve.start(http_options={"host": "127.0.0.1", "port": int(os.environ["AE_PORT"])})
run_config(default_config_path("serve_local.yaml"), json.loads(os.environ["AE_OVERRIDES"]))
print("ready", flush=True)
try:
    sys.stdin.read()  # until the benchmark closes our stdin
finally:
    serve.shutdown(); ray.shutdown(); shutil.rmtree(tmp, ignore_errors=True)
"""


class Service:
    """The real app in a child process (its own private Ray), on one store, with one engine."""

    def __init__(self, store_url: str, data_dir: str, overrides: dict, env: dict):
        self.port = free_port()
        self.data_dir = data_dir
        self.store_url = store_url
        child_env = {**env, "AE_ROOT": str(ROOT), "AE_PORT": str(self.port),
                     "AE_OVERRIDES": json.dumps({"data_dir": data_dir, "db_url": store_url, **overrides})}
        self.log_path = os.path.join(data_dir, "serve.log")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", SERVE_CHILD], env=child_env, cwd=ROOT,
                                         stdin=subprocess.PIPE, stdout=log, stderr=log)
        self.base = f"http://127.0.0.1:{self.port}"
        try:
            wait_http(f"{self.base}/v1/health", self.proc)
        except Exception:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                print(fh.read()[-3000:], file=sys.stderr)
            self.close()
            raise

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(90)
        except Exception:  # noqa: BLE001
            self.proc.kill()


def start_service(store_url: str, data_dir: str, overrides: dict, env: dict, tries: int = 3) -> Service:
    """A busy machine can time Ray's start-up out: try again (each try is a fresh Ray)."""
    for attempt in range(1, tries + 1):
        try:
            return Service(store_url, data_dir, overrides, env)
        except RuntimeError:
            if attempt == tries:
                raise
            print(f"service did not start (try {attempt}); starting it again", file=sys.stderr)
    raise AssertionError("unreachable")


def _api_key(store_url: str) -> str:
    from serve.cli import main as cli_main
    import contextlib
    import io as _io

    out = _io.StringIO()
    with contextlib.redirect_stdout(out):
        cli_main(["create-key", "--tier", "enterprise", "--credits", "100000000", "-q", "--db", store_url])
    return out.getvalue().strip()


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by process `pid` and all its descendants (the
    service's child: its Ray, proxy, replicas) — comparable however busy the machine is."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def drive(base: str, key: str, model: str, n: int, concurrency: int, batch_size: int, poll: float,
          service_pid: int | None = None):
    """n submissions of `batch_size` images by `concurrency` clients; (wall s, latencies, images,
    CPU seconds used by the service and the clients during the measured part)."""
    client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=120,
                          limits=httpx.Limits(max_connections=concurrency * 2))

    def one(i: int) -> float:
        t0 = time.perf_counter()
        # `Prefer: wait`: the answer comes when the job is done (the ingress watches the store),
        # so clients do not spend the machine's CPU on status polls; poll only if it timed out.
        r = client.post("/v1/avatars/generate", json={"prompt": f"portrait {i}", "seed": i, "model": model,
                                                      "batchSize": batch_size}, headers={"Prefer": "wait=60"})
        r.raise_for_status()
        a = r.json()
        while a["status"] != "completed":
            if a["status"] in ("failed", "cancelled"):
                raise RuntimeError(a)
            time.sleep(poll)
            a = client.get(f"/v1/avatars/{a['id']}").json()
        for img in a["images"]:
            got = client.get(img["url"])
            got.raise_for_status()
            assert got.content[:8] == b"\x89PNG\r\n\x1a\n"
        return time.perf_counter() - t0

    for w in range(min(concurrency, 4)):  # warm-up: connections, first claims
        one(1_000_000 + w)
    cpu0 = (tree_cpu_seconds(service_pid) if service_pid else 0.0) + sum(os.times()[:2])
    wall, lat = run_clients(n, concurrency, one)
    cpu = (tree_cpu_seconds(service_pid) if service_pid else 0.0) + sum(os.times()[:2]) - cpu0
    client.close()
    return wall, lat, n * batch_size, cpu


def encode_ms(base: str) -> dict[str, float]:
    """Mean PNG(+thumbnail) encode ms per image by size, from the worker's metrics."""
    text = httpx.get(f"{base}/metrics", timeout=30).text
    sums, counts = {}, {}
    for line in text.splitlines():
        for suffix, into in (("_sum", sums), ("_count", counts)):
            prefix = f"avatar_image_encode_seconds{suffix}{{"
            if line.startswith(prefix):
                size = line.split('size="', 1)[1].split('"', 1)[0]
                into[size] = into.get(size, 0.0) + float(line.rsplit(" ", 1)[1])
    return {size: round(1000 * sums[size] / counts[size], 2) for size in sums if counts.get(size)}


def summary(wall: float, lat: list[float], images: int, cpu: float = 0.0) -> dict:
    """Throughput and latency as measured, plus the CPU the whole thing used per image and what
    that CPU cost allows on 2 cores of its own (`cpu_bound_2core_images_per_s`): on a shared,
    busy machine the wall-clock figures measure the neighbours too, the CPU cost does not."""
    out = {"images_per_s": round(images / wall, 2), "p50_s": round(percentile(lat, 0.50), 3),
           "p95_s": round(percentile(lat, 0.95), 3), "p99_s": round(percentile(lat, 0.99), 3),
           "images": images, "wall_s": round(wall, 2)}
    if cpu > 0:
        out["cpu_ms_per_image"] = round(1000 * cpu / images, 1)
        out["cpu_bound_2core_images_per_s"] = round(2 * images / cpu, 2)
    return out


def direct_engine(spec: str, n: int, batch_size: int, max_batch: int) -> dict:
    """The same requests through the benchmark engine in-process, in the chunks a worker claims."""
    from avatar_engine import GenerationRequest
    from benchmarks.bench_engine import BenchEngine

    engine = BenchEngine(spec)
    reqs = [GenerationRequest(prompt=f"portrait {i}", seed=i, batch_size=batch_size) for i in range(n)]
    engine.generate(reqs[:1])
    t0 = time.perf_counter()
    for s in range(0, n, max_batch):
        engine.generate(reqs[s:s + max_batch])
    wall = time.perf_counter() - t0
    return {"images_per_s": round(n * batch_size / wall, 2), "wall_s": round(wall, 2)}


def store_urls(names: list[str], data_root: str) -> dict[str, str]:
    urls = {}
    for name in names:
        if name == "sqlite":
            urls[name] = f"sqlite:///{data_root}/sqlite/avatar.db"
        elif name == "postgresql":
            dsn = os.environ.get("AVATAR_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
            sep = "&" if "?" in dsn else "?"
            urls[name] = f"{dsn}{sep}schema=bench_{uuid.uuid4().hex[:10]}"
        else:
            raise SystemExit(f"unknown store {name!r}")
    return urls


def drop_pg_schema(url: str) -> None:
    import psycopg

    dsn, _, query = url.partition("?")
    schema = dict(p.split("=", 1) for p in query.split("&") if "=" in p).get("schema")
    if schema:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def bench_engine(spec: str) -> dict:
    """Settings that make the service's model replica run the benchmark engine (it is no part of
    `serve`: the replica imports it from this repository, which is on its PYTHONPATH)."""
    return {"engine_factory": "benchmarks.bench_engine:BenchEngine", "engine_args": {"spec": spec}}


def bench_store(name: str, url: str, args, env) -> dict:
    data = tempfile.mkdtemp(prefix=f"ae-load-{name}-")
    common = {"max_batch": args.max_batch, "png_compress_level": args.png_level, "poll_seconds": 0.05,
              "wait_poll_max_s": 0.2}
    out: dict = {"store": name}
    svc = None
    try:
        svc = start_service(url, data, {**common, **bench_engine("null"),
                                        "models": ["bench-null", "bench-null-1024"]}, env)
        key = _api_key(url)
        for model, size, n in (("bench-null", 512, args.requests), ("bench-null-1024", 1024, max(4, args.requests // 4))):
            # Several runs, the median reported: one short run on a small machine can catch a
            # neighbour's (or Ray's own) burst; every run's figure is kept under "runs".
            runs = [summary(*drive(svc.base, key, model, n, args.concurrency, args.batch_size, args.poll,
                                   svc.proc.pid)) for _ in range(max(1, args.ceiling_runs))]
            r = dict(sorted(runs, key=lambda x: x["images_per_s"])[len(runs) // 2])
            r["runs_images_per_s"] = [x["images_per_s"] for x in runs]
            out[f"ceiling_{size}"] = r
            print(f"[{name}] ceiling {size}²: {r['images_per_s']} images/s, p50 {r['p50_s']} s, p95 {r['p95_s']} s,"
                  f" p99 {r['p99_s']} s ({r['images']} PNGs, median of runs {r['runs_images_per_s']}); CPU {r.get('cpu_ms_per_image')} ms/image →"
                  f" {r.get('cpu_bound_2core_images_per_s')} images/s on 2 free cores", file=sys.stderr)
        out["encode_ms_per_image"] = encode_ms(svc.base)
        print(f"[{name}] encode ms per image (PNG level {args.png_level} + thumbnail): {out['encode_ms_per_image']}",
              file=sys.stderr)
        svc.close()
        svc = None
        spec = f"sleep:{args.gpu_ms:g}"
        svc = start_service(url, data, {**common, **bench_engine(spec), "models": ["bench-sleep"]}, env)
        svc_r = summary(*drive(svc.base, key, "bench-sleep", args.requests, args.concurrency, args.batch_size,
                               args.poll, svc.proc.pid))
        direct = direct_engine(spec, args.requests, args.batch_size, args.max_batch)
        out["gpu_like"] = {"service": svc_r, "direct": direct, "gpu_ms_per_512_image": args.gpu_ms,
                           "overhead": round(1 - svc_r["images_per_s"] / direct["images_per_s"], 3)}
        print(f"[{name}] at {args.gpu_ms:g} ms/image: service {svc_r['images_per_s']} images/s (p50 {svc_r['p50_s']} s,"
              f" p95 {svc_r['p95_s']} s, p99 {svc_r['p99_s']} s) vs direct {direct['images_per_s']} images/s:"
              f" overhead {100 * out['gpu_like']['overhead']:.1f} %", file=sys.stderr)
    finally:
        if svc is not None:
            svc.close()
        if name == "postgresql":
            drop_pg_schema(url)
        shutil.rmtree(data, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--requests", type=int, default=240,
                    help="submissions per measured run (a quarter of them at 1024²)")
    ap.add_argument("-c", "--concurrency", type=int, default=24,
                    help="parallel clients (more than --max-batch, so the worker can pipeline batches)")
    ap.add_argument("--batch-size", type=int, default=2, help="images per submission (batchSize)")
    ap.add_argument("--ceiling-runs", type=int, default=3, help="ceiling runs per size; the median is reported")
    ap.add_argument("--max-batch", type=int, default=8, help="jobs per worker claim (the service's max_batch)")
    ap.add_argument("--gpu-ms", type=float, default=50.0, help="per-512²-image cost of the sleep engine")
    ap.add_argument("--png-level", type=int, default=1, help="the service's png_compress_level (its default: 1)")
    ap.add_argument("--stores", default="sqlite,postgresql")
    ap.add_argument("--poll", type=float, default=0.5,
                    help="seconds between a client's status polls after a `Prefer: wait` timed out")
    ap.add_argument("--steps", type=int, default=20, help="--vs-naive only")
    ap.add_argument("--vs-naive", action="store_true", help="the earlier tiny-sd15 comparison with naive_server.py")
    args = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "AVATAR_TIERS": json.dumps({"free": [10, 1], "pro": [60, 5], "enterprise": [100000, 1000]}),
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if args.vs_naive:
        return main_vs_naive(args, env)
    root = tempfile.mkdtemp(prefix="ae-load-")
    os.makedirs(f"{root}/sqlite", exist_ok=True)
    results = [bench_store(name, url, args, env)
               for name, url in store_urls([s.strip() for s in args.stores.split(",") if s.strip()], root).items()]
    shutil.rmtree(root, ignore_errors=True)
    first = results[0]
    out = {
        "ceiling_512_images_per_s": first["ceiling_512"]["images_per_s"],
        "ceiling_1024_images_per_s": first["ceiling_1024"]["images_per_s"],
        "ceiling_512_cpu_bound_2core_images_per_s": first["ceiling_512"].get("cpu_bound_2core_images_per_s"),
        "ceiling_1024_cpu_bound_2core_images_per_s": first["ceiling_1024"].get("cpu_bound_2core_images_per_s"),
        "overhead": first["gpu_like"]["overhead"],
        "encode_ms_per_image": first["encode_ms_per_image"],
        "stores": results, "requests": args.requests, "concurrency": args.concurrency,
        "batch_size": args.batch_size, "max_batch": args.max_batch, "gpu_ms": args.gpu_ms,
        "png_level": args.png_level, "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(out))


def main_vs_naive(args, env) -> None:
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
