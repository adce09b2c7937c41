#!/usr/bin/env bash
# The GPU check, in one call: sections in order of priority, each under its own timeout and all within
# one overall budget (BUDGET seconds, default 480; QUICK=1: 220 and smaller sections), so the whole
# script ends in about 8 minutes (4 with QUICK=1) on an H100. A failing section does not stop the others.
#   1. targets: kernel target metrics (bandwidth share, speed-up over torch; do_bench medians)
#   2. tests: pytest -m gpu (tests/test_gpu.py)
#   3. profile: per-kernel device time, host vs device time per call, CUDA-graph replay floor, eigh baseline,
#      fused-linear peak memory attribution (benchmarks/gpu_profile.py)
#   4. host: host time per fwd+bwd as a ratio to F.cross_entropy (benchmarks/host_overhead.py)
#   5. base: DPO+MLC / DPO step with the base variant in its own pass vs from the policy forward
#   6. loss: the loss grid
#   7. tune: the quick Triton configuration sweep of the three kernels
#   8. fused: fused linear MLC loss at the default chunk
#   9. hf: hf-capture (variant passes: naive / truncated / gradient cache)
#  10. packed: packed against padded variant passes on the sample set (benchmarks/packed_passes.py)
#  11. train: a whole DPO vs DPO+MLC training step on a Qwen2-0.5B-shaped model
# SECTIONS="targets tests profile host base loss tune fused hf packed train" picks parts; "distributed" adds the
# FSDP2 test.
# Runs from the repo root on a CUDA machine with nothing installed and no network (torch and triton from
# the image; this repo on PYTHONPATH). Wheels in .whl/ are installed into /tmp/site-packages first.
# Writes CSV/PNG/TXT per section and summary.txt (one line per target metric) to OUT_DIR.
# SMOKE=1 dry-runs every section on the CPU with tiny shapes (the Triton interpreter): checks the script.
# BUNDLE=FILE.tgz also writes one archive of OUT_DIR (a device tool that returns few files: OUT_DIR outside its
# output folder, the archive inside it).
# Usage: bash benchmarks/gpu_check.sh OUT_DIR        (QUICK=1 bash benchmarks/gpu_check.sh OUT_DIR)
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
quick=${QUICK:-0}
if [[ $quick == 1 ]]; then budget=${BUDGET:-220}; else budget=${BUDGET:-480}; fi
sections=" ${SECTIONS:-targets tests profile host base loss tune fused hf packed train} "
mkdir -p "$out"
start=$SECONDS
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-packages .whl/*.whl \
    && export PYTHONPATH="/tmp/site-packages${PYTHONPATH:+:$PYTHONPATH}"
fi
# the package as installed (mlc-bench is mlc_kernels.bench; benchmarks/ runs from the checkout), editable, offline
timeout 60 python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "editable install failed"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
{
  nvidia-smi
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python3 -m pip list 2>/dev/null | grep -iE "^(trl|datasets|accelerate|transformers|pyarrow|numpy) "
} >"$out/env.txt" 2>&1
head -3 "$out/env.txt" | tail -1
grep -E "^python" "$out/env.txt"
: >"$out/sections.txt"

# section NAME WANT_SECONDS COMMAND...: runs under min(WANT, what is left of the budget); logs to NAME.log
section() {
  local name=$1 want=$2
  shift 2
  local left=$((budget - (SECONDS - start)))
  local limit=$((want < left ? want : left))
  if ((limit < 20)); then
    echo "$name: skipped (budget spent)" | tee -a "$out/sections.txt"
    return
  fi
  echo "== $name (limit ${limit}s, $((SECONDS - start))s elapsed) =="
  local t0=$SECONDS rc
  timeout -k 10 "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  tail -15 "$out/$name.log"
  local verdict=ok
  ((rc == 124 || rc == 137)) && verdict="TIMEOUT after ${limit}s"
  ((rc != 0 && rc != 124 && rc != 137)) && verdict="FAILED rc=$rc"
  echo "$name: $verdict ($((SECONDS - t0))s)" | tee -a "$out/sections.txt"
}

smoke=() cpu=() fused_shape=() hf_shape=()
if [[ ${SMOKE:-0} == 1 ]]; then
  smoke=(--smoke) cpu=(--device cpu --impls torch,native --no-memory) fused_shape=(--fused-linear-shape 16x10x64x32)
  hf_shape=(--hf-shape 2x3x8)
fi
if [[ $quick == 1 ]]; then
  grid="4096x10x4096,256x10x4096" objectives=sv_softmax tune_args=(--quick --m-pad 16) pytest_k=(-k "not compile")
else
  grid="256x10x1024,256x10x4096,256x32x4096,4096x10x1024,4096x10x4096,4096x32x1024"
  objectives=sv_softmax,signed_sv_softmax,pairwise tune_args=(--quick) pytest_k=()
fi
if [[ ${SMOKE:-0} == 1 ]]; then
  objectives=signed_sv_softmax tune_args=(--m-pad 16)
fi
if [[ $sections == *" targets "* ]]; then
  section kernel_targets 90 python3 -m benchmarks.kernel_targets --out "$out" --objectives "$objectives" "${smoke[@]}"
fi
if [[ $sections == *" tests "* ]]; then
  section pytest_gpu 120 python3 -m pytest -q -p no:cacheprovider -o addopts="" -rs -m gpu tests/test_gpu.py "${pytest_k[@]}"
fi
if [[ $sections == *" profile "* ]]; then
  section gpu_profile 120 python3 -m benchmarks.gpu_profile --out "$out" "${smoke[@]}" \
    $([[ ${SMOKE:-0} == 1 ]] && echo --parts=kernels,fused)
fi
if [[ $sections == *" host "* ]]; then
  section host_overhead 60 python3 -m benchmarks.host_overhead --rounds 7 --out "$out/host_overhead.json" \
    $([[ ${SMOKE:-0} == 1 ]] && echo "--device=cpu --impls=native --rounds=1 --iters=2")
fi
if [[ $sections == *" base "* ]] && ! python3 -c "import trl" >/dev/null 2>&1; then
  echo "base_from_policy_step: skipped (no TRL on this machine)" | tee -a "$out/sections.txt"
elif [[ $sections == *" base "* ]]; then
  section base_from_policy_step 60 python3 -m benchmarks.base_from_policy_step --out "$out" \
    $([[ ${SMOKE:-0} == 1 ]] && echo "--rounds=1" || echo "--device=cuda --vocab=32000")
fi
if [[ $sections == *" loss "* ]]; then
  section loss_grid "$([[ $quick == 1 ]] && echo 45 || echo 150)" python3 -m mlc_kernels.bench.runner --suite loss --out "$out" \
    --quiet --budget 0.2 --grid "$([[ ${SMOKE:-0} == 1 ]] && echo 4x10x64 || echo "$grid")" "${cpu[@]}"
fi
if [[ $sections == *" tune "* ]]; then
  section tune "$([[ $quick == 1 ]] && echo 50 || echo 90)" python3 -m benchmarks.tune_triton --out "$out" "${tune_args[@]}" "${smoke[@]}"
fi
if [[ $sections == *" fused "* ]]; then
  section fused_linear 45 python3 -m mlc_kernels.bench.runner --suite fused-linear --out "$out" --quiet --budget 0.2 \
    "${cpu[@]}" "${fused_shape[@]}"
fi
if [[ $sections == *" hf "* ]]; then
  section hf_capture 45 python3 -m mlc_kernels.bench.runner --suite hf-capture --out "$out" --quiet --budget 0.2 \
    "${cpu[@]}" "${hf_shape[@]}"
fi
if [[ $sections == *" packed "* ]]; then
  section packed_passes 40 python3 -m benchmarks.packed_passes --out "$out" --min-run-time 1 \
    "$([[ ${SMOKE:-0} == 1 ]] && echo --device=cpu || echo --device=cuda)"
fi
if [[ $sections == *" train "* ]]; then
  section train_step 90 python3 -m benchmarks.dpo_step --out "$out" "${smoke[@]}"
fi
if [[ $sections == *" distributed "* ]]; then
  section pytest_distributed 200 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu tests/test_distributed.py
fi

{
  echo "device: $(grep -m1 -E '^NVIDIA' "$out/env.txt")"
  grep -E "^python" "$out/env.txt"
  [[ -f $out/kernel_targets.txt ]] && cat "$out/kernel_targets.txt"
  [[ -f $out/gpu_profile.txt ]] && cat "$out/gpu_profile.txt"
  [[ -f $out/host_overhead.log ]] && grep -E "^\{" "$out/host_overhead.log"
  [[ -f $out/base_from_policy_step.txt ]] && cat "$out/base_from_policy_step.txt"
  [[ -f $out/tune.log ]] && grep -E "^best" "$out/tune.log"
  [[ -f $out/fused_linear.log ]] && grep -iE "fused|chunk" "$out/fused_linear.log" | grep -vE "^wrote" | tail -4
  [[ -f $out/hf_capture.log ]] && grep -E "^(naive|truncated|grad_cache)" "$out/hf_capture.log"
  [[ -f $out/packed_passes.log ]] && grep -E " (padded|packed) " "$out/packed_passes.log"
  [[ -f $out/dpo_step.txt ]] && cat "$out/dpo_step.txt"
  [[ -f $out/pytest_gpu.log ]] && echo "pytest -m gpu: $(tail -1 "$out/pytest_gpu.log")"
  cat "$out/sections.txt"
  echo "total: $((SECONDS - start))s"
} >"$out/summary.txt" 2>/dev/null
echo "== summary =="
cat "$out/summary.txt"
if [[ -n ${BUNDLE:-} ]]; then tar czf "$BUNDLE" -C "$out" . && echo "bundle: $BUNDLE"; fi
! grep -qE "FAILED|TIMEOUT" "$out/sections.txt"
