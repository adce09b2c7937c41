"""Peak RSS of one fused linear MLC loss step against the unfused path, without timing (the repeated check of
``results/cpu-epyc-2core/bench-v2/NOTE.md``): ``python -m benchmarks.fused_linear_rss {fused|unfused} [THREADS]``.

N=1024, m=10, d_h=4096, d=1024, fp32, impl auto, the default allocator; prints the extra peak RSS (MB) above the
inputs and the gradients handed back, measured by the fused-linear suite's memory child (a fresh process).
"""

from __future__ import annotations

import argparse

import torch

from mlc_kernels.bench.utils import Options, peak_in_child


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=("fused", "unfused"))
    parser.add_argument("threads", type=int, nargs="?", default=1, help="intra-op threads (default 1)")
    args = parser.parse_args(argv)
    opts = Options(torch.device("cpu"), budget_s=0.0, memory=True, threads=args.threads)
    peak = peak_in_child("fused_linear", opts, n=1024, m=10, dh=4096, d=1024, dtype="fp32", impl="auto",
                         fused=args.variant == "fused")  # fmt: skip
    print(args.variant, peak / 2**20, "MB")


if __name__ == "__main__":
    main()
