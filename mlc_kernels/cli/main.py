"""``mlc``: train with MLC (TRL trainers), evaluate cross-lingual consistency, and the offline demo.

- ``mlc train``: model (local path or hub id), dataset (JSONL, LLaMA-Factory JSON or ``sample``), algorithm,
  MLC options (:mod:`.train`).
- ``mlc eval``: per-language consistency with the consensus direction and the s1 share, printed and plotted
  (:mod:`.eval`).
- ``mlc safety``: per-language safety of generated answers (refusals of harmful prompts, over-refusal of benign
  ones), judged, several models side by side (:mod:`.safety`).
- ``mlc demo``: no arguments, no network: the shipped world-v2 model, base-language DPO vs DPO+MLC, evaluated in
  every language, report and PNG plots (:mod:`.demo`).
- ``mlc transfer``: the synthetic world's cross-lingual transfer experiment (:mod:`.transfer`).
- ``mlc bench``: the kernel benchmarks (:mod:`.bench`).

One error convention: a :class:`UsageError` prints ``mlc <command>: error: ...`` (one line) and exits 2; an
unexpected error prints one line asking for ``--debug`` and exits 1; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..errors import UsageError
from . import bench, demo, safety, train, transfer
from . import eval as evaluation
from .options import HELP_FORMAT, first_line

COMMANDS = {"train": train, "eval": evaluation, "safety": safety, "demo": demo, "transfer": transfer, "bench": bench}
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


KNOWN_WARNINGS = (r".*is deprecated and will be removed in v\d",)
"""FutureWarnings of transformers/TRL about their own renamed options, which ``mlc`` does not set: filtered once
(a user's Python code still sees them)."""

OTHER_ACCELERATORS = ("intel_extension_for_pytorch", "torch_npu", "torch_sdaa", "habana_frameworks", "torch_mlu",
                      "torch_supa", "torch_xmlir")  # fmt: skip
"""Packages through which DeepSpeed would find an accelerator other than CUDA."""


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_libraries() -> None:
    """The libraries' noise that is no news to a user of ``mlc``: DeepSpeed's "Setting accelerator to CPU" (printed
    whenever transformers or accelerate import DeepSpeed on a machine without CUDA, once per process: the
    environment tells the worker processes too) and the known FutureWarnings."""
    import importlib.util
    import warnings

    logging.getLogger("DeepSpeed").addFilter(_DropMessages("Setting accelerator to CPU"))
    if "DS_ACCELERATOR" not in os.environ and importlib.util.find_spec("deepspeed") is not None:
        import torch

        others = torch.backends.mps.is_available() or any(importlib.util.find_spec(p) for p in OTHER_ACCELERATORS)
        if not torch.cuda.is_available() and not others:
            os.environ["DS_ACCELERATOR"] = "cpu"  # what DeepSpeed would choose, without its warning
    for message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


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
    quiet_libraries()
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
