"""``mlc-bench``: time forward, backward and forward+backward of every impl over a grid, and
measure peak memory; print a table with each impl's speed-up over ``reference`` measured in the
same run; write CSV and PNG plots (one shared writer for every suite).

Timings: ``torch.utils.benchmark.Timer.blocked_autorange`` (CUDA-synchronised) for calls that can be
repeated as they are (forward, forward+backward, the fused-linear and capture steps); the backward alone
needs a fresh graph per call and is timed call by call (CUDA events on GPU, ``perf_counter`` on CPU).
Every cell reports the median, the interquartile range and min-max of its measurements, and the
number of intra-op threads, which is fixed (``--threads``; default: the physical cores available).
Peak memory is the extra memory of one forward+backward above the inputs: on CUDA from the
caching allocator's peak; on CPU from the peak resident set of a fresh child process, under the
default allocator unless ``--malloc-mmap-threshold`` is given.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import torch

from mlc_kernels import mlc_loss
from mlc_kernels.loss import ImplementationUnavailableError, resolve_impl

MODES = ("forward", "backward", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}

# Nominal peak memory bandwidth (bytes/s) of the GPUs we report on, from the vendors' data sheets.
NOMINAL_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}

CPU_GRID = [(64, 10, 1024), (256, 10, 1024), (64, 10, 4096), (256, 10, 4096)]
GPU_GRID = [(256, 10, 1024), (256, 10, 4096), (256, 32, 4096), (4096, 10, 1024), (4096, 10, 4096)]


@dataclass
class Row:
    device: str
    impl: str
    dtype: str
    N: int
    m: int
    d: int
    mode: str
    median_ms: float
    iqr_ms: float
    min_ms: float
    max_ms: float
    runs: int
    threads: int
    speedup_vs_reference: float | None = None
    peak_extra_bytes: int | None = None
    peak_over_reps: float | None = None
    bandwidth_gbs: float | None = None
    bandwidth_pct_nominal: float | None = None


@dataclass
class Options:
    """What every suite shares: device, timing budget, threads and how memory is measured."""

    device: torch.device
    budget_s: float
    memory: bool
    threads: int
    mmap_threshold: int | None = None  # MALLOC_MMAP_THRESHOLD_ of the CPU memory child (None: glibc default)
    progress: bool = False
    rounds: int = 1  # loss suite: passes over the grid; each cell's samples are pooled over the passes


def device_name(device: torch.device) -> str:
    """A short machine name for results: the GPU's name, or the CPU model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def nominal_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in NOMINAL_BANDWIDTH.items() if key in name), None)


def make_inputs(n: int, m: int, d: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Random representations ``(N, m, d)``: a shared direction per prompt plus per-variant noise."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    base = torch.randn(n, 1, d, generator=gen)
    reps = base + 0.5 * torch.randn(n, m, d, generator=gen)
    return reps.to(device=device, dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


SUITES = ("loss", "fused-linear", "hf-capture", "train-step")
DEFAULT_SUITES = ("loss", "fused-linear", "hf-capture")  # train-step (minutes on CPU) runs only when named


def default_threads() -> int:
    """Physical cores available to this process: psutil's physical count, capped by the CPU affinity."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or available
    except ImportError:
        physical = available
    return max(1, min(physical, available))


MIN_BLOCKS = 5  # measurements per cell at least, for the median and IQR


@dataclass
class Timing:
    """Statistics of one cell, in milliseconds per call."""

    median_ms: float
    iqr_ms: float
    min_ms: float
    max_ms: float
    runs: int

    @classmethod
    def of(cls, times_ms: list[float]) -> Timing:
        q = statistics.quantiles(times_ms, n=4, method="inclusive") if len(times_ms) > 1 else [times_ms[0]] * 3
        return cls(statistics.median(times_ms), q[2] - q[0], min(times_ms), max(times_ms), len(times_ms))


def stmt_times(
    fn: Callable[[], object],
    device: torch.device,
    min_run_time: float,
    threads: int,
    min_blocks: int = MIN_BLOCKS,
    warmup: int = 2,
) -> list[float]:
    """Milliseconds per call of ``fn()``, one value per block of ``torch.utils.benchmark.Timer.blocked_autorange``
    (after ``warmup`` calls); at least ``min_blocks`` blocks."""
    from torch.utils.benchmark import Timer

    for _ in range(warmup):  # compilation, allocator, lazy imports
        fn()
    _sync(device)
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times = [t * 1e3 for t in m.times]
    while len(times) < min_blocks:  # a short budget or a long call: more blocks of the same size for a spread
        times.append(timer.timeit(m.number_per_run).mean * 1e3)
    return times


def time_stmt(
    fn: Callable[[], object], device: torch.device, min_run_time: float, threads: int, min_blocks: int = MIN_BLOCKS
) -> Timing:
    """:func:`stmt_times` summarised."""
    return Timing.of(stmt_times(fn, device, min_run_time, threads, min_blocks))


def call_times(
    fn: Callable[[Any], object],
    setup: Callable[[], Any],
    device: torch.device,
    budget_s: float,
    min_reps: int = 5,
    max_reps: int = 200,
    warmup: int = 2,
) -> list[float]:
    """Milliseconds of ``fn(setup())`` call by call, timing only ``fn`` (for calls that need fresh state, e.g. a
    backward)."""
    for _ in range(warmup):
        fn(setup())
    _sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start_all < budget_s):
        state = setup()
        _sync(device)
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn(state)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(state)
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_call(
    fn: Callable[[Any], object], setup: Callable[[], Any], device: torch.device, budget_s: float, **options: int
) -> Timing:
    """:func:`call_times` (``options``: its ``min_reps``, ``max_reps``, ``warmup``) summarised."""
    return Timing.of(call_times(fn, setup, device, budget_s, **options))


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


CALIBRATION = "calibration"
CALIBRATION_SHAPE = (512, 512)


def calibration_times(device: torch.device, threads: int) -> list[float]:
    """Milliseconds of a fixed fp32 matmul (``CALIBRATION_SHAPE``): the machine's speed at this moment. Two runs
    whose calibration rows differ ran on a machine whose speed differed (frequency, neighbours on a shared host),
    and every cell moves with it; ``compare_runs --normalise`` divides it out."""
    a = torch.randn(CALIBRATION_SHAPE, device=device)
    return stmt_times(lambda: a @ a, device, 0.05, threads, min_blocks=3, warmup=2)


def cuda_peak_extra(reps: torch.Tensor, impl: str) -> int:
    """Bytes allocated at the peak of one forward+backward, above what was allocated before."""
    leaf = reps.detach().requires_grad_()
    mlc_loss(leaf, impl=impl).backward()  # warm-up
    leaf.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    mlc_loss(leaf, impl=impl).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _module() -> str:
    """This module's importable name (``benchmarks.runner`` from a checkout, ``mlc_kernels.benchmarks.runner``
    installed), so that the memory child imports this very file."""
    spec = globals().get("__spec__")
    name = spec.name if spec is not None else __name__
    return name if name != "__main__" else "benchmarks.runner"


def _child_peak_code(setup: str, step: str, threads: int) -> str:
    # VmHWM (peak RSS of this process image) is reset to the current RSS by writing 5 to
    # /proc/self/clear_refs; ru_maxrss would carry the parent's RSS over fork+exec.
    package = _module().rsplit(".", 1)[0]
    return (
        "import torch, json\n"
        f"torch.set_num_threads({threads})\n"
        f"from {_module()} import *\n"
        f"from {package} import hf_capture, train_step\n"
        "def hwm():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmHWM'):\n"
        "            return int(line.split()[1]) * 1024\n"
        f"{setup}\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = hwm()\n"
        f"handed_back = {step}\n"
        "print(json.dumps(hwm() - before - handed_back))\n"
    )


def _run_child(code: str, opts: Options) -> int:
    """Runs ``code`` in a fresh interpreter with the run's threads and allocator setting; its last line is an int."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = str(opts.threads)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if opts.mmap_threshold is not None:  # large blocks go back to the OS when freed: RSS tracks live memory
        env["MALLOC_MMAP_THRESHOLD_"] = str(opts.mmap_threshold)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1]))


def loss_step(reps: torch.Tensor, impl: str) -> int:
    """One forward+backward of ``mlc_loss``; returns 0 (the gradient is not counted: see cpu_peak_extra)."""
    mlc_loss(reps, impl=impl).backward()
    return 0


def cpu_peak_extra(n: int, m: int, d: int, dtype: str, impl: str, opts: Options) -> int:
    """Peak resident memory of one forward+backward above the inputs, in a fresh child process (Linux)."""
    setup = (
        f"x = torch.randn({n}, {m}, {d}, dtype=DTYPES[{dtype!r}]).requires_grad_()\n"
        f"loss_step(torch.randn(2, 2, 8, dtype=DTYPES[{dtype!r}]).requires_grad_(), {impl!r})"  # lazy imports
    )
    return _run_child(_child_peak_code(setup, f"loss_step(x, {impl!r})", opts.threads), opts)


def run_grid(
    grid: list[tuple[int, int, int]],
    impls: list[str],
    dtypes: list[str],
    opts: Options,
    reference_max_n: int | None = None,
) -> list[Row]:
    """Benchmark every (N, m, d) x dtype x impl; returns one Row per mode.

    ``reference_max_n`` skips the (slow) reference above that N: those rows get no speed-up.
    """
    from tqdm import tqdm

    device = opts.device
    name = device_name(device)
    peak_bw = nominal_bandwidth(device)
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
    # Every pass visits every cell with freshly allocated inputs and a share of the budget, and a cell's
    # statistics pool its samples from all passes: a slow phase of the machine or an unlucky memory placement
    # then moves a few samples of many cells instead of every sample of one cell.
    samples: dict[tuple, dict[str, list[float]]] = {cell: {mode: [] for mode in MODES} for cell in cells}
    per_round_blocks = max(2, -(-MIN_BLOCKS // opts.rounds))  # >= 2 per pass: 10 samples a cell at 5 passes
    jobs = [(r, cell) for r in range(opts.rounds) for cell in cells]
    calibration: list[float] = []
    for r, (n, m, d, dt, impl) in tqdm(jobs, desc="mlc-bench", disable=not opts.progress, file=sys.stderr):
        if (n, m, d, dt, impl) == cells[0]:  # once per pass: the machine's speed now
            calibration += calibration_times(device, opts.threads)
        reps = make_inputs(n, m, d, DTYPES[dt], device)
        times = mode_times(reps, impl, opts.budget_s / opts.rounds, opts.threads, per_round_blocks, 2 if r == 0 else 1)
        for mode in MODES:
            samples[(n, m, d, dt, impl)][mode] += times[mode]
        del reps
    rows: list[Row] = []
    if calibration:
        n, d = CALIBRATION_SHAPE
        rows.append(Row(name, CALIBRATION, "fp32", n, 0, d, "matmul", **asdict(Timing.of(calibration)),
                        threads=opts.threads))  # fmt: skip
    for n, m, d, dt, impl in cells:
        peak = None
        if opts.memory and device.type == "cuda":
            peak = cuda_peak_extra(make_inputs(n, m, d, DTYPES[dt], device), impl)
        elif opts.memory:  # a fresh child process makes its own inputs
            peak = cpu_peak_extra(n, m, d, dt, impl, opts)
        reps_bytes = n * m * d * DTYPES[dt].itemsize
        for mode in MODES:
            t = Timing.of(samples[(n, m, d, dt, impl)][mode])
            row = Row(name, impl, dt, n, m, d, mode, **asdict(t), threads=opts.threads)
            if mode == "full" and peak is not None:
                row.peak_extra_bytes = peak
                row.peak_over_reps = peak / reps_bytes
            if mode == "forward" and device.type == "cuda":
                # the fused kernel reads reps twice and writes the gradient once
                row.bandwidth_gbs = 3 * reps_bytes / (t.median_ms * 1e-3) / 1e9
                if peak_bw:
                    row.bandwidth_pct_nominal = 100 * row.bandwidth_gbs * 1e9 / peak_bw
            rows.append(row)
    baseline = {(r.dtype, r.N, r.m, r.d, r.mode): r.median_ms for r in rows if r.impl == "reference"}
    for r in rows:
        ref = baseline.get((r.dtype, r.N, r.m, r.d, r.mode))
        r.speedup_vs_reference = ref / r.median_ms if ref else None
    return rows


# ---------------------------------------------------------------------------------------------------------
# One writer for every suite: a printed table, a CSV and a PNG.

Column = tuple[str, str, str]  # (field, header, format spec); a None value prints as "-"

TIMING_COLUMNS: list[Column] = [
    ("median_ms", "median ms", ".3f"),
    ("iqr_ms", "IQR ms", ".3f"),
    ("min_ms", "min ms", ".3f"),
    ("max_ms", "max ms", ".3f"),
    ("runs", "runs", "d"),
]


def _as_dict(row: Any) -> dict[str, Any]:
    return asdict(row) if is_dataclass(row) else dict(row)


def format_rows(rows: list[Any], columns: list[Column]) -> str:
    """A plain-text table of ``rows`` (dataclasses or dicts) with the given columns."""
    cells = [[header for _, header, _ in columns]]
    for row in map(_as_dict, rows):
        cells.append(["-" if row.get(f) is None else format(row[f], spec) for f, _, spec in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def write_csv(rows: list[Any], path: Path) -> None:
    """All fields of ``rows`` (the union, in first-seen order) as CSV."""
    dicts = [_as_dict(r) for r in rows]
    names = list(dict.fromkeys(k for d in dicts for k in d))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(dicts)


@dataclass
class PlotSpec:
    """Grouped bars: one group per ``label(row)``, one bar per ``series(row)``; the left panel the median
    time with the IQR as error bars, the right panel ``extra`` (field, axis label) when given."""

    label: Callable[[dict[str, Any]], str]
    series: Callable[[dict[str, Any]], str]
    extra: tuple[str, str] | None = None
    log: bool = False
    keep: Callable[[dict[str, Any]], bool] = lambda row: True


def plot_rows(rows: list[Any], spec: PlotSpec, title: str, path: Path) -> None:
    """The PNG of a suite (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dicts = [r for r in map(_as_dict, rows) if spec.keep(r)]
    labels = list(dict.fromkeys(spec.label(r) for r in dicts))
    series = list(dict.fromkeys(spec.series(r) for r in dicts))
    panels = 2 if spec.extra else 1
    fig, axes = plt.subplots(1, panels, figsize=(max(6.5, 1.2 * len(labels) * panels + 3), 4.5), squeeze=False)
    width = 0.8 / max(len(series), 1)
    for i, name in enumerate(series):
        hits = [(labels.index(spec.label(r)), r) for r in dicts if spec.series(r) == name]
        xs = [j + i * width for j, _ in hits]
        med = [r["median_ms"] for _, r in hits]
        half_iqr = [r["iqr_ms"] / 2 for _, r in hits]
        axes[0][0].bar(xs, med, width, yerr=half_iqr, capsize=2, label=name)
        if spec.extra:
            field = spec.extra[0]
            axes[0][1].bar(xs, [r.get(field) or 0.0 for _, r in hits], width, label=name)
    axes[0][0].set_ylabel("median time (ms), IQR bars")
    if spec.extra:
        axes[0][1].set_ylabel(spec.extra[1])
    for ax in axes[0]:
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, fontsize=7)
        if spec.log and any(bar.get_height() > 0 for bar in ax.patches):
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def emit(name: str, title: str, rows: list[Any], columns: list[Column], spec: PlotSpec, out: Path) -> None:
    """Print the table and write ``OUT/<name>.csv`` and ``OUT/<name>.png``."""
    print(title)
    print(format_rows(rows, columns))
    write_csv(rows, out / f"{name}.csv")
    plot_rows(rows, spec, title, out / f"{name}.png")
    print(f"wrote {out / (name + '.csv')} and {out / (name + '.png')}")


def _mb(row: dict[str, Any]) -> float | None:
    return row["peak_extra_bytes"] / 2**20 if row.get("peak_extra_bytes") is not None else None


# ---------------------------------------------------------------------------------------------------------
# Suites

FUSED_LINEAR_SHAPE = (1024, 10, 4096, 1024)  # N, m, d_h, d


@dataclass
class FusedRow:
    device: str
    impl: str
    dtype: str
    N: int
    m: int
    d_h: int
    d: int
    variant: str
    median_ms: float
    iqr_ms: float
    min_ms: float
    max_ms: float
    runs: int
    threads: int
    peak_extra_bytes: int | None = None
    time_vs_unfused: float | None = None
    memory_vs_unfused: float | None = None
    allocator: str = ""


def fused_linear_step(hidden, weight, bias, impl: str, fused: bool) -> int:
    """One forward+backward of the fused loss or of the unfused composite (``linear`` then ``mlc_loss``,
    same impl); returns the bytes of the gradients handed back (hidden, weight, bias)."""
    from mlc_kernels import fused_linear_mlc_loss

    for t in (hidden, weight, bias):
        t.grad = None
    if fused:
        loss = fused_linear_mlc_loss(hidden, weight, bias, impl=impl)
    else:
        loss = mlc_loss(torch.nn.functional.linear(hidden, weight, bias), impl=impl)
    loss.backward()
    return sum(t.grad.numel() * t.grad.element_size() for t in (hidden, weight, bias))


def fused_linear_inputs(n, m, dh, d, dtype, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(n, m, dh, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(d, dh, generator=gen) / dh**0.5).to(device=device, dtype=dtype).requires_grad_()
    bias = torch.zeros(d, device=device, dtype=dtype).requires_grad_()
    return hidden, weight, bias


def allocator_name(opts: Options) -> str:
    """How peak memory is measured, for the results: the CUDA caching allocator or glibc's setting."""
    if opts.device.type == "cuda":
        return "cuda-caching"
    return "glibc-default" if opts.mmap_threshold is None else f"glibc MALLOC_MMAP_THRESHOLD_={opts.mmap_threshold}"


def run_fused_linear(shape, impl: str, dtype: str, opts: Options) -> list[FusedRow]:
    """Time and peak memory of the fused linear loss against the unfused composite, same impl."""
    device = opts.device
    n, m, dh, d = shape
    hidden, weight, bias = fused_linear_inputs(n, m, dh, d, DTYPES[dtype], device)
    rows = []
    for variant, fused in (("unfused", False), ("fused", True)):
        t = time_stmt(
            lambda f=fused: fused_linear_step(hidden, weight, bias, impl, f), device, opts.budget_s, opts.threads
        )
        peak = None
        if opts.memory and device.type == "cuda":
            for p in (hidden, weight, bias):
                p.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            handed_back = fused_linear_step(hidden, weight, bias, impl, fused)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before - handed_back
        elif opts.memory:
            setup = (
                f"h, w, b = fused_linear_inputs({n}, {m}, {dh}, {d}, DTYPES[{dtype!r}], torch.device('cpu'))\n"
                f"fused_linear_step(*fused_linear_inputs(2, {m}, 8, 4, DTYPES[{dtype!r}], torch.device('cpu')), "
                f"{impl!r}, {fused})"
            )
            code = _child_peak_code(setup, f"fused_linear_step(h, w, b, {impl!r}, {fused})", opts.threads)
            peak = _run_child(code, opts)
        rows.append(
            FusedRow(
                device_name(device),
                impl,
                dtype,
                n,
                m,
                dh,
                d,
                variant,
                **asdict(t),
                threads=opts.threads,
                peak_extra_bytes=peak,
                allocator=allocator_name(opts),
            )
        )
    unfused, fused_row = rows
    fused_row.time_vs_unfused = fused_row.median_ms / unfused.median_ms
    if fused_row.peak_extra_bytes is not None and unfused.peak_extra_bytes:
        fused_row.memory_vs_unfused = fused_row.peak_extra_bytes / unfused.peak_extra_bytes
    return rows


def run_hf_capture(shape, opts: Options) -> list:
    """The variant passes: naive vs truncated (same N), and the gradient cache vs truncated."""
    from .hf_capture import CaptureRow, build, config_for, inputs, variant_step

    device = opts.device
    n, m, t = shape
    layer = config_for(device)[0]["num_hidden_layers"] // 2
    model, head = build(device)
    ids, att = inputs(n, m, t, device)
    rows = []
    for variant in ("naive", "truncated", "grad_cache"):
        timing = time_stmt(
            lambda v=variant: variant_step(model, head, ids, att, layer, v), device, opts.budget_s, opts.threads
        )
        peak = None
        if opts.memory and device.type == "cuda":
            model.zero_grad(set_to_none=True)
            head.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            handed_back = variant_step(model, head, ids, att, layer, variant)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before - handed_back
        elif opts.memory:
            setup = (
                "dev = torch.device('cpu')\n"
                "model, head = hf_capture.build(dev)\n"
                f"ids, att = hf_capture.inputs({n}, {m}, {t}, dev)\n"
                f"hf_capture.variant_step(model, head, ids[:1, :2, :4], att[:1, :2, :4], {layer}, {variant!r})"
            )
            step = f"hf_capture.variant_step(model, head, ids, att, {layer}, {variant!r})"
            peak = _run_child(_child_peak_code(setup, step, opts.threads), opts)
        rows.append(
            CaptureRow(
                device_name(device),
                n,
                m,
                t,
                layer,
                variant,
                **asdict(timing),
                threads=opts.threads,
                peak_extra_bytes=peak,
            )
        )
    naive, truncated, cached = rows
    for r in (truncated, cached):
        r.time_vs_naive = r.median_ms / naive.median_ms
        if r.peak_extra_bytes is not None and naive.peak_extra_bytes:
            r.memory_vs_naive = r.peak_extra_bytes / naive.peak_extra_bytes
    if cached.peak_extra_bytes is not None and truncated.peak_extra_bytes:
        cached.memory_vs_truncated = cached.peak_extra_bytes / truncated.peak_extra_bytes
    return rows


def run_train_step(opts: Options) -> list[dict[str, Any]]:
    """A whole DPO step with and without MLC (see benchmarks/train_step.py); ratios to DPO alone."""
    from .train_step import VARIANTS, build, step

    device = opts.device
    rows: list[dict[str, Any]] = []
    for variant in VARIANTS:
        trainer, model, optimizer, batch = build(variant)
        t = time_stmt(
            lambda tr=trainer, mo=model, o=optimizer, b=batch: step(tr, mo, o, b),
            device,
            opts.budget_s,
            opts.threads,
            min_blocks=3,  # a step takes seconds on CPU
        )
        del trainer, model, optimizer, batch
        peak = None
        if opts.memory and device.type == "cpu":
            setup = (
                f"t, mo, o, b = train_step.build({variant!r})\n"
                "train_step.step(t, mo, o, b)"  # allocates gradients and optimizer states before the baseline
            )
            peak = _run_child(_child_peak_code(setup, "train_step.step(t, mo, o, b) or 0", opts.threads), opts)
        rows.append(
            {
                "device": device_name(device),
                "variant": variant,
                **asdict(t),
                "threads": opts.threads,
                "peak_extra_bytes": peak,
            }
        )
    base = rows[0]
    for r in rows:
        r["time_vs_dpo"] = round(r["median_ms"] / base["median_ms"], 3)
        r["memory_vs_dpo"] = (
            round(r["peak_extra_bytes"] / base["peak_extra_bytes"], 3)
            if r["peak_extra_bytes"] is not None and base["peak_extra_bytes"]
            else None
        )
    return rows


def parse_grid(text: str) -> list[tuple[int, int, int]]:
    """``"64x10x1024,256x10x4096"`` -> ``[(64, 10, 1024), (256, 10, 4096)]``."""
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]  # type: ignore[misc]


def parse_suites(text: str | None, grid_given: bool) -> list[str]:
    """``--suite`` as a list: a comma list of SUITES or ``all``; without it, ``loss`` when ``--grid`` is
    given (the grid only concerns the loss suite), else the default suites."""
    if text is None:
        return ["loss"] if grid_given else list(DEFAULT_SUITES)
    names = [s for s in text.split(",") if s]
    if "all" in names:
        names = [*DEFAULT_SUITES, *(s for s in names if s == "train-step")]
    unknown = [s for s in names if s not in SUITES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--suite: unknown {unknown or text!r}; choose from {', '.join(SUITES)}, all")
    return list(dict.fromkeys(names))


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split("x"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mlc-bench", description="Benchmark the MLC loss implementations.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--grid", type=parse_grid, help="NxMxD,... of the loss suite (implies --suite loss)")
    parser.add_argument(
        "--impls", default=None, help="comma list (default: reference,torch and triton on CUDA, native on CPU)"
    )
    parser.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16,fp64 (default fp32 CPU, bf16 GPU)")
    parser.add_argument("--budget", type=float, default=0.3, help="timing budget (s) of each cell and mode, in all")
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="loss suite: passes over the grid, each with fresh inputs and budget/rounds; samples are pooled",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads, fixed for the run (default: physical cores available)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=None,
        help="set MALLOC_MMAP_THRESHOLD_ (bytes) in the CPU memory child (default: glibc's default)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for CSV and PNG")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--triton-configs", type=Path, default=None, help="JSON {m_pad: KernelConfig fields} from tune_triton"
    )
    parser.add_argument(
        "--reference-max-n", type=int, default=None, help="skip reference above this N (default: 256 on GPU)"
    )
    parser.add_argument(
        "--suite",
        default=None,
        help=f"comma list of {', '.join(SUITES)} or all (= {', '.join(DEFAULT_SUITES)}; train-step, minutes on CPU, "
        "only when named); default: loss with --grid, else all",
    )
    parser.add_argument("--hf-shape", type=_shape, default=None, help="NxMxT of the variant-pass comparison")
    parser.add_argument(
        "--fused-linear-shape",
        type=_shape,
        default=FUSED_LINEAR_SHAPE,
        help="NxMxD_HxD of the fused linear comparison (default 1024x10x4096x1024)",
    )
    parser.add_argument("--fused-linear-impl", default=None, help="loss impl of both variants (default: auto)")
    args = parser.parse_args(argv)
    try:
        suites = parse_suites(args.suite, args.grid is not None)
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    opts = Options(
        device, args.budget, not args.no_memory, threads, args.malloc_mmap_threshold, not args.quiet, args.rounds
    )
    print(
        f"mlc-bench: suites {', '.join(suites)}; {device_name(device)}; {threads} intra-op threads; "
        f"torch {torch.__version__}; memory: {allocator_name(opts) if opts.memory else 'off'}"
    )
    grid = args.grid or (GPU_GRID if gpu else CPU_GRID)
    default_impls = ["reference", "torch", "triton"] if gpu else ["reference", "torch", "native"]
    impls = args.impls.split(",") if args.impls else default_impls
    dtypes = args.dtypes.split(",") if args.dtypes else (["bf16"] if gpu else ["fp32"])
    torch.manual_seed(0)
    overrides = {}
    if args.triton_configs is not None and args.triton_configs.exists():
        from mlc_kernels.ops.triton import KernelConfig

        overrides = {int(k): KernelConfig(**v) for k, v in json.loads(args.triton_configs.read_text()).items()}
        print(f"Triton configurations from {args.triton_configs}: {overrides}")
    ref_max_n = args.reference_max_n if args.reference_max_n is not None else (256 if gpu else None)
    from mlc_kernels.ops.triton import kernel_config_override

    if "loss" in suites:
        with kernel_config_override(overrides):
            rows = run_grid(grid, impls, dtypes, opts, reference_max_n=ref_max_n)
        if not rows:
            raise SystemExit("mlc-bench: nothing ran (no impl could run on this device)")
        columns: list[Column] = [
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
        spec = PlotSpec(
            label=lambda r: f"{r['dtype']}\nN={r['N']} m={r['m']}\nd={r['d']}",
            series=lambda r: r["impl"],
            extra=("speedup_vs_reference", "speed-up over reference (x)"),
            log=True,
            keep=lambda r: r["mode"] == "full",
        )
        emit(
            "mlc_bench",
            f"MLC loss benchmark on {rows[0].device}, torch {torch.__version__}, {threads} threads "
            "(plot: forward+backward)",
            rows,
            columns,
            spec,
            args.out,
        )
    if "fused-linear" in suites:
        fl_dtype = "bf16" if gpu else "fp32"
        probe = torch.empty(0, args.fused_linear_shape[1], 1, device=device, dtype=DTYPES[fl_dtype])
        fl_impl = resolve_impl(args.fused_linear_impl or "auto", probe)
        with kernel_config_override(overrides):
            fl_rows = run_fused_linear(args.fused_linear_shape, fl_impl, fl_dtype, opts)
        columns = [
            ("impl", "impl", ""),
            ("dtype", "dtype", ""),
            ("N", "N", "d"),
            ("m", "m", "d"),
            ("d_h", "d_h", "d"),
            ("d", "d", "d"),
            ("variant", "variant", ""),
            *TIMING_COLUMNS,
            ("extra_mb", "extra MB", ".1f"),
            ("time_vs_unfused", "t/unfused", ".2f"),
            ("memory_vs_unfused", "mem/unfused", ".2f"),
        ]
        shown = [{**asdict(r), "extra_mb": _mb(asdict(r))} for r in fl_rows]
        spec = PlotSpec(label=lambda r: r["variant"], series=lambda r: r["impl"], extra=("extra_mb", "extra peak MB"))
        emit(
            "fused_linear",
            f"Fused linear MLC loss vs linear + mlc_loss on {fl_rows[0].device}, {threads} threads "
            f"(extra memory above inputs, parameters and the gradients handed back; {allocator_name(opts)})",
            shown,
            columns,
            spec,
            args.out,
        )
    if "hf-capture" in suites:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("hf-capture: skipped (pip install transformers)")
        else:
            from .hf_capture import HF_SHAPE, HF_SHAPE_GPU

            cap_rows = run_hf_capture(args.hf_shape or (HF_SHAPE_GPU if gpu else HF_SHAPE), opts)
            columns = [
                ("variant", "variant", ""),
                ("N", "N", "d"),
                ("m", "m", "d"),
                ("T", "T", "d"),
                ("layer", "k", "d"),
                *TIMING_COLUMNS,
                ("extra_mb", "extra MB", ".1f"),
                ("time_vs_naive", "t/naive", ".2f"),
                ("memory_vs_naive", "mem/naive", ".2f"),
                ("memory_vs_truncated", "mem/truncated", ".2f"),
            ]
            shown = [{**asdict(r), "extra_mb": _mb(asdict(r))} for r in cap_rows]
            spec = PlotSpec(
                label=lambda r: r["variant"],
                series=lambda r: f"N={r['N']} T={r['T']}",
                extra=("extra_mb", "extra peak MB"),
            )
            emit(
                "hf_capture",
                f"Variant passes on a Qwen2-style model (vocab 151936) on {cap_rows[0].device}: naive "
                "full forward with output_hidden_states vs truncated at k vs truncated + gradient cache",
                shown,
                columns,
                spec,
                args.out,
            )
    if "train-step" in suites:
        ts_rows = run_train_step(opts)
        columns = [
            ("variant", "variant", ""),
            *TIMING_COLUMNS,
            ("extra_mb", "extra MB", ".1f"),
            ("time_vs_dpo", "t/dpo", ".2f"),
            ("memory_vs_dpo", "mem/dpo", ".2f"),
        ]
        shown = [{**r, "extra_mb": _mb(r)} for r in ts_rows]
        spec = PlotSpec(label=lambda r: r["variant"], series=lambda r: "step", extra=("extra_mb", "extra peak MB"))
        emit(
            "train_step",
            "A whole DPO step (hidden 512, 8 layers, vocab 151936; 8 prompts, 32+64 tokens) with and "
            "without MLC (m=10, k=4); extra = peak above parameters, gradients, optimizer states and inputs",
            shown,
            columns,
            spec,
            args.out,
        )


if __name__ == "__main__":
    main()
