"""Ahead-of-time compilation of every Triton kernel configuration for sm_90 and sm_80 (no GPU needed).

Runs in a child process without TRITON_INTERPRET (the test session interprets kernels).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mlc_kernels.ops.triton_kernels import all_kernel_configs


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "mlc_kernels.ops.triton_aot", "--arch", "90", "80"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_every_dispatch_config_compiles_for_sm90_and_sm80(compiled):
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    expected = {
        (f"sm_{arch}", names[dtype], cfg.m_pad, cfg.block_d, cfg.num_warps, cfg.num_stages)
        for arch, dtype, cfg in all_kernel_configs()
    }
    got = {(r["arch"], r["dtype"], r["m_pad"], r["block_d"], r["num_warps"], r["num_stages"]) for r in compiled}
    assert got == expected
    assert {arch for arch, _, _ in all_kernel_configs()} == {90, 80}
    assert all(row["ptx_bytes"] > 0 for row in compiled)


def test_no_register_spills(compiled):
    import triton

    # Triton 3.6 (the GPU image's) lets ptxas spill 4 bytes in the sm_90 bf16 m_pad=16 kernel, which was
    # still the fastest measured; the Triton this project installs (3.8, 3.9) must produce no spill.
    strict = tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 8)
    for row in compiled:
        limit = 0 if strict else 16
        assert row["spill_stores"] <= limit and row["spill_loads"] <= limit, f"ptxas reports register spills: {row}"
        assert row["local"] == 0, f"LOCAL bytes in {row}"
        assert 0 < row["reg"] <= 255, row
