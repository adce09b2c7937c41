"""Ahead-of-time compilation of every Triton kernel configuration for sm_90 and sm_80 (no GPU needed).

Runs in a child process without TRITON_INTERPRET (the test session interprets kernels).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

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
    expected = {
        (
            arch,
            str(dtype)
            .removeprefix("torch.")
            .replace("float32", "fp32")
            .replace("bfloat16", "bf16")
            .replace("float16", "fp16"),
            cfg.m_pad,
            cfg.block_d,
        )
        for arch in ("sm_90", "sm_80")
        for dtype, cfg in all_kernel_configs()
    }
    got = {(row["arch"], row["dtype"], row["m_pad"], row["block_d"]) for row in compiled}
    assert got == expected
    assert all(row["ptx_bytes"] > 0 for row in compiled)


def test_no_register_spills(compiled):
    for row in compiled:
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, f"ptxas reports register spills: {row}"
        assert row["local"] == 0, f"LOCAL bytes in {row}"
        assert 0 < row["reg"] <= 255, row
