"""The command-line options the transfer protocols share: alignment seeds, MLC weight, layer and tau overrides,
threads, the checkpoint cache and the command line a report records. Bad values raise ``ValueError`` naming the
option (the command turns it into a :class:`mlc_kernels.errors.UsageError`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..checks import check_tau
from .align import AlignConfig
from .pretrain import DEFAULT_CACHE


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``; raises ``ValueError`` naming ``--seeds``."""
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--seeds must be a comma list of integers, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct, got {text!r}")
    return seeds


def check_weight(mlc_weight: float | None) -> float | None:
    """``--mlc-weight`` as given (None: not given); raises ``ValueError`` naming the option unless it is > 0."""
    if mlc_weight is not None and mlc_weight <= 0:
        raise ValueError(f"--mlc-weight must be > 0, got {mlc_weight}")
    return mlc_weight


def align_overrides(align: AlignConfig, layers: int, mlc_layer: int | None, mlc_tau: float | None) -> AlignConfig:
    """``align`` with the command line's ``--mlc-layer`` (1..layers) and ``--mlc-tau`` (>= ``MIN_TAU``) applied; raises
    ``ValueError`` naming the option."""
    if mlc_layer is not None:
        if not 1 <= mlc_layer <= layers:
            raise ValueError(f"--mlc-layer must be in 1..{layers}, got {mlc_layer}")
        align = replace(align, mlc_layer=mlc_layer)
    if mlc_tau is not None:
        check_tau(mlc_tau, "--mlc-tau")
        align = replace(align, mlc_tau=mlc_tau)
    return align


def run_settings(args, prefix: str, names: tuple[str, ...]) -> tuple[Path | None, str]:
    """The settings every ``mlc transfer`` run shares: ``--threads`` (checked, applied), the checkpoint cache
    folder (None with ``--no-cache``) and the command line as the report records it (``prefix``, the flags,
    then the options ``names`` that were given); raises ``ValueError`` naming ``--threads``."""
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    cache = None if args.no_cache else Path(args.cache_dir).expanduser() if args.cache_dir else DEFAULT_CACHE
    options = [f"--{name.replace('_', '-')} {getattr(args, name)}" for name in names if getattr(args, name) is not None]
    flags = [flag for flag, on in (("--quick", args.quick), ("--no-cache", args.no_cache)) if on]
    return cache, " ".join([prefix, *flags, *options])
