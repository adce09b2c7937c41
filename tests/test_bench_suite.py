"""pytest-benchmark suite: ``MLC_BENCH_SUITE=1 pytest tests/test_bench_suite.py`` (skipped in the default run).
It stays here, out of the wheel (the user-facing benchmark is ``mlc-bench``, ``mlc_kernels.bench``).

Forward+backward of each impl on CPU (and CUDA when present) at the sizes of the README table.
"""

from __future__ import annotations

import os

import pytest
import torch

from mlc_kernels import mlc_loss

pytestmark = pytest.mark.skipif(
    os.environ.get("MLC_BENCH_SUITE") != "1", reason="benchmark suite: set MLC_BENCH_SUITE=1 to run it"
)
pytest.importorskip("pytest_benchmark")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPES = [(64, 10, 1024), (256, 10, 4096)]


def _impls(device: str) -> list[str]:
    return ["reference", "torch"] + (["triton"] if device == "cuda" else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_forward_backward(benchmark, device, shape, impl):
    if impl not in _impls(device):
        pytest.skip(f"{impl} does not run on {device}")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    reps = torch.randn(*shape, device=device, dtype=dtype).requires_grad_()

    def step():
        reps.grad = None
        mlc_loss(reps, impl=impl).backward()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark(step)
    assert reps.grad is not None and torch.isfinite(reps.grad).all()
