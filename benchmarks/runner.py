"""``mlc-bench``: time forward, backward and forward+backward of every impl over a grid, and
measure peak memory; print a table with each impl's speed-up over ``reference`` measured in the
same run; write CSV and PNG plots.

Timings are medians over repeats after warm-up (CUDA events on GPU, ``perf_counter`` on CPU).
Peak memory is the extra memory of one forward+backward above the inputs: on CUDA from the
caching allocator's peak; on CPU from the peak resident set of a fresh child process.
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
from dataclasses import asdict, dataclass
from pathlib import Path

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
    time_ms: float
    speedup_vs_reference: float | None = None
    peak_extra_bytes: int | None = None
    peak_over_reps: float | None = None
    bandwidth_gbs: float | None = None
    bandwidth_pct_nominal: float | None = None


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


def time_call(fn, setup, device: torch.device, budget_s: float, min_reps: int = 3, max_reps: int = 100) -> float:
    """Median milliseconds of ``fn(setup())``, timing only ``fn``; repeats within ``budget_s``."""
    for _ in range(2):  # warm-up (compilation, allocator)
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
    return statistics.median(times)


def time_modes(reps: torch.Tensor, impl: str, budget_s: float) -> dict[str, float]:
    """Milliseconds of forward (with grad enabled), backward, and forward+backward."""
    device = reps.device
    leaf = reps.detach().requires_grad_()

    def forward(_):
        return mlc_loss(leaf, impl=impl)

    def setup_backward():
        leaf.grad = None
        return mlc_loss(leaf, impl=impl)

    def full(_):
        leaf.grad = None
        mlc_loss(leaf, impl=impl).backward()

    return {
        "forward": time_call(forward, lambda: None, device, budget_s),
        "backward": time_call(lambda loss: loss.backward(), setup_backward, device, budget_s),
        "full": time_call(full, lambda: None, device, budget_s),
    }


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


def _child_peak_code(setup: str, step: str) -> str:
    # VmHWM (peak RSS of this process image) is reset to the current RSS by writing 5 to
    # /proc/self/clear_refs; ru_maxrss would carry the parent's RSS over fork+exec.
    return (
        "import torch, json\n"
        "from mlc_kernels.benchmarks.runner import *\n"
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


def _run_child(code: str) -> int:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # large blocks go back to the OS when freed: RSS tracks live memory
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1]))


def loss_step(reps: torch.Tensor, impl: str) -> int:
    """One forward+backward of ``mlc_loss``; returns 0 (the gradient is not counted: see cpu_peak_extra)."""
    mlc_loss(reps, impl=impl).backward()
    return 0


def cpu_peak_extra(n: int, m: int, d: int, dtype: str, impl: str) -> int:
    """Peak resident memory of one forward+backward above the inputs, in a fresh child process (Linux)."""
    setup = (
        f"x = torch.randn({n}, {m}, {d}, dtype=DTYPES[{dtype!r}]).requires_grad_()\n"
        f"loss_step(torch.randn(2, 2, 8, dtype=DTYPES[{dtype!r}]).requires_grad_(), {impl!r})"  # lazy imports
    )
    return _run_child(_child_peak_code(setup, f"loss_step(x, {impl!r})"))


def run_grid(
    grid: list[tuple[int, int, int]],
    impls: list[str],
    dtypes: list[str],
    device: torch.device,
    budget_s: float,
    memory: bool,
    progress: bool = True,
    reference_max_n: int | None = None,
) -> list[Row]:
    """Benchmark every (N, m, d) x dtype x impl; returns one Row per mode.

    ``reference_max_n`` skips the (slow) reference above that N: those rows get no speed-up.
    """
    from tqdm import tqdm

    name = device_name(device)
    peak_bw = nominal_bandwidth(device)
    rows: list[Row] = []
    jobs = [(cfg, dt, impl) for cfg in grid for dt in dtypes for impl in impls]
    for (n, m, d), dt, impl in tqdm(jobs, desc="mlc-bench", disable=not progress, file=sys.stderr):
        if impl == "reference" and reference_max_n is not None and n > reference_max_n:
            continue
        reps = make_inputs(n, m, d, DTYPES[dt], device)
        try:
            resolve_impl(impl, reps)
        except (ImplementationUnavailableError, TypeError, ValueError) as err:
            print(f"skip {impl} {dt} N={n} m={m} d={d}: {err}", file=sys.stderr)
            continue
        times = time_modes(reps, impl, budget_s)
        peak = None
        if memory:
            peak = cuda_peak_extra(reps, impl) if device.type == "cuda" else cpu_peak_extra(n, m, d, dt, impl)
        reps_bytes = reps.numel() * reps.element_size()
        for mode in MODES:
            row = Row(name, impl, dt, n, m, d, mode, times[mode])
            if mode == "full" and peak is not None:
                row.peak_extra_bytes = peak
                row.peak_over_reps = peak / reps_bytes
            if mode == "forward" and device.type == "cuda":
                # the fused kernel reads reps twice and writes the gradient once
                row.bandwidth_gbs = 3 * reps_bytes / (times[mode] * 1e-3) / 1e9
                if peak_bw:
                    row.bandwidth_pct_nominal = 100 * row.bandwidth_gbs * 1e9 / peak_bw
            rows.append(row)
        del reps
    baseline = {(r.dtype, r.N, r.m, r.d, r.mode): r.time_ms for r in rows if r.impl == "reference"}
    for r in rows:
        ref = baseline.get((r.dtype, r.N, r.m, r.d, r.mode))
        r.speedup_vs_reference = ref / r.time_ms if ref else None
    return rows


def format_table(rows: list[Row]) -> str:
    """A plain-text table of the rows (one line per impl, config and mode)."""
    head = (
        f"{'impl':<10}{'dtype':<6}{'N':>6}{'m':>4}{'d':>6}  {'mode':<9}"
        f"{'ms':>10}{'x ref':>9}{'peak/reps':>11}{'GB/s':>9}{'%peak':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        spd = f"{r.speedup_vs_reference:.1f}" if r.speedup_vs_reference else "-"
        mem = f"{r.peak_over_reps:.2f}" if r.peak_over_reps is not None else "-"
        bw = f"{r.bandwidth_gbs:.0f}" if r.bandwidth_gbs else "-"
        pct = f"{r.bandwidth_pct_nominal:.0f}" if r.bandwidth_pct_nominal else "-"
        lines.append(
            f"{r.impl:<10}{r.dtype:<6}{r.N:>6}{r.m:>4}{r.d:>6}  {r.mode:<9}"
            f"{r.time_ms:>10.3f}{spd:>9}{mem:>11}{bw:>9}{pct:>7}"
        )
    return "\n".join(lines)


def write_csv(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()))
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))


def plot(rows: list[Row], path: Path) -> None:
    """Two panels: forward+backward time per config and impl (log scale), and speed-up over reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = [r for r in rows if r.mode == "full"]
    configs = sorted({(r.dtype, r.N, r.m, r.d) for r in full}, key=lambda c: (c[0], c[1] * c[2] * c[3]))
    impls = sorted({r.impl for r in full}, key=["reference", "torch", "native", "triton"].index)
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / max(len(impls), 1)
    for i, impl in enumerate(impls):
        xs, ts, ss = [], [], []
        for j, cfg in enumerate(configs):
            hit = [r for r in full if (r.dtype, r.N, r.m, r.d) == cfg and r.impl == impl]
            if hit:
                xs.append(j + i * width)
                ts.append(hit[0].time_ms)
                ss.append(hit[0].speedup_vs_reference or 0.0)
        ax_t.bar(xs, ts, width, label=impl)
        ax_s.bar(xs, ss, width, label=impl)
    labels = [f"{dt}\nN={n} m={m}\nd={d}" for dt, n, m, d in configs]
    for ax in (ax_t, ax_s):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(configs))], labels, fontsize=7)
        ax.set_yscale("log")
        ax.legend()
    ax_t.set_ylabel("forward+backward time (ms)")
    ax_s.set_ylabel("speed-up over reference (x)")
    fig.suptitle(f"MLC loss on {full[0].device}" if full else "MLC loss")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    time_ms: float
    peak_extra_bytes: int | None = None
    time_vs_unfused: float | None = None
    memory_vs_unfused: float | None = None


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


def run_fused_linear(shape, impl: str, dtype: str, device: torch.device, budget_s: float, memory: bool) -> list:
    """Time and peak memory of the fused linear loss against the unfused composite, same impl."""
    n, m, dh, d = shape
    hidden, weight, bias = fused_linear_inputs(n, m, dh, d, DTYPES[dtype], device)
    rows = []
    for variant, fused in (("unfused", False), ("fused", True)):
        ms = time_call(
            lambda _, f=fused: fused_linear_step(hidden, weight, bias, impl, f),
            lambda: None,
            device,
            budget_s,
            min_reps=3,
            max_reps=10,
        )
        peak = None
        if memory and device.type == "cuda":
            for t in (hidden, weight, bias):
                t.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            handed_back = fused_linear_step(hidden, weight, bias, impl, fused)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before - handed_back
        elif memory:
            setup = (
                f"h, w, b = fused_linear_inputs({n}, {m}, {dh}, {d}, DTYPES[{dtype!r}], torch.device('cpu'))\n"
                f"fused_linear_step(*fused_linear_inputs(2, {m}, 8, 4, DTYPES[{dtype!r}], torch.device('cpu')), "
                f"{impl!r}, {fused})"
            )
            peak = _run_child(_child_peak_code(setup, f"fused_linear_step(h, w, b, {impl!r}, {fused})"))
        rows.append(FusedRow(device_name(device), impl, dtype, n, m, dh, d, variant, ms, peak))
    unfused, fused_row = rows
    fused_row.time_vs_unfused = fused_row.time_ms / unfused.time_ms
    if fused_row.peak_extra_bytes is not None and unfused.peak_extra_bytes:
        fused_row.memory_vs_unfused = fused_row.peak_extra_bytes / unfused.peak_extra_bytes
    return rows


def plot_fused(rows: list, path: Path) -> None:
    """Time and extra memory of the fused linear loss next to the unfused composite."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(8, 3.5))
    names = [r.variant for r in rows]
    ax_t.bar(names, [r.time_ms for r in rows], color=["tab:gray", "tab:green"])
    ax_t.set_ylabel("forward+backward time (ms)")
    if all(r.peak_extra_bytes is not None for r in rows):
        ax_m.bar(names, [r.peak_extra_bytes / 2**20 for r in rows], color=["tab:gray", "tab:green"])
    ax_m.set_ylabel("extra peak memory (MB)")
    r = rows[0]
    fig.suptitle(
        f"fused linear MLC loss, {r.impl} {r.dtype}, N={r.N} m={r.m} d_h={r.d_h} d={r.d} on {r.device}", fontsize=9
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_fused_table(rows: list) -> str:
    head = (
        f"{'impl':<8}{'dtype':<6}{'N':>6}{'m':>4}{'d_h':>6}{'d':>6}  {'variant':<9}"
        f"{'ms':>10}{'extra MB':>10}{'t/unfused':>11}{'mem/unfused':>13}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        mb = f"{r.peak_extra_bytes / 2**20:.1f}" if r.peak_extra_bytes is not None else "-"
        tr = f"{r.time_vs_unfused:.2f}" if r.time_vs_unfused else "-"
        mr = f"{r.memory_vs_unfused:.2f}" if r.memory_vs_unfused is not None else "-"
        lines.append(
            f"{r.impl:<8}{r.dtype:<6}{r.N:>6}{r.m:>4}{r.d_h:>6}{r.d:>6}  {r.variant:<9}"
            f"{r.time_ms:>10.1f}{mb:>10}{tr:>11}{mr:>13}"
        )
    return "\n".join(lines)


def run_hf_capture(shape, device: torch.device, budget_s: float, memory: bool) -> list:
    """The variant passes: naive vs truncated (same N), and the gradient cache vs truncated."""
    from .hf_capture import CaptureRow, build, config_for, inputs, variant_step

    n, m, t = shape
    layer = config_for(device)[0]["num_hidden_layers"] // 2
    model, head = build(device)
    ids, att = inputs(n, m, t, device)
    rows = []
    for variant in ("naive", "truncated", "grad_cache"):
        ms = time_call(
            lambda _, v=variant: variant_step(model, head, ids, att, layer, v),
            lambda: None,
            device,
            budget_s,
            min_reps=2,
            max_reps=5,
        )
        peak = None
        if memory and device.type == "cuda":
            model.zero_grad(set_to_none=True)
            head.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            handed_back = variant_step(model, head, ids, att, layer, variant)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before - handed_back
        elif memory:
            setup = (
                "from mlc_kernels.benchmarks.hf_capture import build, inputs, variant_step\n"
                "dev = torch.device('cpu')\n"
                "model, head = build(dev)\n"
                f"ids, att = inputs({n}, {m}, {t}, dev)\n"
                f"variant_step(model, head, ids[:1, :2, :4], att[:1, :2, :4], {layer}, {variant!r})"
            )
            peak = _run_child(_child_peak_code(setup, f"variant_step(model, head, ids, att, {layer}, {variant!r})"))
        rows.append(CaptureRow(device_name(device), n, m, t, layer, variant, ms, peak))
    naive, truncated, cached = rows
    for r in (truncated, cached):
        r.time_vs_naive = r.time_ms / naive.time_ms
        if r.peak_extra_bytes is not None and naive.peak_extra_bytes:
            r.memory_vs_naive = r.peak_extra_bytes / naive.peak_extra_bytes
    if cached.peak_extra_bytes is not None and truncated.peak_extra_bytes:
        cached.memory_vs_truncated = cached.peak_extra_bytes / truncated.peak_extra_bytes
    return rows


def format_capture_table(rows: list) -> str:
    head = (
        f"{'variant':<12}{'N':>4}{'m':>4}{'T':>5}{'k':>4}{'ms':>10}{'extra MB':>10}"
        f"{'t/naive':>9}{'mem/naive':>11}{'mem/truncated':>15}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        mb = f"{r.peak_extra_bytes / 2**20:.1f}" if r.peak_extra_bytes is not None else "-"
        tn = f"{r.time_vs_naive:.2f}" if r.time_vs_naive else "-"
        mn = f"{r.memory_vs_naive:.2f}" if r.memory_vs_naive is not None else "-"
        mt = f"{r.memory_vs_truncated:.2f}" if r.memory_vs_truncated is not None else "-"
        lines.append(
            f"{r.variant:<12}{r.N:>4}{r.m:>4}{r.T:>5}{r.layer:>4}{r.time_ms:>10.1f}{mb:>10}{tn:>9}{mn:>11}{mt:>15}"
        )
    return "\n".join(lines)


def run_train_step(device: torch.device, budget_s: float, memory: bool) -> list[dict]:
    """A whole DPO step with and without MLC (see benchmarks/train_step.py); ratios to DPO alone."""
    from .train_step import VARIANTS, build, step

    rows = []
    for variant in VARIANTS:
        trainer, model, optimizer, batch = build(variant)
        ms = time_call(lambda _, t=trainer, mo=model, o=optimizer, b=batch: step(t, mo, o, b), lambda: None, device,
                       budget_s, min_reps=2, max_reps=3)  # fmt: skip
        del trainer, model, optimizer, batch
        peak = None
        if memory and device.type == "cpu":
            setup = (
                "from mlc_kernels.benchmarks.train_step import build, step\n"
                f"t, mo, o, b = build({variant!r})\n"
                "step(t, mo, o, b)"  # allocates gradients and optimizer states before the baseline
            )
            peak = _run_child(_child_peak_code(setup, "step(t, mo, o, b) or 0"))
        rows.append({"device": device_name(device), "variant": variant, "step_ms": round(ms, 1),
                     "peak_extra_bytes": peak})  # fmt: skip
    base = rows[0]
    for r in rows:
        r["time_vs_dpo"] = round(r["step_ms"] / base["step_ms"], 3)
        if r["peak_extra_bytes"] is not None and base["peak_extra_bytes"]:
            r["memory_vs_dpo"] = round(r["peak_extra_bytes"] / base["peak_extra_bytes"], 3)
    return rows


def parse_grid(text: str) -> list[tuple[int, int, int]]:
    """``"64x10x1024,256x10x4096"`` -> ``[(64, 10, 1024), (256, 10, 4096)]``."""
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]  # type: ignore[misc]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mlc-bench", description="Benchmark the MLC loss implementations.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--grid", type=parse_grid, help="NxMxD,... (default: a CPU or GPU grid)")
    parser.add_argument(
        "--impls", default=None, help="comma list (default: reference,torch and triton on CUDA, native on CPU)"
    )
    parser.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16,fp64 (default fp32 CPU, bf16 GPU)")
    parser.add_argument("--budget", type=float, default=0.3, help="seconds of timing per impl and mode")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
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
        choices=("loss", "fused-linear", "hf-capture", "train-step", "all"),
        default="all",
        help="all = loss, fused-linear and hf-capture; train-step (several minutes on CPU) runs only when named",
    )
    parser.add_argument(
        "--hf-shape",
        type=lambda t: tuple(int(v) for v in t.split("x")),
        default=None,
        help="NxMxT of the variant-pass comparison (default 8x10x32)",
    )
    parser.add_argument(
        "--fused-linear-shape",
        type=lambda t: tuple(int(v) for v in t.split("x")),
        default=FUSED_LINEAR_SHAPE,
        help="NxMxD_HxD of the fused linear comparison (default 1024x10x4096x1024)",
    )
    parser.add_argument("--fused-linear-impl", default=None, help="loss impl of both variants (default: auto)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    grid = args.grid or (GPU_GRID if gpu else CPU_GRID)
    default_impls = ["reference", "torch", "triton"] if gpu else ["reference", "torch", "native"]
    impls = args.impls.split(",") if args.impls else default_impls
    dtypes = args.dtypes.split(",") if args.dtypes else (["bf16"] if gpu else ["fp32"])
    torch.manual_seed(0)
    overrides = {}
    if args.triton_configs is not None and args.triton_configs.exists():
        from mlc_kernels.ops.triton_kernels import KernelConfig

        overrides = {int(k): KernelConfig(**v) for k, v in json.loads(args.triton_configs.read_text()).items()}
        print(f"Triton configurations from {args.triton_configs}: {overrides}")
    ref_max_n = args.reference_max_n if args.reference_max_n is not None else (256 if gpu else None)
    from mlc_kernels.ops.triton_kernels import kernel_config_override

    if args.suite in ("loss", "all"):
        with kernel_config_override(overrides):
            rows = run_grid(
                grid,
                impls,
                dtypes,
                device,
                args.budget,
                memory=not args.no_memory,
                progress=not args.quiet,
                reference_max_n=ref_max_n,
            )
        if not rows:
            raise SystemExit("mlc-bench: nothing ran (no impl could run on this device)")
        print(f"MLC loss benchmark on {rows[0].device}, torch {torch.__version__}")
        print(format_table(rows))
        write_csv(rows, args.out / "mlc_bench.csv")
        plot(rows, args.out / "mlc_bench.png")
        print(f"wrote {args.out / 'mlc_bench.csv'} and {args.out / 'mlc_bench.png'}")
    if args.suite in ("fused-linear", "all"):
        fl_impl = "auto" if args.fused_linear_impl is None else args.fused_linear_impl
        fl_dtype = "bf16" if gpu else "fp32"
        from mlc_kernels.loss import resolve_impl

        fl_impl = resolve_impl(
            fl_impl, torch.empty(0, args.fused_linear_shape[1], 1, device=device, dtype=DTYPES[fl_dtype])
        )
        with kernel_config_override(overrides):
            fl_rows = run_fused_linear(
                args.fused_linear_shape, fl_impl, fl_dtype, device, args.budget, memory=not args.no_memory
            )
        print(
            f"Fused linear MLC loss vs linear + mlc_loss on {fl_rows[0].device} (extra memory: above inputs, "
            "parameters and the gradients handed back)"
        )
        print(format_fused_table(fl_rows))
        write_csv(fl_rows, args.out / "fused_linear.csv")
        plot_fused(fl_rows, args.out / "fused_linear.png")
        print(f"wrote {args.out / 'fused_linear.csv'} and {args.out / 'fused_linear.png'}")
    if args.suite == "train-step":
        rows = run_train_step(device, args.budget, memory=not args.no_memory)
        print(
            "A whole DPO step (hidden 512, 8 layers, vocab 151936; 8 prompts, 32+64 tokens) with and without MLC"
            " (m=10, k=4); extra = peak above parameters, gradients, optimizer states and inputs"
        )
        for r in rows:
            print(r)
        path = args.out / "train_step.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[-1]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {path}")
        return
    if args.suite in ("hf-capture", "all"):
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("hf-capture: skipped (pip install transformers)")
            return
        from .hf_capture import HF_SHAPE, HF_SHAPE_GPU

        shape = args.hf_shape or (HF_SHAPE_GPU if gpu else HF_SHAPE)
        cap_rows = run_hf_capture(shape, device, args.budget, memory=not args.no_memory)
        print(
            f"Variant passes on a Qwen2-style model (vocab 151936) on {cap_rows[0].device}: naive full forward with "
            "output_hidden_states vs truncated at k vs truncated + gradient cache (1 prompt per chunk)"
        )
        print(format_capture_table(cap_rows))
        write_csv(cap_rows, args.out / "hf_capture.csv")
        print(f"wrote {args.out / 'hf_capture.csv'}")


if __name__ == "__main__":
    main()
