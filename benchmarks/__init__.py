"""Maintainer benchmarks, run from a checkout (``python -m benchmarks.<script>``, ``bash benchmarks/gpu_check.sh``) and
not part of the wheel; they build on the user-facing ``mlc-bench`` (``mlc_kernels.bench``). Results: ``results/``."""
