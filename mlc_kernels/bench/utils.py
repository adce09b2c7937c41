"""What every suite of ``mlc-bench`` shares: the run's options, timing (Timer blocks, call-by-call times, the
interleaved passes that pool each cell's samples, the calibration matmul), result rows, peak memory (CUDA
allocator, or a fresh child process on the CPU) and the one writer of a suite's table, CSV and PNG.

Timings: ``torch.utils.benchmark.Timer.blocked_autorange`` (CUDA-synchronised) for calls that can be repeated as
they are; calls that need fresh state (a backward) are timed call by call (CUDA events on GPU, ``perf_counter`` on
CPU). Every cell reports the median, the interquartile range and min-max of its measurements (milliseconds per
call) and the number of intra-op threads, which is fixed for the run.
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
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.benchmark import Timer
from tqdm import tqdm


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default once: not for a default of None or False (a flag, or a default the
    help text explains) nor when the help already says ``default``."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text.lower():
            return text
        return super()._get_help_string(action)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}

# Nominal peak memory bandwidth (bytes/s) of the GPUs we report on, from the vendors' data sheets.
NOMINAL_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}

MIN_BLOCKS = 5  # measurements per cell at least, for the median and IQR


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


def allocator_name(opts: Options) -> str:
    """How peak memory is measured, for the results: the CUDA caching allocator or glibc's setting."""
    if opts.device.type == "cuda":
        return "cuda-caching"
    return "glibc-default" if opts.mmap_threshold is None else f"glibc MALLOC_MMAP_THRESHOLD_={opts.mmap_threshold}"


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
    """The GPU's nominal peak bandwidth in bytes/s (``NOMINAL_BANDWIDTH``), None on CPU or an unlisted GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in NOMINAL_BANDWIDTH.items() if key in name), None)


def default_threads() -> int:
    """Physical cores available to this process: psutil's physical count, capped by the CPU affinity."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or available
    except ImportError:
        physical = available
    return max(1, min(physical, available))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------
# Timing


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


CALIBRATION = "calibration"
CALIBRATION_SHAPE = (512, 512)


def calibration_times(device: torch.device, threads: int) -> list[float]:
    """Milliseconds of a fixed fp32 matmul (``CALIBRATION_SHAPE``): the machine's speed at this moment. Two runs
    whose calibration rows differ ran on a machine whose speed differed (frequency, neighbours on a shared host),
    and every cell moves with it; ``compare_runs --normalise`` divides it out."""
    a = torch.randn(CALIBRATION_SHAPE, device=device)
    return stmt_times(lambda: a @ a, device, 0.05, threads, min_blocks=3, warmup=2)


Measure = Callable[[Any, float, int, int], dict[str, list[float]]]  # (cell, budget s, min blocks, warm-up) -> ms


def pooled_passes(
    cells: list[Hashable], measure: Measure, opts: Options
) -> tuple[dict[Hashable, dict[str, list[float]]], list[float]]:
    """``opts.rounds`` passes over ``cells``; returns each cell's samples (ms, per mode) pooled over the passes and
    the calibration samples (one calibration per pass, before its first cell).

    Every pass visits every cell with freshly allocated inputs and a share of the budget, and a cell's statistics
    pool its samples from all passes: a slow phase of the machine or an unlucky memory placement then moves a few
    samples of many cells instead of every sample of one cell. ``measure(cell, budget_s, min_blocks, warmup)``
    times one cell once; the first pass warms up with 2 calls, the others with 1.
    """
    samples: dict[Hashable, dict[str, list[float]]] = {cell: {} for cell in cells}
    per_round_blocks = max(2, -(-MIN_BLOCKS // opts.rounds))  # >= 2 per pass: 10 samples a cell at 5 passes
    jobs = [(r, cell) for r in range(opts.rounds) for cell in cells]
    calibration: list[float] = []
    for r, cell in tqdm(jobs, desc="mlc-bench", disable=not opts.progress, file=sys.stderr):
        if cell == cells[0]:  # once per pass: the machine's speed now
            calibration += calibration_times(opts.device, opts.threads)
        times = measure(cell, opts.budget_s / opts.rounds, per_round_blocks, 2 if r == 0 else 1)
        for mode, values in times.items():
            samples[cell][mode] = samples[cell].get(mode, []) + values
    return samples, calibration


def row(key: dict[str, Any], timing: Timing, threads: int, **extra: Any) -> dict[str, Any]:
    """One result row in CSV column order: the fields that name the cell, its timing, the threads, then the
    suite's own fields (``extra``, None where not measured)."""
    return {**key, **asdict(timing), "threads": threads, **extra}


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, None where either is missing or ``b`` is 0."""
    return a / b if a is not None and b else None


def mb(nbytes: int | None) -> float | None:
    return nbytes / 2**20 if nbytes is not None else None


# ---------------------------------------------------------------------------------------------------------
# Peak memory: the CUDA caching allocator's peak, or the peak resident set of a fresh child process on the CPU


def cuda_peak(step: Callable[[], int]) -> int:
    """Bytes allocated at the peak of ``step()`` above what was allocated before, less the bytes it returns (the
    gradients it hands back)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    handed_back = step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before - handed_back


def peak_in_child(module: str, opts: Options, **params: Any) -> int:
    """Peak resident bytes of one step of the suite ``module`` above its inputs (see :func:`child_peak`), in a fresh
    ``python -m mlc_kernels.bench.<module> PARAMS_JSON`` with the run's threads and allocator setting (Linux)."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(opts.threads)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if opts.mmap_threshold is not None:  # large blocks go back to the OS when freed: RSS tracks live memory
        env["MALLOC_MMAP_THRESHOLD_"] = str(opts.mmap_threshold)
    argv = [sys.executable, "-m", f"{__package__}.{module}", json.dumps({"threads": opts.threads, **params})]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1]))


def peak_extra(opts: Options, on_cuda: Callable[[], int], module: str, **params: Any) -> int | None:
    """Peak memory (bytes) of one step of a suite above its inputs, None without ``--memory``: ``on_cuda()`` on CUDA
    (see :func:`cuda_peak`), elsewhere the memory child of the suite ``module`` given ``params``."""
    if not opts.memory:
        return None
    return on_cuda() if opts.device.type == "cuda" else peak_in_child(module, opts, **params)


def _peak_rss() -> int:
    """VmHWM of this process in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def child_peak(setup: Callable[..., Any], step: Callable[[Any], int], argv: list[str] | None = None) -> None:
    """The memory child's side (a suite module run as ``__main__``): ``state = setup(**params)`` (inputs, warm-up),
    then prints the peak resident bytes of ``step(state)`` above the resident set before it, less the bytes
    ``step`` returns (what it hands back)."""
    params = json.loads((sys.argv[1:] if argv is None else argv)[0])
    torch.set_num_threads(params.pop("threads"))
    state = setup(**params)
    # VmHWM (peak RSS of this process image) is reset to the current RSS by writing 5 to
    # /proc/self/clear_refs; ru_maxrss would carry the parent's RSS over fork+exec.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _peak_rss()
    handed_back = step(state)
    print(json.dumps(_peak_rss() - before - handed_back))


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
    for r in map(_as_dict, rows):
        cells.append(["-" if r.get(f) is None else format(r[f], spec) for f, _, spec in columns])
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
