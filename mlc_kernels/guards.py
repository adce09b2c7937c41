"""Opt-in guards against the collapse of the MLC loss, and the sign-aligned consensus directions.

MLC's loss has trivial minima: W -> 0, every prompt on one line, or sign flips (singular values ignore
signs). A guard is a string of components joined by ``"+"`` (``"center+uniform+anchor"``), read from
the one registry :data:`GUARDS`:

- ``center``: subtract the mean of the batch's N*m *present* rows before normalising; a bias and any
  component shared by all rows cancel exactly. Under DDP the mean is the local (per-process) batch's.
- ``whiten``: centre, then whiten the present rows, ``r~ = (r - mu) L^-T`` with ``L L^T = Sigma_s``
  (Cholesky), ``Sigma_s = (1 - a) Sigma + a (tr Sigma / d) I``. Any whitening ``W`` with
  ``W Sigma_s W^T = I`` differs from ZCA's by a rotation, which the cosines of the loss do not see; the
  Cholesky factor has a stable gradient where ZCA's ``eigh`` divides by eigenvalue gaps (the shrunk
  covariance has d - n + 1 equal eigenvalues when n <= d). Default ``a = d / (n + d)`` with n the
  number of present rows: about 0 when n >> d, about 1 (centring with a global scale) when n << d, where
  the sample covariance is singular and its small eigenvalues are noise (Ledoit-Wolf style shrinkage to
  the scaled identity). Computed in fp32 (fp64 for fp64 input). Per-process under DDP, like ``center``.
- ``uniform`` (with ``center`` or ``whiten`` only): Wang & Isola's uniformity of the prompts'
  sign-aligned consensus directions ``c_i = normalize(sum_j sign(z_ij . z_ib) z_ij)`` (b: the base row,
  the first present variant): ``L_unif = log mean_{i<k} exp(-t |c_i - c_k|^2)``, added as
  ``uniform_weight * L_unif``. 0 when every prompt shares one direction, about ``-2t`` when they are
  spread. Defaults ``t = 2`` and weight 1 (Wang & Isola's t and their equal weighting of alignment and
  uniformity).
- ``anchor``: stop-gradient on each prompt's base row (the kernels' ``anchor`` flag); the base language
  stays where the model puts it and the other languages move to it. Pair it with ``MLCHead(bias=False)``
  and optionally ``orthogonal=True`` so the extractor cannot shrink or bias its way to a trivial minimum.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .ops.common import NORM_EPS

GUARDS: dict[str, str] = {
    "center": "subtract the mean of the batch's present rows (bias and shared components cancel)",
    "whiten": "centre and whiten the present rows with a shrunk covariance (implies center)",
    "uniform": "add uniform_weight * Wang-Isola uniformity of the sign-aligned consensus directions "
    "(needs center or whiten)",
    "anchor": "stop-gradient on each prompt's base row (its first present variant)",
}
"""The guard components; a guard string joins some of them with ``"+"``."""

DEFAULT_UNIFORM_WEIGHT = 1.0
DEFAULT_UNIFORM_T = 2.0


@dataclass(frozen=True)
class Guard:
    """A parsed guard string (see :func:`parse_guard`)."""

    center: bool = False
    whiten: bool = False
    uniform: bool = False
    anchor: bool = False

    @property
    def transforms(self) -> bool:
        """Whether the representations are changed before the loss (centring or whitening)."""
        return self.center or self.whiten

    def __str__(self) -> str:
        return "+".join(name for name in GUARDS if getattr(self, name))


def _valid(parts: set[str]) -> str | None:
    """Why the set of components is invalid, or None."""
    if "center" in parts and "whiten" in parts:
        return "'whiten' already centres: use one of 'center' and 'whiten'"
    if "uniform" in parts and not parts & {"center", "whiten"}:
        return "'uniform' needs 'center' or 'whiten' (uniformity of uncentred directions is dominated by the bias)"
    return None


def valid_guards() -> tuple[str, ...]:
    """Every valid guard string, components in the registry's order."""
    names = list(GUARDS)
    out = []
    for k in range(1, len(names) + 1):
        for combo in itertools.combinations(names, k):
            if _valid(set(combo)) is None:
                out.append("+".join(combo))
    return tuple(out)


def parse_guard(guard: str | None) -> Guard | None:
    """``None`` for ``guard=None``; else the :class:`Guard`. Raises ``ValueError`` listing the valid components."""
    if guard is None:
        return None
    listing = f"valid components: {tuple(GUARDS)}, joined by '+' (e.g. 'center+uniform+anchor')"
    if not isinstance(guard, str) or not guard:
        raise ValueError(f"guard must be None or a non-empty string; {listing}; got {guard!r}")
    parts = [p.strip() for p in guard.split("+")]
    unknown = [p for p in parts if p not in GUARDS]
    if unknown:
        raise ValueError(f"guard {guard!r}: unknown component(s) {unknown}; {listing}")
    if len(set(parts)) != len(parts):
        raise ValueError(f"guard {guard!r}: a component is repeated; {listing}")
    why = _valid(set(parts))
    if why is not None:
        raise ValueError(f"guard {guard!r}: {why}; {listing}")
    return Guard(**{p: True for p in parts})


def check_guard_options(guard: Guard | None, reduction: str, uniform_weight: float, uniform_t: float,
                        whiten_shrinkage: float | None) -> None:  # fmt: skip
    """Raise for guard options that cannot be honoured."""
    for name, value in (("uniform_weight", uniform_weight), ("uniform_t", uniform_t)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if whiten_shrinkage is not None and (
        isinstance(whiten_shrinkage, bool)
        or not isinstance(whiten_shrinkage, (int, float))
        or not 0.0 <= whiten_shrinkage <= 1.0
    ):
        raise ValueError(f"whiten_shrinkage must be None (automatic) or a number in [0, 1], got {whiten_shrinkage!r}")
    if guard is not None and guard.uniform and reduction == "none":
        raise ValueError(
            "guard with 'uniform' cannot use reduction='none': the uniformity term is one number for the batch, "
            "not a per-prompt loss; use reduction='mean' or 'sum'"
        )


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def center(reps: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """``reps`` minus the mean of its present rows, in fp32 (fp64 for fp64 input); masked rows become 0."""
    x = torch.where(present[..., None], reps.to(_acc(reps.dtype)), 0.0)
    count = present.sum().clamp_min(1).to(x.dtype)
    mu = x.sum(dim=(0, 1)) / count
    return torch.where(present[..., None], x - mu, 0.0)


def default_shrinkage(n_rows: int, d: int) -> float:
    """``a = d / (n + d)``: the weight of the scaled identity in the shrunk covariance."""
    return d / (n_rows + d)


def whiten(reps: torch.Tensor, present: torch.Tensor, shrinkage: float | None = None) -> torch.Tensor:
    """Centred and whitened present rows ``(r - mu) L^-T`` with ``L L^T = (1 - a) Sigma + a (tr Sigma / d) I``.

    ``shrinkage`` a in [0, 1] (None: :func:`default_shrinkage`); fp32 (fp64 for fp64 input); differentiable.
    With ``a = 0`` the whitened present rows have identity covariance (``Sigma`` must then be positive
    definite: at least d + 1 present rows in general position).

    One device sync: the factorisation's status, read to refuse a covariance that is not positive definite
    (the row count, the shrinkage and the finiteness check stay on the device).
    """
    x = center(reps, present)
    d = x.shape[-1]
    n_rows = present.sum()
    if shrinkage is None:  # d / (n + d) as the host computes it (fp64), then in the working dtype
        a64 = d / (n_rows.to(torch.float64) + d)
        a, keep = a64.to(x.dtype), (1.0 - a64).to(x.dtype)
    else:
        a, keep = float(shrinkage), 1.0 - float(shrinkage)
    flat = x.reshape(-1, d)
    sigma = flat.mT @ flat / n_rows.clamp_min(1).to(x.dtype)
    scale = sigma.diagonal().sum() / d
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    shrunk = keep * sigma + a * scale.clamp_min(NORM_EPS) * eye
    finite = torch.isfinite(shrunk).all()  # a non-finite present value: NaN for the whole batch
    chol, info = torch.linalg.cholesky_ex(torch.where(finite, shrunk, eye))
    if int(info) != 0:  # the one sync
        raise ValueError(
            f"whiten: the covariance of the {int(n_rows)} present rows (d={d}) is not positive definite with "
            f"shrinkage {float(a)}; use shrinkage > 0 (default None picks d / (n + d))"
        )
    # r~^T = L^-1 (r - mu)^T
    out = torch.linalg.solve_triangular(chol, flat.mT, upper=False).mT.reshape(x.shape)
    out = out + torch.where(finite, 0.0, float("nan"))  # an addend, not a branch: the gradient stays exact
    return torch.where(present[..., None], out, 0.0)


def guard_representations(
    reps: torch.Tensor, present: torch.Tensor, guard: Guard | None, whiten_shrinkage: float | None = None
) -> torch.Tensor:
    """The representations the loss sees under ``guard``: centred, whitened, or ``reps`` itself."""
    if guard is None or not guard.transforms:
        return reps
    if guard.whiten:
        return whiten(reps, present, whiten_shrinkage)
    return center(reps, present)


def signed_consensus(reps: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sign-aligned consensus directions, differentiable.

    Returns ``(c (N, d), z (N, m, d), sign (N, m))``: z the unit rows (0 where masked), ``sign_ij`` =
    sign of ``z_ij . z_ib`` (+1 for 0 and for the base row b itself, 0 where masked) and
    ``c_i = normalize(sum_j sign_ij z_ij)``.
    """
    x = torch.where(present[..., None], reps.to(_acc(reps.dtype)), 0.0)
    z = F.normalize(x, dim=-1, eps=NORM_EPS)
    base = torch.argmax(present.to(torch.uint8), dim=1)
    zb = z[torch.arange(z.shape[0], device=z.device), base]
    dots = torch.einsum("nmd,nd->nm", z, zb).detach()
    sign = torch.where(dots < 0, -1.0, 1.0).to(z.dtype) * present.to(z.dtype)
    c = F.normalize(torch.einsum("nm,nmd->nd", sign, z), dim=-1, eps=NORM_EPS)
    return c, z, sign


def uniformity(reps: torch.Tensor, present: torch.Tensor, t: float = DEFAULT_UNIFORM_T) -> torch.Tensor:
    """``log mean_{i<k} exp(-t |c_i - c_k|^2)`` over the prompts with a present variant; 0 (in the graph)
    when fewer than two prompts have one. Masked, not indexed: the pairs of prompts without a present variant
    enter the log-sum-exp as -inf, so nothing is read back from the device."""
    c, _, _ = signed_consensus(reps, present)
    has = present.any(dim=1)
    n = c.shape[0]
    iu = torch.triu_indices(n, n, offset=1, device=c.device)
    sq = (2.0 - 2.0 * (c @ c.mT))[iu[0], iu[1]].clamp_min(0.0)  # |c_i - c_k|^2 of unit vectors
    pair = has[iu[0]] & has[iu[1]]
    k = has.sum().to(sq.dtype)
    pairs = k * (k - 1) / 2
    lse = torch.logsumexp(torch.where(pair, -t * sq, float("-inf")), dim=0)
    return torch.where(pairs > 0, lse - torch.log(pairs), 0.0 * c.sum())
