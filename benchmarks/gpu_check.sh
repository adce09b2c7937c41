#!/usr/bin/env bash
# The GPU check: GPU tests + Triton config sweep + the benchmark grid + fused linear loss, in one call.
# TUNE_MODE=" " runs the full configuration sweep instead of the quick one.
# Runs from the repo root on a CUDA machine with nothing installed and no network (torch and
# triton from the image; this repo on PYTHONPATH). Usage: bash benchmarks/gpu_check.sh OUT_DIR
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$out/env.txt"

echo "== tests (whole suite: Triton compiled on the GPU) =="
timeout 200 python3 -m pytest tests -q -p no:cacheprovider -o addopts="" 2>&1 | tee "$out/pytest.txt" | tail -25 || status=1
grep -qE "passed" "$out/pytest.txt" && ! grep -qE "[0-9]+ failed|error" "$out/pytest.txt" || status=1

echo "== Triton configuration sweep (${TUNE_MODE:---quick}) =="
timeout 200 python3 -m benchmarks.tune_triton --out "$out" ${TUNE_MODE:---quick} 2>&1 | tee "$out/tune.txt" | grep -E "best|Error" || status=1

echo "== benchmark grid and fused linear loss (shipped configurations) =="
timeout 240 python3 -m benchmarks.runner --out "$out" --quiet 2>&1 | tee "$out/bench.txt" || status=1
exit $status
