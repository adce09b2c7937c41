"""The loss suite (``mlc-bench --suite loss``): forward, backward and forward+backward of every impl over a grid of
``(N, m, d)`` and dtypes, each cell's samples pooled over ``--rounds`` interleaved passes, a calibration row, the
speed-up over ``reference`` measured in the same run, and the peak memory of one forward+backward above the inputs
(CUDA allocator; on CPU a fresh child process, this module run as ``__main__``). Writes ``mlc_bench.csv``/``.png``.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from typing import Any

import torch

from mlc_kernels import mlc_loss
from mlc_kernels.loss import ImplementationUnavailableError, resolve_impl

from .utils import (
    CALIBRATION,
    CALIBRATION_SHAPE,
    DTYPES,
    MIN_BLOCKS,
    TIMING_COLUMNS,
    Column,
    Options,
    PlotSpec,
    Timing,
    call_times,
    child_peak,
    cuda_peak,
    device_name,
    emit,
    nominal_bandwidth,
    peak_extra,
    pooled_passes,
    row,
    stmt_times,
)

MODES = ("forward", "backward", "full")
CPU_GRID = [(64, 10, 1024), (256, 10, 1024), (64, 10, 4096), (256, 10, 4096)]
GPU_GRID = [(256, 10, 1024), (256, 10, 4096), (256, 32, 4096), (4096, 10, 1024), (4096, 10, 4096)]

COLUMNS: list[Column] = [
    ("impl", "impl", ""),
    ("dtype", "dtype", ""),
    ("N", "N", "d"),
    ("m", "m", "d"),
    ("d", "d", "d"),
    ("mode", "mode", ""),
    *TIMING_COLUMNS,
    ("speedup_vs_reference", "x ref", ".1f"),
    ("peak_over_reps", "peak/reps", ".2f"),
    ("bandwidth_gbs", "GB/s", ".0f"),
    ("bandwidth_pct_nominal", "%peak", ".0f"),
]
PLOT = PlotSpec(
    label=lambda r: f"{r['dtype']}\nN={r['N']} m={r['m']}\nd={r['d']}",
    series=lambda r: r["impl"],
    extra=("speedup_vs_reference", "speed-up over reference (x)"),
    log=True,
    keep=lambda r: r["mode"] == "full",
)


def make_inputs(n: int, m: int, d: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Random representations ``(N, m, d)``: a shared direction per prompt plus per-variant noise."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    base = torch.randn(n, 1, d, generator=gen)
    reps = base + 0.5 * torch.randn(n, m, d, generator=gen)
    return reps.to(device=device, dtype=dtype)


def mode_times(
    reps: torch.Tensor, impl: str, budget_s: float, threads: int, min_blocks: int = MIN_BLOCKS, warmup: int = 2
) -> dict[str, list[float]]:
    """Milliseconds per call of forward (with grad enabled), backward, and forward+backward (one list each, at
    least ``min_blocks`` values)."""
    device = reps.device
    leaf = reps.detach().requires_grad_()

    def forward():
        return mlc_loss(leaf, impl=impl)

    def setup_backward():
        leaf.grad = None
        return mlc_loss(leaf, impl=impl)

    def full():
        leaf.grad = None
        mlc_loss(leaf, impl=impl).backward()

    return {
        "forward": stmt_times(forward, device, budget_s, threads, min_blocks, warmup),
        "backward": call_times(lambda loss: loss.backward(), setup_backward, device, budget_s, min_blocks, 200, warmup),
        "full": stmt_times(full, device, budget_s, threads, min_blocks, warmup),
    }


def loss_step(reps: torch.Tensor, impl: str) -> int:
    """One forward+backward of ``mlc_loss``; returns 0 (the gradient of the inputs counts as extra memory)."""
    mlc_loss(reps, impl=impl).backward()
    return 0


def cuda_peak_extra(n: int, m: int, d: int, dtype: str, impl: str, device: torch.device) -> int:
    """Bytes allocated at the peak of one forward+backward of fresh inputs, above what was allocated before."""
    leaf = make_inputs(n, m, d, DTYPES[dtype], device).requires_grad_()
    mlc_loss(leaf, impl=impl).backward()  # warm-up
    leaf.grad = None
    return cuda_peak(lambda: loss_step(leaf, impl))


def _child_setup(n: int, m: int, d: int, dtype: str, impl: str) -> tuple[torch.Tensor, str]:
    x = torch.randn(n, m, d, dtype=DTYPES[dtype]).requires_grad_()
    loss_step(torch.randn(2, 2, 8, dtype=DTYPES[dtype]).requires_grad_(), impl)  # lazy imports
    return x, impl


def _runnable_cells(grid, impls, dtypes, device, reference_max_n) -> list[tuple[int, int, int, str, str]]:
    cells = []
    for n, m, d in grid:
        for dt in dtypes:
            for impl in impls:
                if impl == "reference" and reference_max_n is not None and n > reference_max_n:
                    continue
                try:
                    resolve_impl(impl, torch.empty(n, m, d, dtype=DTYPES[dt], device=device))
                except (ImplementationUnavailableError, TypeError, ValueError) as err:
                    print(f"skip {impl} {dt} N={n} m={m} d={d}: {err}", file=sys.stderr)
                    continue
                cells.append((n, m, d, dt, impl))
    return cells


def run_grid(
    grid: list[tuple[int, int, int]],
    impls: list[str],
    dtypes: list[str],
    opts: Options,
    reference_max_n: int | None = None,
) -> list[dict[str, Any]]:
    """Benchmark every (N, m, d) x dtype x impl; returns the calibration row and one row per cell and mode.

    ``reference_max_n`` skips the (slow) reference above that N: those rows get no speed-up.
    """
    device = opts.device
    name = device_name(device)
    peak_bw = nominal_bandwidth(device)
    cells = _runnable_cells(grid, impls, dtypes, device, reference_max_n)

    def measure(cell, budget_s: float, min_blocks: int, warmup: int) -> dict[str, list[float]]:
        n, m, d, dt, impl = cell
        return mode_times(make_inputs(n, m, d, DTYPES[dt], device), impl, budget_s, opts.threads, min_blocks, warmup)

    samples, calibration = pooled_passes(cells, measure, opts)
    rows: list[dict[str, Any]] = []
    if calibration:
        n, d = CALIBRATION_SHAPE
        key = dict(device=name, impl=CALIBRATION, dtype="fp32", N=n, m=0, d=d, mode="matmul")
        rows.append(_row(key, Timing.of(calibration), opts.threads))
    for n, m, d, dt, impl in cells:
        on_cuda = partial(cuda_peak_extra, n, m, d, dt, impl, device)
        peak = peak_extra(opts, on_cuda, "loss", n=n, m=m, d=d, dtype=dt, impl=impl)  # each makes its own inputs
        reps_bytes = n * m * d * DTYPES[dt].itemsize
        for mode in MODES:
            t = Timing.of(samples[(n, m, d, dt, impl)][mode])
            r = _row(dict(device=name, impl=impl, dtype=dt, N=n, m=m, d=d, mode=mode), t, opts.threads)
            if mode == "full" and peak is not None:
                r["peak_extra_bytes"] = peak
                r["peak_over_reps"] = peak / reps_bytes
            if mode == "forward" and device.type == "cuda":
                # the fused kernel reads reps twice and writes the gradient once
                r["bandwidth_gbs"] = 3 * reps_bytes / (t.median_ms * 1e-3) / 1e9
                if peak_bw:
                    r["bandwidth_pct_nominal"] = 100 * r["bandwidth_gbs"] * 1e9 / peak_bw
            rows.append(r)
    baseline = {_cell_mode(r): r["median_ms"] for r in rows if r["impl"] == "reference"}
    for r in rows:
        ref = baseline.get(_cell_mode(r))
        r["speedup_vs_reference"] = ref / r["median_ms"] if ref else None
    return rows


def _row(key: dict[str, Any], timing: Timing, threads: int) -> dict[str, Any]:
    return row(key, timing, threads, speedup_vs_reference=None, peak_extra_bytes=None, peak_over_reps=None,
               bandwidth_gbs=None, bandwidth_pct_nominal=None)  # fmt: skip


def _cell_mode(r: dict[str, Any]) -> tuple:
    return r["dtype"], r["N"], r["m"], r["d"], r["mode"]


def run(args: argparse.Namespace, opts: Options) -> None:
    """The suite under the runner's options (``--grid``, ``--impls``, ``--dtypes``, ``--reference-max-n``)."""
    gpu = opts.device.type == "cuda"
    grid = args.grid or (GPU_GRID if gpu else CPU_GRID)
    default_impls = ["reference", "torch", "triton"] if gpu else ["reference", "torch", "native"]
    impls = args.impls.split(",") if args.impls else default_impls
    dtypes = args.dtypes.split(",") if args.dtypes else (["bf16"] if gpu else ["fp32"])
    ref_max_n = args.reference_max_n if args.reference_max_n is not None else (256 if gpu else None)
    rows = run_grid(grid, impls, dtypes, opts, reference_max_n=ref_max_n)
    if not rows:
        raise SystemExit("mlc-bench: nothing ran (no impl could run on this device)")
    title = (
        f"MLC loss benchmark on {rows[0]['device']}, torch {torch.__version__}, {opts.threads} threads "
        "(plot: forward+backward)"
    )
    emit("mlc_bench", title, rows, COLUMNS, PLOT, args.out)


if __name__ == "__main__":  # the memory child of peak_extra off CUDA
    child_peak(_child_setup, lambda state: loss_step(*state))
