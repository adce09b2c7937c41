"""``mlc demo``: the offline demo on the shipped world-v2 model (base-language DPO vs DPO+MLC on CPU, evaluated
in every language; report and PNG plots in ``--out``)."""

from __future__ import annotations

import argparse

from ..errors import UsageError
from .options import HELP_FORMAT, check_output_folder, finite_float


def make_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``mlc demo``'s options: the output folder, steps, MLC weight, seed, worker processes."""
    p = subparsers.add_parser("demo", help="the offline demo (shipped world-v2 model: DPO vs DPO+MLC, CPU)",
                              formatter_class=HELP_FORMAT)  # fmt: skip
    p.add_argument("--out", default="mlc_demo", help="output folder (the starting model is saved in <out>/model)")
    p.add_argument("--steps", type=int, default=120, help="alignment steps of each run")
    p.add_argument("--mlc-weight", type=finite_float, default=None,
                   help="MLC weight (default: the pre-registered weight rule's choice)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="alignment seed")
    p.add_argument("--workers", type=int, default=None,
                   help="processes for the two alignment runs (default: one per CPU core, at most 2)")  # fmt: skip
    return p


def main(args: argparse.Namespace) -> None:
    """Run ``mlc demo`` on its parsed options."""
    from ..transfer.demo import run_demo

    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    out = check_output_folder(args.out, "--out")
    run_demo(out, steps=args.steps, seed=args.seed, mlc_weight=args.mlc_weight, workers=args.workers)
