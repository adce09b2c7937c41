"""``mlc``: train with MLC (TRL trainers), evaluate cross-lingual consistency, and the offline demo.

- ``mlc train``: model (local path or hub id), dataset (JSONL, LLaMA-Factory JSON or ``sample``), algorithm,
  MLC options (:mod:`.train`).
- ``mlc eval``: per-language consistency with the consensus direction and the s1 share, printed and plotted
  (:mod:`.eval`).
- ``mlc demo``: no arguments, no network: the shipped world-v2 model, base-language DPO vs DPO+MLC, evaluated in
  every language, report and PNG plots (:mod:`.demo`).
- ``mlc transfer``: the synthetic world's cross-lingual transfer experiment (:mod:`.transfer`).
- ``mlc bench``: the kernel benchmarks (:mod:`.bench`).

One error convention: a :class:`UsageError` prints ``mlc <command>: error: ...`` (one line) and exits 2; an
unexpected error prints one line asking for ``--debug`` and exits 1; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import UsageError
from . import bench, demo, train, transfer
from . import eval as evaluation
from .options import HELP_FORMAT, first_line

COMMANDS = {"train": train, "eval": evaluation, "demo": demo, "transfer": transfer, "bench": bench}
"""Command name -> its module (``make_parser(subparsers)``, ``main``), in the order of ``mlc --help``."""

OWN_COMMAND_LINE = ("train", "bench")
"""Commands whose ``main`` parses the rest of the command line itself (TrlParser, the benchmark runner)."""


def build_parser() -> argparse.ArgumentParser:
    """The ``mlc`` parser: ``--debug`` and one subcommand per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(prog="mlc", description=__doc__.splitlines()[0], formatter_class=HELP_FORMAT,
                                     epilog="--debug (or MLC_DEBUG=1): show the traceback of an error")  # fmt: skip
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also: MLC_DEBUG=1)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.make_parser(subparsers)
    return parser


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("MLC_DEBUG", "").lower() in ("1", "true", "yes")


def _run(parser: argparse.ArgumentParser, command: str | None, argv: list[str]) -> None:
    if command in OWN_COMMAND_LINE:
        COMMANDS[command].main(argv[argv.index(command) + 1 :])
        return
    args = parser.parse_args(argv)
    COMMANDS[args.command].main(args)


def main(argv: list[str] | None = None) -> None:
    """The ``mlc`` command. User errors: ``mlc <command>: error: ...`` on stderr and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        _run(parser, command, argv)
    except UsageError as err:
        if debug:
            raise
        print(f"mlc {command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"mlc {command}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except BaseException as err:
        if isinstance(err, SystemExit) or debug:
            raise
        print(f"mlc {command}: error: {first_line(err)} (an unexpected error; rerun with --debug for the traceback "
              "and report it)", file=sys.stderr)  # fmt: skip
        raise SystemExit(1) from None
