"""The fused-linear suite (``mlc-bench --suite fused-linear``): time and peak memory of one forward+backward of
``fused_linear_mlc_loss`` against the unfused composite (``linear`` then ``mlc_loss``, same impl), memory above the
inputs, the parameters and the gradients handed back (CUDA allocator; on CPU a fresh child process, this module run
as ``__main__``). Writes ``fused_linear.csv``/``.png``.
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any

import torch

from mlc_kernels import fused_linear_mlc_loss, mlc_loss
from mlc_kernels.loss import resolve_impl

from .utils import (
    DTYPES,
    TIMING_COLUMNS,
    Column,
    Options,
    PlotSpec,
    allocator_name,
    child_peak,
    cuda_peak,
    device_name,
    emit,
    mb,
    peak_extra,
    ratio,
    row,
    time_stmt,
)

SHAPE = (1024, 10, 4096, 1024)  # N, m, d_h, d

COLUMNS: list[Column] = [
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
PLOT = PlotSpec(label=lambda r: r["variant"], series=lambda r: r["impl"], extra=("extra_mb", "extra peak MB"))


def fused_linear_step(hidden, weight, bias, impl: str, fused: bool) -> int:
    """One forward+backward of the fused loss or of the unfused composite (``linear`` then ``mlc_loss``,
    same impl); returns the bytes of the gradients handed back (hidden, weight, bias)."""
    for t in (hidden, weight, bias):
        t.grad = None
    if fused:
        loss = fused_linear_mlc_loss(hidden, weight, bias, impl=impl)
    else:
        loss = mlc_loss(torch.nn.functional.linear(hidden, weight, bias), impl=impl)
    loss.backward()
    return sum(t.grad.numel() * t.grad.element_size() for t in (hidden, weight, bias))


def fused_linear_inputs(n, m, dh, d, dtype, device):
    """``hidden (n, m, dh)``, ``weight (d, dh)`` and a zero ``bias (d,)``, all leaves, seed 0."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(n, m, dh, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(d, dh, generator=gen) / dh**0.5).to(device=device, dtype=dtype).requires_grad_()
    bias = torch.zeros(d, device=device, dtype=dtype).requires_grad_()
    return hidden, weight, bias


def cuda_peak_extra(hidden, weight, bias, impl: str, fused: bool) -> int:
    """CUDA bytes at the peak of one step above the inputs, the parameters and the gradients handed back."""
    for p in (hidden, weight, bias):
        p.grad = None
    return cuda_peak(lambda: fused_linear_step(hidden, weight, bias, impl, fused))


def gemm_floor_step(hidden, weight, bias, outputs) -> int:
    """The unfused path's three GEMMs (``linear`` and its two gradient GEMMs) into preallocated ``outputs``
    (reps ``(N*m, d)``, input gradient ``(N*m, d_h)``, weight gradient ``(d, d_h)``): what one step costs in BLAS
    workspace alone (MKL's packing buffers on CPU), the same in both paths; hands nothing back."""
    rows = hidden.detach().view(-1, hidden.shape[2])
    reps, grad_rows, grad_weight = outputs
    w = weight.detach()
    torch.addmm(bias.detach(), rows, w.t(), out=reps)
    torch.mm(reps, w, out=grad_rows)
    torch.mm(reps.t(), rows, out=grad_weight)
    return 0


def _child_setup(n: int, m: int, dh: int, d: int, dtype: str, impl: str, fused: bool, gemms_only: bool = False):
    cpu = torch.device("cpu")
    inputs = fused_linear_inputs(n, m, dh, d, DTYPES[dtype], cpu)
    fused_linear_step(*fused_linear_inputs(2, m, 8, 4, DTYPES[dtype], cpu), impl, fused)  # lazy imports
    if gemms_only:
        kw = {"dtype": DTYPES[dtype], "device": cpu}
        outputs = (torch.ones(n * m, d, **kw), torch.ones(n * m, dh, **kw), torch.ones(d, dh, **kw))
        return gemm_floor_step, (*inputs, outputs)
    return fused_linear_step, (*inputs, impl, fused)


def run_fused_linear(shape, impl: str, dtype: str, opts: Options) -> list[dict[str, Any]]:
    """Time and peak memory of the fused linear loss against the unfused composite, same impl."""
    device = opts.device
    n, m, dh, d = shape
    hidden, weight, bias = fused_linear_inputs(n, m, dh, d, DTYPES[dtype], device)
    rows = []
    for variant, fused in (("unfused", False), ("fused", True)):
        t = time_stmt(
            lambda f=fused: fused_linear_step(hidden, weight, bias, impl, f), device, opts.budget_s, opts.threads
        )
        on_cuda = partial(cuda_peak_extra, hidden, weight, bias, impl, fused)
        peak = peak_extra(opts, on_cuda, "fused_linear", n=n, m=m, dh=dh, d=d, dtype=dtype, impl=impl, fused=fused)
        key = dict(device=device_name(device), impl=impl, dtype=dtype, N=n, m=m, d_h=dh, d=d, variant=variant)
        rows.append(row(key, t, opts.threads, peak_extra_bytes=peak, time_vs_unfused=None, memory_vs_unfused=None,
                        allocator=allocator_name(opts)))  # fmt: skip
    unfused, fused_row = rows
    fused_row["time_vs_unfused"] = fused_row["median_ms"] / unfused["median_ms"]
    fused_row["memory_vs_unfused"] = ratio(fused_row["peak_extra_bytes"], unfused["peak_extra_bytes"])
    return rows


def run(args: argparse.Namespace, opts: Options) -> None:
    """The suite under the runner's options (``--fused-linear-shape``, ``--fused-linear-impl``)."""
    dtype = "bf16" if opts.device.type == "cuda" else "fp32"
    probe = torch.empty(0, args.fused_linear_shape[1], 1, device=opts.device, dtype=DTYPES[dtype])
    impl = resolve_impl(args.fused_linear_impl or "auto", probe)
    rows = run_fused_linear(args.fused_linear_shape, impl, dtype, opts)
    shown = [{**r, "extra_mb": mb(r["peak_extra_bytes"])} for r in rows]
    title = (
        f"Fused linear MLC loss vs linear + mlc_loss on {rows[0]['device']}, {opts.threads} threads "
        f"(extra memory above inputs, parameters and the gradients handed back; {allocator_name(opts)})"
    )
    emit("fused_linear", title, shown, COLUMNS, PLOT, args.out)


if __name__ == "__main__":  # the memory child of peak_extra off CUDA
    child_peak(_child_setup, lambda state: state[0](*state[1]))
