"""``mlc transfer``: cross-lingual transfer of base-language alignment in the synthetic world v2 (the gate, DPO and
the pre-registered DPO+MLC arms; table, CSV, JSON and PNG in ``--out``). World v1 is retired to the repository's
``experiments/transfer/v1.py``."""

from __future__ import annotations

import argparse

from .options import HELP_FORMAT, check_output_folder, finite_float


def make_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``mlc transfer``'s options: the protocol size, cache, seeds, MLC settings, parallelism and world."""
    p = subparsers.add_parser("transfer", help="cross-lingual transfer of base-language alignment (synthetic world)",
                              formatter_class=HELP_FORMAT)  # fmt: skip
    p.add_argument("--quick", action="store_true", help="3 seeds, 64+64 prompts per language (< 10 min)")
    p.add_argument("--out", default="transfer_out", help="folder for the table, CSV, JSON and PNG")
    p.add_argument("--cache-dir", default=None, help="checkpoint cache (~/.cache/mlc_kernels/transfer)")
    p.add_argument("--no-cache", action="store_true", help="pretrain afresh and keep nothing")
    p.add_argument("--seeds", default=None, help="comma list of alignment seeds (default 0,1,2)")
    p.add_argument("--mlc-layer", type=int, default=None, help="decoder layer k (default 3 of 4, the gate rule's)")
    p.add_argument("--mlc-weight", type=finite_float, default=None,
                   help="MLC weight of every arm (default: the pre-registered ones)")  # fmt: skip
    p.add_argument("--mlc-tau", type=finite_float, default=None, help="MLC temperature (default 1.0)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads per alignment run (default: 1 with several "
        "workers, else torch's)"
    )  # fmt: skip
    p.add_argument("--workers", type=int, default=None, help="alignment runs at a time, each in its own process "
                   "(default: one per CPU core)")  # fmt: skip
    p.add_argument("--world", default="v2", help="v2 (the code-switching world, with its gate) or v3 (v2 plus the "
                   "calibration-gap language cal1; pre-registered arms over world seeds 0-7, quick: 0); v1 is retired: "
                   "python -m experiments.transfer.v1 from a checkout")  # fmt: skip
    p.add_argument("--world-seed", type=int, default=None, help="world and pretraining seed (default 0)")
    p.add_argument("--world-seeds", default=None, help="--world v3: a range a-b of world seeds (default 0-7)")
    return p


def main(args: argparse.Namespace) -> None:
    """Run ``mlc transfer`` on its parsed options."""
    from ..errors import UsageError

    if args.out is not None:
        check_output_folder(args.out, "--out")
    if args.world == "v3":
        from ..transfer.v3 import run_from_args
    else:
        if args.world_seeds is not None:
            raise UsageError(f"--world-seeds is an option of --world v3, not of --world {args.world}")
        from ..transfer.v2 import run_from_args
    run_from_args(args)
