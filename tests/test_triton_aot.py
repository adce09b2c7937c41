"""Ahead-of-time compilation of every Triton kernel configuration for sm_90 and sm_80 (no GPU needed).

Runs in a child process without TRITON_INTERPRET (the test session interprets kernels).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlc_kernels.ops.triton import all_kernel_configs


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.triton_aot", "--arch", "90", "80"],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],  # a maintainer tool of the checkout, not of the package
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_every_dispatch_config_compiles_for_sm90_and_sm80(compiled):
    from benchmarks.triton_aot import kernel_launches

    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    expected = set()
    for arch, dtype, cfg in all_kernel_configs():
        for kernel, constexprs, options in kernel_launches(dtype, cfg):
            elem = names[dtype]
            sizes = tuple(sorted((k.lower(), v) for k, v in constexprs.items() if k != "N_SWEEPS"))
            expected.add((f"sm_{arch}", kernel, elem, sizes, options["num_warps"], options["num_stages"]))
    keys = ("m_pad", "block_d", "prompts", "resid_block_d", "has_mask")
    got = {
        (r["arch"], r["kernel"], r["dtype"], tuple(sorted((k, r[k]) for k in keys if k in r)), r["num_warps"],
         r["num_stages"])
        for r in compiled
    }  # fmt: skip
    assert got == expected
    assert {r["kernel"] for r in compiled} == {
        "mlc_gram_kernel",
        "mlc_small_kernel",
        "mlc_grad_kernel",
    }
    assert {arch for arch, _, _ in all_kernel_configs()} >= {90, 80}
    assert all(row["ptx_bytes"] > 0 for row in compiled)


def test_no_register_spills(compiled):
    import triton

    # The Triton this project installs (3.8, 3.9) must produce no spill; older ones (the GPU image's 3.6)
    # may let ptxas spill a few bytes.
    strict = tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 8)
    for row in compiled:
        limit = 0 if strict else 16
        assert row["spill_stores"] <= limit and row["spill_loads"] <= limit, f"ptxas reports register spills: {row}"
        assert row["local"] == 0, f"LOCAL bytes in {row}"
        assert 0 < row["reg"] <= 255, row
