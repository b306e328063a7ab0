"""Second device run: where SD1.5 time goes (profile of the default config) and the options
that should move it, each on the same case, b1 and b8, one process."""
import gc, json, os, sys, time, traceback
sys.path.insert(0, "benchmarks")
import torch
import gpu_suite as gs
from gpu_suite import Case

OUT = os.environ.get("OUT", "/tmp/diag")
os.makedirs(OUT, exist_ok=True)
CPU = os.environ.get("DIAG_CPU") == "1"
dev = "cpu" if CPU else "cuda"
case = Case("sd15 generate", "tiny-sd15", 64, 2, "generate", (1, 8)) if CPU else Case("sd15 generate", "sd15-random", 512, 25, "generate", (1, 8))
base = {"compile": True, "compile_backend": "eager"} if CPU else {}
VARIANTS = [
    ("defaults (regional, dynamic)", {}, True),
    ("channels_last off", {"channels_last": False}, False),
]
t0 = time.perf_counter()
report = {"micro": {}, "variants": []}

def save():
    report["elapsed_s"] = round(time.perf_counter() - t0, 1)
    with open(f"{OUT}/diag.json", "w") as f:
        json.dump(report, f, indent=1)

def timeit(fn, n=20):
    for _ in range(3):
        fn()
    if not CPU: torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    if not CPU: torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3

# micro: GroupNorm on channels_last vs contiguous, SDPA at SD1.5's first level
try:
    dt = torch.bfloat16 if not CPU else torch.float32
    x = torch.randn(16, 320, 64, 64, device=dev, dtype=dt)
    gn = torch.nn.GroupNorm(32, 320).to(dev, dt)
    xc = x.contiguous(memory_format=torch.channels_last)
    report["micro"]["groupnorm_contiguous_ms"] = round(timeit(lambda: gn(x)), 3)
    report["micro"]["groupnorm_channels_last_ms"] = round(timeit(lambda: gn(xc)), 3)
    conv = torch.nn.Conv2d(320, 320, 3, padding=1).to(dev, dt)
    convc = torch.nn.Conv2d(320, 320, 3, padding=1).to(dev, dt).to(memory_format=torch.channels_last)
    report["micro"]["conv3x3_contiguous_ms"] = round(timeit(lambda: conv(x)), 3)
    report["micro"]["conv3x3_channels_last_ms"] = round(timeit(lambda: convc(xc)), 3)
    q = torch.randn(32, 8, 4096, 40, device=dev, dtype=dt)
    f = torch.nn.functional.scaled_dot_product_attention
    report["micro"]["sdpa_4096x40_ms"] = round(timeit(lambda: f(q, q, q), 10), 3)
    report["micro"]["sdpa_tflops"] = round(4 * 32 * 8 * 4096 * 4096 * 40 / (report["micro"]["sdpa_4096x40_ms"] / 1e3) / 1e12, 1)
    del x, xc, q
except Exception as exc:
    report["micro"]["error"] = repr(exc)[:300]
save()
print(json.dumps(report["micro"]), flush=True)

for label, ov, prof in VARIANTS:
    if time.perf_counter() - t0 > float(os.environ.get("DIAG_BUDGET", 330)):
        report["variants"].append({"variant": label, "skipped": "budget"}); save(); continue
    torch._dynamo.reset()
    entry = {"variant": label, "overrides": ov, "rows": []}
    report["variants"].append(entry)
    try:
        eng = gs.make_engine(case, dev, {**base, **ov})
        t = time.perf_counter(); eng.load(case.profile); entry["load_s"] = round(time.perf_counter() - t, 1)
        for b in case.batches:
            row = gs.measure(eng, case, b, 3)
            entry["rows"].append({k: row.get(k) for k in ("batch", "images_per_s", "seconds_per_call", "first_call_s", "peak_memory_gb")})
            print(label, json.dumps(entry["rows"][-1]), flush=True)
            save()
        if prof:
            from avatar_engine.runtime.warmup import variant_requests
            model = eng.load(case.profile)
            reqs = variant_requests(model, "generate", 8, steps=case.steps)
            acts = [torch.profiler.ProfilerActivity.CPU] + ([] if CPU else [torch.profiler.ProfilerActivity.CUDA])
            with torch.profiler.profile(activities=acts) as p:
                eng.generate(reqs)
                if not CPU: torch.cuda.synchronize()
            key = "cpu_time_total" if CPU else "cuda_time_total"
            tag = label.split()[0].replace("_", "")
            with open(f"{OUT}/profile_{tag}.txt", "w") as f:
                f.write(p.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70))
    except Exception as exc:
        traceback.print_exc()
        entry["error"] = f"{type(exc).__name__}: {exc}"[:400]
    try:
        del eng
    except NameError:
        pass
    gc.collect()
    if not CPU: torch.cuda.empty_cache()
    save()
print(json.dumps(report, indent=1))
