"""The benchmark runner's structure on tiny shapes (suite selection, CSV columns, threads, one PNG per
suite, the command's name in its messages): a smoke test, no timing is asserted."""

from __future__ import annotations

import csv

import pytest

from mlc_kernels.bench import loss, train_step
from mlc_kernels.bench.runner import main, parse_suites
from mlc_kernels.bench.utils import Options, Timing, default_threads

TINY = ["--device", "cpu", "--budget", "0.01", "--no-memory", "--quiet", "--threads", "1"]


def _csv(path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_grid_alone_runs_only_the_loss_suite(tmp_path, capsys):
    main([*TINY, "--grid", "3x4x16", "--impls", "reference,torch,native", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "MLC loss benchmark on" in out and "1 intra-op threads" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlc_bench.csv", "mlc_bench.png"]
    rows = _csv(tmp_path / "mlc_bench.csv")
    (calibration,) = [r for r in rows if r["impl"] == "calibration"]  # the machine's speed, one row per run
    assert calibration["mode"] == "matmul" and float(calibration["median_ms"]) > 0
    rows = [r for r in rows if r is not calibration]
    assert {r["impl"] for r in rows} == {"reference", "torch", "native"}
    assert {r["mode"] for r in rows} == {"forward", "backward", "full"}
    for r in rows:
        assert float(r["min_ms"]) <= float(r["median_ms"]) <= float(r["max_ms"])
        assert float(r["iqr_ms"]) >= 0 and int(r["runs"]) >= 3 and r["threads"] == "1"
        assert float(r["speedup_vs_reference"]) > 0
    assert (tmp_path / "mlc_bench.png").stat().st_size > 1000


def test_every_requested_suite_runs_and_writes_a_png(tmp_path):
    # train-step used to return early from main, so the suites after it never ran
    main(
        [
            *TINY,
            "--suite",
            "fused-linear,hf-capture",
            "--fused-linear-shape",
            "6x4x16x8",
            "--hf-shape",
            "1x2x4",
            "--out",
            str(tmp_path),
        ]
    )
    fused = _csv(tmp_path / "fused_linear.csv")
    assert [r["variant"] for r in fused] == ["unfused", "fused"]
    assert all("median_ms" in r and "iqr_ms" in r and r["threads"] == "1" for r in fused)
    capture = _csv(tmp_path / "hf_capture.csv")
    assert [r["variant"] for r in capture] == ["naive", "truncated", "grad_cache"]
    for name in ("fused_linear.png", "hf_capture.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert not (tmp_path / "mlc_bench.csv").exists()


def test_fused_linear_memory_under_the_default_allocator(tmp_path, capsys):
    main(
        [
            *TINY[:4],
            "--quiet",
            "--threads",
            "1",
            "--suite",
            "fused-linear",
            "--fused-linear-shape",
            "8x4x32x16",
            "--out",
            str(tmp_path),
        ]
    )
    rows = _csv(tmp_path / "fused_linear.csv")
    assert all(r["allocator"] == "glibc-default" and r["peak_extra_bytes"] != "" for r in rows)
    assert "glibc-default" in capsys.readouterr().out


def test_usage_and_errors_name_the_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "--rounds", "0", "--grid", "2x2x4"], prog="mlc bench")
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("usage: mlc bench ")
    assert "mlc bench: error: --rounds must be >= 1, got 0" in err
    with pytest.raises(SystemExit):
        main([*TINY, "--suite", "nope"])
    assert "mlc-bench: error: --suite: unknown ['nope']" in capsys.readouterr().err


def test_suite_selection():
    assert parse_suites(None, grid_given=True) == ["loss"]
    assert parse_suites(None, grid_given=False) == ["loss", "fused-linear", "hf-capture"]
    assert parse_suites("train-step,loss", grid_given=True) == ["train-step", "loss"]
    assert parse_suites("all,train-step", grid_given=False)[-1] == "train-step"
    with pytest.raises(Exception, match="unknown"):
        parse_suites("nope", grid_given=False)


def test_threads_and_timing_statistics():
    assert 1 <= default_threads()
    t = Timing.of([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (t.median_ms, t.min_ms, t.max_ms, t.runs) == (3.0, 1.0, 5.0, 5)
    assert t.iqr_ms == pytest.approx(2.0)


def test_suites_after_train_step_still_run(tmp_path, monkeypatch):
    fake = [
        {
            "device": "cpu",
            "variant": v,
            "median_ms": 1.0,
            "iqr_ms": 0.0,
            "min_ms": 1.0,
            "max_ms": 1.0,
            "runs": 3,
            "threads": 1,
            "peak_extra_bytes": None,
            "time_vs_dpo": 1.0,
            "memory_vs_dpo": None,
        }
        for v in ("dpo", "mlc")
    ]
    monkeypatch.setattr(train_step, "run_train_step", lambda opts: fake)
    main([*TINY, "--suite", "train-step,fused-linear", "--fused-linear-shape", "6x4x16x8", "--out", str(tmp_path)])
    assert {p.name for p in tmp_path.iterdir()} == {
        "train_step.csv",
        "train_step.png",
        "fused_linear.csv",
        "fused_linear.png",
    }


def test_rounds_pool_each_cells_samples_over_passes_with_fresh_inputs(monkeypatch):
    import torch

    calls: list[tuple[int, int, float]] = []

    def fake_mode_times(reps, impl, budget_s, threads, min_blocks, warmup):
        calls.append((reps.data_ptr(), warmup, budget_s))
        value = float(len(calls))  # pass r of the single cell gives r + 1 ms
        return {mode: [value] * min_blocks for mode in loss.MODES}

    monkeypatch.setattr(loss, "mode_times", fake_mode_times)
    opts = Options(torch.device("cpu"), budget_s=0.3, memory=False, threads=1, rounds=3)
    rows = loss.run_grid([(2, 3, 4)], ["torch"], ["fp32"], opts)
    assert len(calls) == 3  # one visit per pass
    assert [w for _, w, _ in calls] == [2, 1, 1]  # full warm-up on the first pass only
    assert all(b == pytest.approx(0.1) for _, _, b in calls)  # the budget is shared by the passes
    full = next(r for r in rows if r["mode"] == "full")
    assert (full["min_ms"], full["median_ms"], full["max_ms"], full["runs"]) == (1.0, 2.0, 3.0, 6)  # 2 blocks per pass


def test_compare_runs_divides_out_the_machine_speed(tmp_path, capsys):
    from benchmarks.compare_runs import compare

    header = "device,impl,dtype,N,m,d,d_h,mode,variant,threads,median_ms,min_ms,iqr_ms\n"
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    # run B on a machine 1.5x slower: calibration and cell both 1.5x
    cal, cell = "cpu,calibration,fp32,512,0,512,,matmul,,1,{0},{0},0.1\n", "cpu,torch,fp32,4,2,8,,full,,1,{0},{0},1\n"
    a.write_text(header + cal.format(2.0) + cell.format(10.0))
    b.write_text(header + cal.format(3.0) + cell.format(15.0))
    lines, worst = compare(a, b, 0.2)
    assert lines[0].startswith("machine speed: calibration B/A 1.50") and worst == pytest.approx(0.5)
    lines, worst = compare(a, b, 0.2, normalise=True)
    assert worst == pytest.approx(0.0) and "x cal" in lines[1]
