#!/usr/bin/env bash
# The prepared GPU run of issue 19: one command, about 9 minutes on one H200 including compiles,
# decisive rows first. Results land in ${OUT:-gpu_run_out}/ (micro.json, sd15.{json,md}, stepcache.{json,md},
# rest.{json,md}, quality.json: PSNR of FP8 and step caching against the exact bf16 images).
#
#   bash benchmarks/gpu_run.sh
#
# Packages the GPU machine lacks travel as wheels in ./wheels (an ignored folder, carried with the
# working tree; keep it under 64 MiB), prepared on the CPU machine with
#   pip download --no-deps diffusers==0.42.1 torchao==0.18.0 -d wheels      # ~7 MB
# and installed here without touching the machine's CUDA torch.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_run_out}
mkdir -p "$OUT"
START=$(date +%s)
left() { echo $(( ${1} - ($(date +%s) - START) )); }
if compgen -G "wheels/*.whl" > /dev/null; then
  python -m pip install -q --no-deps wheels/*.whl
fi
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-gpu-run}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/env.txt" 2>&1
python -c "import torch, diffusers; print(torch.__version__, torch.version.cuda, 'diffusers', diffusers.__version__)" >> "$OUT/env.txt" 2>&1
# 1. micro checks (~30 s): FP8 vs bf16 matmul on SD1.5's shapes, compiled GroupNorm+SiLU
timeout 60 python benchmarks/micro_checks.py > "$OUT/micro.json" 2>> "$OUT/stderr.txt"
# 2. SD1.5 512², 25 steps, CFG, batch 1 and 8: plain diffusers eager, the engine's whole-UNet +
#    CUDA graphs (the candidate), the same with FP8, the regional default, then plain diffusers
#    compiled (its max-autotune compile is the slowest); each in its own process with a timeout.
#    Every engine row keeps its images (same seeds) for step 4's PSNR against the exact bf16 rows.
timeout $(left 420) python benchmarks/gpu_suite.py --only 'sd15 generate' --batches 1,8 \
  --configs full-graphs,full-graphs-fp8,default --plain eager,compiled --repeats 3 --images-dir "$OUT/images" \
  --budget-s $(left 380) --child-timeout-s 170 --out "$OUT/sd15" > "$OUT/sd15.summary.json" 2>> "$OUT/stderr.txt"
# 3. as time allows: step caching (interval 3) on the candidate at batch 8, then percify, cast,
#    mixed-style LoRA batches (issue 24) and SDXL on the candidate
if [ "$(left 520)" -gt 90 ]; then
  timeout $(left 470) python benchmarks/gpu_suite.py --only 'sd15 generate' --batches 8 \
    --configs full-graphs-stepcache --plain '' --repeats 2 --images-dir "$OUT/images" --budget-s $(left 460) \
    --child-timeout-s 120 --out "$OUT/stepcache" > "$OUT/stepcache.summary.json" 2>> "$OUT/stderr.txt"
fi
if [ "$(left 520)" -gt 60 ]; then
  timeout $(left 530) python benchmarks/gpu_suite.py --only 'sd15 percify,sd15 cast,sd15 styles,sdxl generate' --batches 4,8 \
    --configs full-graphs --plain eager --repeats 2 --budget-s $(left 500) --child-timeout-s 150 \
    --out "$OUT/rest" > "$OUT/rest.summary.json" 2>> "$OUT/stderr.txt"
fi
# 4. what FP8 and step caching cost in pixels: PSNR against the exact bf16 rows of the same seeds
python benchmarks/quality.py compare "$OUT/images" > "$OUT/quality.json" 2>> "$OUT/stderr.txt"
echo "gpu_run: $(( $(date +%s) - START )) s; results in $OUT/"
