"""The kernel's target metrics: bandwidth share of the Triton loss and its speed over the torch composite.

For each shape (bf16 by default) times, as medians of ``triton.testing.do_bench`` on CUDA: Triton
forward+backward, Triton loss-only (no grad), the ``torch`` composite forward+backward. Bandwidth share
counts 3 passes over reps for forward+backward (read for the Gram matrix, read and write for the
gradient) and 1 for loss-only, against the GPU's nominal bandwidth. Writes ``kernel_targets.csv``
and ``kernel_targets.txt`` (one line per target) to ``--out``. ``--smoke`` runs tiny shapes on the
CPU (Triton interpreter) to check the script itself.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from mlc_kernels.bench.loss import make_inputs
from mlc_kernels.bench.utils import nominal_bandwidth, time_call, write_csv

SHAPES = [(4096, 10, 4096), (4096, 32, 1024), (256, 10, 4096)]
SMOKE_SHAPES = [(4, 10, 32), (2, 20, 16)]


def bench_ms(fn, device: torch.device, grad_to_none=None) -> float:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` on CUDA, ``time_call`` on CPU."""
    if device.type == "cuda":
        import triton

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none, return_mode="median"))
    return time_call(lambda _: fn(), lambda: None, device, 0.05, min_reps=2, max_reps=3).median_ms


def measure(n: int, m: int, d: int, dtype: torch.dtype, device: torch.device, objective: str = "sv_softmax") -> dict:
    """One row: milliseconds of each variant, bandwidth shares, and the speed-up over ``torch``."""
    from mlc_kernels import mlc_loss

    reps = make_inputs(n, m, d, dtype, device)
    leaf = reps.detach().clone().requires_grad_()

    def full(impl: str):
        return lambda: mlc_loss(leaf, impl=impl, objective=objective).backward()

    def loss_only():
        with torch.no_grad():
            mlc_loss(reps, impl="triton", objective=objective)

    triton_ms = bench_ms(full("triton"), device, [leaf])
    loss_ms = bench_ms(loss_only, device)
    torch_ms = bench_ms(full("torch"), device, [leaf])
    nbytes = reps.numel() * reps.element_size()
    peak = nominal_bandwidth(device)
    row = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "objective": objective,
        "N": n,
        "m": m,
        "d": d,
        "triton_fwd_bwd_ms": round(triton_ms, 4),
        "triton_loss_only_ms": round(loss_ms, 4),
        "torch_fwd_bwd_ms": round(torch_ms, 4),
        "speedup_vs_torch": round(torch_ms / triton_ms, 2),
        "fwd_bwd_gbs": round(3 * nbytes / (triton_ms * 1e-3) / 1e9, 1),
        "loss_only_gbs": round(nbytes / (loss_ms * 1e-3) / 1e9, 1),
    }
    row["fwd_bwd_pct_nominal"] = round(100 * row["fwd_bwd_gbs"] * 1e9 / peak, 1) if peak else None
    row["loss_only_pct_nominal"] = round(100 * row["loss_only_gbs"] * 1e9 / peak, 1) if peak else None
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    parser.add_argument("--objectives", default="sv_softmax", help="comma list")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cpu" if args.smoke else "cuda")
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    args.out.mkdir(parents=True, exist_ok=True)
    rows, lines = [], []
    for objective in args.objectives.split(","):
        for n, m, d in shapes:
            row = measure(n, m, d, torch.float32 if args.smoke else torch.bfloat16, device, objective)
            rows.append(row)
            print(row, flush=True)
            lines.append(
                f"{objective} ({n},{m},{d}) {row['dtype']}: fwd+bwd {row['triton_fwd_bwd_ms']} ms = "
                f"{row['fwd_bwd_pct_nominal']}% of nominal bandwidth (3 passes); loss-only "
                f"{row['loss_only_pct_nominal']}% (1 pass); {row['speedup_vs_torch']}x the torch composite"
            )
    write_csv(rows, args.out / "kernel_targets.csv")
    (args.out / "kernel_targets.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
