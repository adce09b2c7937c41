"""Argument checks of the loss entry points (``mlc_loss``, ``fused_linear_mlc_loss``): typed errors naming the
argument, the reductions, and the mean's denominator."""

from __future__ import annotations

import math

import torch

from .ops import FLOAT_DTYPES
from .ops.common import OBJECTIVES

REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")


def check_mask(mask: torch.Tensor | None, n: int, m: int, device: torch.device) -> None:
    """Raise unless ``mask`` is None or an ``(n, m)`` bool tensor on ``device``."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor of shape (N, m), got {got}")
    if tuple(mask.shape) != (n, m):
        raise ValueError(f"mask must have shape (N, m) = {(n, m)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask must be on the device of reps ({device}), got {mask.device}")


MIN_TAU = 1e-4
"""The smallest temperature accepted. The logits are ``s / tau`` with singular values ``s`` in ``[0, sqrt(m)]``
(``[0, 1]`` relative): the softmax rounds to one-hot in fp32, so loss and gradient are exactly 0, once the top
two singular values differ by more than ``17 tau`` (at 1e-4: 0.0017, already near-identical variants; random
variants give loss 0 from tau 1e-3 on), and ``s / tau`` leaves fp16's range (65504) below ``sqrt(m) / 65504``
(8.6e-5 at m = 32). ``tau=1e-30`` trained nothing without a word."""


def check_tau(tau: float, name: str = "tau") -> None:
    """Raise ``ValueError`` naming ``name`` unless ``tau`` is a finite number >= :data:`MIN_TAU`."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"{name} must be a finite float > 0, got {tau!r}")
    if tau < MIN_TAU:
        raise ValueError(f"{name} must be >= {MIN_TAU:g}, got {tau!r}: below it the softmax over s/tau is one-hot "
                         "and the loss and its gradient are 0 (typical values: 0.2 to 1)")  # fmt: skip


def check_options(tau: float, objective: str, reduction: str) -> None:
    """Raise unless ``tau`` is a finite number >= :data:`MIN_TAU` and ``objective`` and ``reduction`` are known."""
    check_tau(tau)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_inputs(reps: torch.Tensor, mask: torch.Tensor | None, tau: float, objective: str, reduction: str) -> None:
    """Raise a clear error naming the argument when the inputs of ``mlc_loss`` are malformed."""
    if not isinstance(reps, torch.Tensor):
        raise TypeError(f"reps must be a torch.Tensor of shape (N, m, d), got {type(reps).__name__}")
    if reps.dim() != 3:
        raise ValueError(f"reps must have shape (N, m, d) (3 dims), got {reps.dim()} dims: {tuple(reps.shape)}")
    if reps.dtype not in FLOAT_DTYPES:
        raise TypeError(f"reps must be float16, bfloat16, float32 or float64, got {reps.dtype}")
    if reps.shape[1] < 1 or reps.shape[2] < 1:
        raise ValueError(f"reps must have m >= 1 variants and d >= 1 dims, got shape {tuple(reps.shape)}")
    check_mask(mask, reps.shape[0], reps.shape[1], reps.device)
    check_options(tau, objective, reduction)


def check_finite(reps: torch.Tensor, present: torch.Tensor) -> None:
    """``validate=True``: raise ``ValueError`` naming the first prompt (and variant) with a non-finite present value
    of ``reps`` ``(N, m, d)``; one host sync."""
    bad = (~torch.isfinite(reps) & present[..., None]).any(dim=2)
    if bool(bad.any()):
        prompt, variant = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"reps has non-finite values in prompt {prompt} (variant {variant}); validate=True stops here")


def eligible_count(present: torch.Tensor) -> torch.Tensor:
    """Number of prompts with >= 2 present variants, at least 1 (the mean's denominator), on device."""
    return (present.sum(dim=1) >= 2).sum().clamp_min(1)
