"""Constants and small helpers shared by every implementation of the MLC loss."""

from __future__ import annotations

import contextlib
import math
import os

import torch

OBJECTIVES: tuple[str, ...] = (
    "sv_softmax",
    "rank1",
    "pairwise",
    "signed_pairwise",
    "anchor_cos",
    "signed_sv_softmax",
    "relative_sv_softmax",
)
"""Objective names; their index is the code the fused kernels take.

Per prompt, with P the present variants, c = |P|, b = the base row (the first present variant),
G the cosine matrix and ``dloss/dZ = M Z``:

- ``sv_softmax`` (the paper text's formula): ``-log softmax(s / tau)_1`` over the min(c, d) singular values s;
  ``M = V diag(g_j / s_j) V^T`` with ``g = (softmax(s / tau) - e_1) / tau``.
- ``rank1``: ``1 - s_1^2 / c``; ``M = -(2 / c) v_1 v_1^T``.
- ``pairwise``: mean over pairs i < j of ``1 - G_ij^2``; ``M_ij = -2 G_ij / n_pairs`` (i != j).
- ``signed_pairwise``: mean over pairs i < j of ``1 - G_ij``; ``M_ij = -1 / n_pairs`` (i != j).
- ``anchor_cos``: mean over the present j != b of ``1 - cos(z_j, stopgrad(z_b))``;
  ``M_jb = -1 / (c - 1)`` for j != b, every other entry 0 (the base row gets no gradient).
- ``signed_sv_softmax``: the paper's softmax with the signed consensus ``rho = |sum_j z_j| / sqrt(c)
  = sqrt(1^T G 1 / c)`` in place of s_1 (rho = s_1 when all rows agree in sign, rho < s_1 when
  some row is flipped): logits ``(rho, s_2, ..., s_k) / tau``, loss ``logsumexp - rho / tau``;
  ``M = (g_rho / (c rho)) 1 1^T + sum_{j >= 2} (g_j / s_j) v_j v_j^T`` (each term cut off below
  ``eps_s`` like ``g_j / s_j``).
- ``relative_sv_softmax`` (the authors' released code, ``_compute_aux_loss``): ``sv_softmax`` with logits
  ``s / stopgrad(s_1 + 1e-12) / tau``, scale-free (s_1's logit is always ``1 / tau``): with ``sigma = s_1 + 1e-12``
  held constant, ``g = (softmax(s / (sigma tau)) - e_1) / (sigma tau)`` and ``M`` as for ``sv_softmax``.
"""

MAX_VARIANTS = 32
"""The largest m the Triton kernels support (tiles are 16x16 for m <= 16, else 32x32)."""

SIGNED_OBJECTIVES: tuple[str, ...] = ("signed_pairwise", "anchor_cos", "signed_sv_softmax")
"""Objectives for which z and -z are not aligned."""

NORM_EPS = 1e-12
"""Rows are normalised as ``r / max(|r|, NORM_EPS)`` (the convention of ``F.normalize``)."""

RELATIVE_SV_EPS = 1e-12
"""``relative_sv_softmax`` divides the singular values by ``stopgrad(s_1 + RELATIVE_SV_EPS)`` (the authors' code)."""

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


DEFLATION_RATIO = 1e-2
"""Near collinearity (``lambda_2 < DEFLATION_RATIO * lambda_1``) the small eigenvalues of G = Z Z^T fall
below the Gram matrix's resolution (eps * m next to lambda_1 ~ m). There the eigen phase deflates: the
residual rows ``E = (I - v_1 v_1^T) Z``, formed from the rows themselves (accurate to eps * |z|), give the
small singular values and vectors through their own Gram ``E E^T``, which has no lambda_1 to drown them.
Below the ratio the top eigenvector is well separated (error about eps), so the deflation is exact to
rounding; above it the plain Gram route is accurate to about 100 eps and deflation is not used."""


def deflated_cutoff(m: int, acc_dtype: torch.dtype) -> float:
    """The ``eps_s`` of deflated prompts: the residual rows are accurate to about ``eps`` each, so residual
    singular values below ``4 eps sqrt(m)`` are rounding noise (fp32, m = 10: 1.5e-6)."""
    return 4.0 * torch.finfo(acc_dtype).eps * math.sqrt(max(m, 1))


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast(device.type, enabled=False)``; a no-op for ``meta`` (not an autocast device)."""
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def use_registered_op(reps: torch.Tensor) -> bool:
    """True when a backend must call its registered ``torch.library`` op rather than launch its kernel directly:
    under ``torch.compile`` (the op is what a graph can hold) and for ``meta`` tensors (its fake/meta kernel gives
    the shapes). Eager calls on a real device skip the op's dispatch (host time that small batches wait for)."""
    return reps.device.type == "meta" or torch.compiler.is_compiling()


_ALL_PRESENT: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def all_present(reps: torch.Tensor) -> torch.Tensor:
    """``(N, m)`` bool ones for ``reps`` ``(N, m, d)``: the mask of a call without one. Cached per (N, m, device) in
    eager calls (read-only: no implementation writes its mask), built fresh under ``torch.compile``."""
    n, m = reps.shape[0], reps.shape[1]
    if torch.compiler.is_compiling():
        return torch.ones((n, m), dtype=torch.bool, device=reps.device)
    key = (n, m, reps.device)
    mask = _ALL_PRESENT.get(key)
    if mask is None:
        if len(_ALL_PRESENT) >= 256:
            _ALL_PRESENT.clear()
        mask = _ALL_PRESENT[key] = torch.ones((n, m), dtype=torch.bool, device=reps.device)
    return mask
