"""``mlc bench``: the kernel benchmarks (``mlc-bench``) under the name ``mlc bench``; the benchmark runner
parses the command line itself."""

from __future__ import annotations

import argparse


def make_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``bench`` entry of ``mlc --help``; its options are the runner's (``mlc bench --help``)."""
    return subparsers.add_parser("bench", help="kernel benchmarks (mlc-bench; mlc bench --help)", add_help=False)


def main(argv: list[str]) -> None:
    """``mlc-bench`` under the name ``mlc bench`` (its parser's usage and error lines say ``mlc bench``)."""
    from unittest import mock

    from ..bench.runner import main as bench_main

    init = argparse.ArgumentParser.__init__

    def renamed(self, *args, **kwargs) -> None:
        if kwargs.get("prog") == "mlc-bench":
            kwargs["prog"] = "mlc bench"
        init(self, *args, **kwargs)

    with mock.patch.object(argparse.ArgumentParser, "__init__", renamed):
        bench_main(argv)
