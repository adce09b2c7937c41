"""The benchmark runner runs end to end on a tiny grid (a smoke test: no timing is asserted)."""

from __future__ import annotations

import csv

from mlc_kernels.benchmarks.runner import main


def test_mlc_bench_writes_csv_and_plots(tmp_path, capsys):
    main(
        [
            "--device", "cpu", "--grid", "3x4x16", "--impls", "reference,torch,native", "--budget", "0.01",
            "--no-memory", "--fused-linear-shape", "6x4x16x8", "--hf-shape", "1x2x4", "--out", str(tmp_path), "--quiet",
        ]
    )  # fmt: skip
    assert "MLC loss benchmark on" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "mlc_bench.csv")))
    assert {r["impl"] for r in rows} == {"reference", "torch", "native"}
    assert {r["mode"] for r in rows} == {"forward", "backward", "full"}
    assert all(float(r["time_ms"]) > 0 for r in rows)
    assert all(float(r["speedup_vs_reference"]) > 0 for r in rows)
    fused = list(csv.DictReader(open(tmp_path / "fused_linear.csv")))
    assert [r["variant"] for r in fused] == ["unfused", "fused"]
    capture = list(csv.DictReader(open(tmp_path / "hf_capture.csv")))
    assert [r["variant"] for r in capture] == ["naive", "truncated", "grad_cache"]
    for name in ("mlc_bench.png", "fused_linear.png"):
        assert (tmp_path / name).stat().st_size > 1000
