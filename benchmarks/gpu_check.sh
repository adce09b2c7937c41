#!/usr/bin/env bash
# The GPU check: GPU tests + Triton config sweep + the benchmark grid + fused linear loss, in one call.
# TUNE_MODE=" " runs the full configuration sweep instead of the quick one. SECTIONS picks the parts
# (default "tests tune bench"; "distributed" runs the FSDP2-through-accelerate test alone).
# Runs from the repo root on a CUDA machine with nothing installed and no network (torch and
# triton from the image; this repo on PYTHONPATH). Wheels in .whl/ (TRL, datasets: the image lacks
# them) are installed into /tmp/site-packages first (the folder name matters: datasets' dill pickles modules
# by value unless their path contains "site-packages"). Usage: bash benchmarks/gpu_check.sh OUT_DIR
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
sections=" ${SECTIONS:-tests tune bench} "
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-packages .whl/*.whl \
    && export PYTHONPATH="/tmp/site-packages${PYTHONPATH:+:$PYTHONPATH}"
fi
# the package as installed (mlc_kernels.benchmarks maps to benchmarks/), editable, offline
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "editable install failed"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$out/env.txt"

pytest_run() {  # name, timeout, pytest arguments...
  local name=$1 limit=$2
  shift 2
  timeout "$limit" python3 -m pytest -q -p no:cacheprovider -o addopts="" -rs "$@" 2>&1 | tee "$out/$name.txt" | tail -25
  grep -qE "passed" "$out/$name.txt" && ! grep -qE "[0-9]+ failed|[0-9]+ error" "$out/$name.txt" || status=1
}
python3 -m pip list 2>/dev/null | grep -iE "^(trl|datasets|accelerate|transformers|pyarrow) " >>"$out/env.txt"

if [[ $sections == *" distributed "* ]]; then
  echo "== FSDP2 through accelerate launch on one GPU vs plain training =="
  pytest_run pytest_distributed 200 tests/test_distributed.py -m gpu
fi
if [[ $sections == *" tests "* ]]; then
  echo "== tests (whole suite: Triton compiled on the GPU) =="
  pytest_run pytest 300 tests
fi
if [[ $sections == *" tune "* ]]; then
  echo "== Triton configuration sweep (${TUNE_MODE:---quick}) =="
  timeout 200 python3 -m benchmarks.tune_triton --out "$out" ${TUNE_MODE:---quick} 2>&1 | tee "$out/tune.txt" | grep -E "best|Error" || status=1
fi
if [[ $sections == *" bench "* ]]; then
  echo "== benchmark grid and fused linear loss (shipped configurations) =="
  timeout 240 python3 -m benchmarks.runner --out "$out" --quiet 2>&1 | tee "$out/bench.txt" || status=1
fi
exit $status
