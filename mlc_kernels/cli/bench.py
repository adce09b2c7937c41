"""``mlc bench``: throughput of the MLC loss on this device (:mod:`mlc_kernels.bench`, also ``mlc-bench``); the
benchmark runner parses the command line itself."""

from __future__ import annotations

import argparse


def make_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``bench`` entry of ``mlc --help``; its options are the runner's (``mlc bench --help``)."""
    return subparsers.add_parser("bench", help="kernel benchmarks (mlc-bench; mlc bench --help)", add_help=False)


def main(argv: list[str]) -> None:
    """``mlc-bench`` under the name ``mlc bench`` (its usage and error lines say ``mlc bench``)."""
    from ..bench import main as bench_main

    bench_main(argv, prog="mlc bench")
