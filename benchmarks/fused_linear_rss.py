"""Peak RSS of one fused linear MLC loss step against the unfused path, without timing (the repeated check of
``results/cpu-epyc-2core/bench-v2/NOTE.md``): ``python -m benchmarks.fused_linear_rss {fused|unfused|gemms}
[THREADS] [--shape N m d_h d] [--repeat K]``.

Default shape N=1024, m=10, d_h=4096, d=1024 (the fused-linear suite's), fp32, impl auto, the default allocator;
prints the extra peak RSS (MB) above the inputs and the gradients handed back, measured by the fused-linear
suite's memory child (a fresh process per repeat). ``gemms`` runs only the unfused path's three GEMMs into
preallocated outputs: the BLAS workspace (MKL's packing buffers) that both paths pay, a floor under both figures.
"""

from __future__ import annotations

import argparse

import torch

from mlc_kernels.bench.fused_linear import SHAPE
from mlc_kernels.bench.utils import Options, peak_in_child


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=("fused", "unfused", "gemms"))
    parser.add_argument("threads", type=int, nargs="?", default=1, help="intra-op threads (default 1)")
    parser.add_argument("--shape", type=int, nargs=4, default=list(SHAPE), metavar=("N", "m", "d_h", "d"))
    parser.add_argument("--repeat", type=int, default=1, help="fresh processes measured, one line each (default 1)")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.repeat < 1 or min(args.shape) < 1:
        parser.error("threads, --repeat and every --shape entry must be positive")
    opts = Options(torch.device("cpu"), budget_s=0.0, memory=True, threads=args.threads)
    n, m, dh, d = args.shape
    extra = {"gemms_only": True} if args.variant == "gemms" else {}
    for _ in range(args.repeat):
        peak = peak_in_child("fused_linear", opts, n=n, m=m, dh=dh, d=d, dtype="fp32", impl="auto",
                             fused=args.variant == "fused", **extra)  # fmt: skip
        print(args.variant, f"{n}x{m}x{dh}->{d}", f"{peak / 2**20:.2f}", "MB")


if __name__ == "__main__":
    main()
