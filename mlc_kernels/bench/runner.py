"""``mlc-bench`` (``mlc bench``): time forward, backward and forward+backward of every impl over a grid, and
measure peak memory; print a table with each impl's speed-up over ``reference`` measured in the same run; write
CSV and PNG plots. One module per suite (:mod:`.loss`, :mod:`.fused_linear`, :mod:`.hf_capture`,
:mod:`.train_step`) on the shared :mod:`.utils`; this module parses the arguments and runs the suites in turn.

The intra-op threads are fixed for the run (``--threads``; default: the physical cores available). Peak memory is
the extra memory of one forward+backward above the inputs: on CUDA from the caching allocator's peak; on CPU from
the peak resident set of a fresh child process, under the default allocator unless ``--malloc-mmap-threshold`` is
given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from . import fused_linear, hf_capture, loss, train_step
from .utils import DTYPES, HelpFormatter, Options, allocator_name, default_threads, device_name

SUITES = {"loss": loss, "fused-linear": fused_linear, "hf-capture": hf_capture, "train-step": train_step}
OUTPUT_NAMES = {"loss": "mlc_bench", "fused-linear": "fused_linear", "hf-capture": "hf_capture",
                "train-step": "train_step"}  # fmt: skip
"""Suite -> the name of its ``OUT/<name>.csv`` and ``OUT/<name>.png`` (each suite module's ``emit``)."""
DEFAULT_SUITES = ("loss", "fused-linear", "hf-capture")  # train-step (minutes on CPU) runs only when named
TUNED = ("loss", "fused-linear")  # the suites that launch the Triton kernels with --triton-configs


QUICK = dict(suite="loss", rounds=1, budget=0.05, no_memory=True)
"""``--quick``: the loss suite's default grid (README's headline cells) in one pass with a short budget and no
peak-memory children, about a minute on a 2-core CPU; options given on the command line win."""


def parse_grid(text: str) -> list[tuple[int, int, int]]:
    """``"64x10x1024,256x10x4096"`` -> ``[(64, 10, 1024), (256, 10, 4096)]``."""
    grid = [_shape(item, 3, "NxMxD", "64x10x1024") for item in text.split(",") if item]
    if not grid:
        raise argparse.ArgumentTypeError(f"expected NxMxD,... (e.g. 64x10x1024), got {text!r}")
    return grid  # type: ignore[return-value]


def parse_suites(text: str | None, grid_given: bool) -> list[str]:
    """``--suite`` as a list: a comma list of SUITES or ``all``; without it, ``loss`` when ``--grid`` is
    given (the grid only concerns the loss suite), else the default suites."""
    if text is None:
        return ["loss"] if grid_given else list(DEFAULT_SUITES)
    names = [s for s in text.split(",") if s]
    if "all" in names:
        names = [*DEFAULT_SUITES, *(s for s in names if s == "train-step")]
    unknown = [s for s in names if s not in SUITES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--suite: unknown {unknown or text!r}; choose from {', '.join(SUITES)}, all")
    return list(dict.fromkeys(names))


def _shape(text: str, size: int, form: str, example: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split("x"))
    except ValueError:
        shape = ()
    if len(shape) != size or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected {form} with positive integers (e.g. {example}), got {text!r}")
    return shape


def _hf_shape(text: str) -> tuple[int, ...]:
    return _shape(text, 3, "NxMxT", "8x10x32")


def _fused_linear_shape(text: str) -> tuple[int, ...]:
    return _shape(text, 4, "NxMxD_HxD", "1024x10x4096x1024")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _comma_list(choices) -> Callable[[str], str]:
    def parse(text: str) -> str:
        names = [name for name in text.split(",") if name]
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {','.join(unknown) or text!r}; choose from {', '.join(choices)}")
        return ",".join(names)

    return parse


def make_parser(prog: str = "mlc-bench") -> argparse.ArgumentParser:
    from mlc_kernels.ops import REGISTRY

    parser = argparse.ArgumentParser(prog=prog, description="Benchmark the MLC loss implementations.",
                                     formatter_class=HelpFormatter)  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true", help="about a minute: the loss suite's default grid (README's headline "
        "cells), one round, budget 0.05 s, no peak memory (options given explicitly win)"
    )  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:i]")
    parser.add_argument("--grid", type=parse_grid, help="NxMxD,... of the loss suite (implies --suite loss)")
    parser.add_argument(
        "--impls", type=_comma_list(list(REGISTRY)), default=None,
        help="comma list (default: reference,torch and triton on CUDA, native on CPU)",
    )  # fmt: skip
    parser.add_argument("--dtypes", type=_comma_list(list(DTYPES)), default=None,
                        help="comma list of fp32,bf16,fp16,fp64 (default fp32 CPU, bf16 GPU)")  # fmt: skip
    parser.add_argument("--budget", type=_positive_seconds, default=None,
                        help="timing budget (s) of each cell and mode, in all (default 0.3)")  # fmt: skip
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="loss suite: passes over the grid, each with fresh inputs and budget/rounds; samples are pooled "
        "(default 5)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads, fixed for the run (default: physical cores available)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=None,
        help="set MALLOC_MMAP_THRESHOLD_ (bytes) in the CPU memory child (default: glibc's default)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for each suite's CSV and PNG: "
                        + ", ".join(f"{name}.csv ({suite})" for suite, name in OUTPUT_NAMES.items()))  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--triton-configs", type=Path, default=None, help="JSON {m_pad: KernelConfig fields} from tune_triton"
    )
    parser.add_argument(
        "--reference-max-n", type=int, default=None, help="skip reference above this N (default: 256 on GPU)"
    )
    parser.add_argument(
        "--suite",
        default=None,
        help=f"comma list of {', '.join(SUITES)} or all (= {', '.join(DEFAULT_SUITES)}; train-step, minutes on CPU, "
        "only when named); default: loss with --grid, else all",
    )
    parser.add_argument("--hf-shape", type=_hf_shape, default=None, help="NxMxT of the variant-pass comparison")
    parser.add_argument(
        "--fused-linear-shape",
        type=_fused_linear_shape,
        default=fused_linear.SHAPE,
        help="NxMxD_HxD of the fused linear comparison (default 1024x10x4096x1024)",
    )
    parser.add_argument("--fused-linear-impl", default=None, help="loss impl of both variants (default: auto)")
    return parser


def check_device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """``--device`` as a torch device that exists here (a parser error otherwise)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device: expected cpu or cuda[:i], got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name}: no CUDA device here (torch.cuda.is_available() is False); use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        parser.error(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device: expected cpu or cuda[:i], got {name!r}")
    return device


def main(argv: list[str] | None = None, prog: str = "mlc-bench") -> None:
    """Parse ``argv`` (``prog`` names the command in the usage and error lines) and run the chosen suites."""
    parser = make_parser(prog)
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else {}).items():
        if getattr(args, name) in (None, False):
            setattr(args, name, value)
    args.budget = 0.3 if args.budget is None else args.budget
    args.rounds = 5 if args.rounds is None else args.rounds
    try:
        suites = parse_suites(args.suite, args.grid is not None)
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))
    device = check_device(parser, args.device)
    for name in ("rounds", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    opts = Options(
        device, args.budget, not args.no_memory, threads, args.malloc_mmap_threshold, not args.quiet, args.rounds
    )
    print(
        f"mlc-bench: suites {', '.join(suites)}; {device_name(device)}; {threads} intra-op threads; "
        f"torch {torch.__version__}; memory: {allocator_name(opts) if opts.memory else 'off'}"
    )
    torch.manual_seed(0)
    # triton is a Linux-only dependency: imported once the arguments are read (--help runs without it)
    from mlc_kernels.ops.triton import KernelConfig, kernel_config_override

    overrides = {}
    if args.triton_configs is not None and args.triton_configs.exists():
        overrides = {int(k): KernelConfig(**v) for k, v in json.loads(args.triton_configs.read_text()).items()}
        print(f"Triton configurations from {args.triton_configs}: {overrides}")
    for name in suites:
        with kernel_config_override(overrides) if name in TUNED else contextlib.nullcontext():
            SUITES[name].run(args, opts)


if __name__ == "__main__":
    main()
