"""Constants and small helpers shared by every implementation of the MLC loss."""

from __future__ import annotations

import math

import torch

OBJECTIVES: tuple[str, ...] = ("sv_softmax", "rank1", "pairwise")
"""Objective names; their index is the code the fused kernels take."""

NORM_EPS = 1e-12
"""Rows are normalised as ``r / max(|r|, NORM_EPS)`` (the convention of ``F.normalize``)."""

MASKED_EIGENVALUE_THRESHOLD = -0.5
"""Masked rows get eigenvalue exactly -1; eigenvalues below this are not singular values."""


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the Gram matrix and the eigenproblem are computed in: fp32, or fp64 for fp64 input."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def singular_value_cutoff(d: int, m: int, acc_dtype: torch.dtype) -> float:
    """The cut-off ``eps_s`` below which ``g_j / s_j`` is set to 0 in the gradient.

    The Gram matrix accumulated in ``acc_dtype`` knows its eigenvalues only to about
    ``eps * max(sqrt(d), m)`` (accumulation over d terms, and the m x m eigensolver's
    ``eps * |G|`` with ``|G| <= m``), so singular values below ``sqrt`` of that are noise.
    We cut at twice that floor: fp32, d=4096, m=10 gives about 5.5e-3; fp64 about 2.4e-7.
    The forward loss itself uses every singular value uncut: its error from the noise is
    at most ``(1 - p_1) / tau`` times the floor (measured: <= 1.4e-4 in fp32 up to d=4096).
    """
    eps = torch.finfo(acc_dtype).eps
    return 2.0 * math.sqrt(eps * max(math.sqrt(max(d, 1)), float(m)))
