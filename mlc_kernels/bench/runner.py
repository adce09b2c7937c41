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
from pathlib import Path

import torch

from . import fused_linear, hf_capture, loss, train_step
from .utils import Options, allocator_name, default_threads, device_name

SUITES = {"loss": loss, "fused-linear": fused_linear, "hf-capture": hf_capture, "train-step": train_step}
DEFAULT_SUITES = ("loss", "fused-linear", "hf-capture")  # train-step (minutes on CPU) runs only when named
TUNED = ("loss", "fused-linear")  # the suites that launch the Triton kernels with --triton-configs


def parse_grid(text: str) -> list[tuple[int, int, int]]:
    """``"64x10x1024,256x10x4096"`` -> ``[(64, 10, 1024), (256, 10, 4096)]``."""
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]  # type: ignore[misc]


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


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split("x"))


def make_parser(prog: str = "mlc-bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Benchmark the MLC loss implementations.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--grid", type=parse_grid, help="NxMxD,... of the loss suite (implies --suite loss)")
    parser.add_argument(
        "--impls", default=None, help="comma list (default: reference,torch and triton on CUDA, native on CPU)"
    )
    parser.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16,fp64 (default fp32 CPU, bf16 GPU)")
    parser.add_argument("--budget", type=float, default=0.3, help="timing budget (s) of each cell and mode, in all")
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="loss suite: passes over the grid, each with fresh inputs and budget/rounds; samples are pooled",
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
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for CSV and PNG")
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
    parser.add_argument("--hf-shape", type=_shape, default=None, help="NxMxT of the variant-pass comparison")
    parser.add_argument(
        "--fused-linear-shape",
        type=_shape,
        default=fused_linear.SHAPE,
        help="NxMxD_HxD of the fused linear comparison (default 1024x10x4096x1024)",
    )
    parser.add_argument("--fused-linear-impl", default=None, help="loss impl of both variants (default: auto)")
    return parser


def main(argv: list[str] | None = None, prog: str = "mlc-bench") -> None:
    """Parse ``argv`` (``prog`` names the command in the usage and error lines) and run the chosen suites."""
    parser = make_parser(prog)
    args = parser.parse_args(argv)
    try:
        suites = parse_suites(args.suite, args.grid is not None)
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))
    device = torch.device(args.device)
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
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
