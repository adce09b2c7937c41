"""The public entry point ``mlc_loss`` and its module ``MLCLoss``: dispatch and reduction (the argument checks are
``checks.py``, the implementations ``ops/``)."""

from __future__ import annotations

import torch
from torch import nn

from .checks import check_finite, check_inputs, eligible_count
from .guards import (
    DEFAULT_UNIFORM_T,
    DEFAULT_UNIFORM_WEIGHT,
    check_guard_options,
    guard_representations,
    parse_guard,
    uniformity,
)
from .ops import (
    IMPLEMENTATION_NAMES,
    ImplementationUnavailableError,  # noqa: F401  (re-exported: mlc_kernels.ImplementationUnavailableError)
    call_loss,
    per_prompt_loss,
    reduced_loss,
    resolve_impl,
)
from .ops.common import all_present

IMPLEMENTATIONS: tuple[str, ...] = IMPLEMENTATION_NAMES
"""The names ``impl=`` accepts: ``"auto"`` and those of ``mlc_kernels.ops.REGISTRY``."""


def mlc_loss(
    reps: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    tau: float = 0.2,
    objective: str = "relative_sv_softmax",
    reduction: str = "mean",
    impl: str = "auto",
    validate: bool = False,
    guard: str | None = None,
    uniform_weight: float = DEFAULT_UNIFORM_WEIGHT,
    uniform_t: float = DEFAULT_UNIFORM_T,
    whiten_shrinkage: float | None = None,
) -> torch.Tensor:
    """Multi-Lingual Consistency loss (arXiv 2602.16660) of ``reps``.

    Args:
        reps: ``(N, m, d)`` float16/bfloat16/float32/float64: N prompts, m language variants
            (the representations of the same prompt in m languages), d dims.
        mask: optional ``(N, m)`` bool, True where the variant is present.
        tau: softmax temperature of the softmax objectives (> 0; default 0.2, the authors' value).
        objective: ``"relative_sv_softmax"`` (the default: the authors' released code,
            ``-log softmax(s / stopgrad(s_1) / tau)_1``, scale-free logits), ``"sv_softmax"`` (the paper
            text's ``-log softmax(s / tau)_1``), ``"rank1"`` (``1 - s_1^2 / m_n``), ``"pairwise"`` (mean over
            pairs of ``1 - cos^2``), or the signed ``"signed_pairwise"``, ``"anchor_cos"``,
            ``"signed_sv_softmax"`` (``ops.common.OBJECTIVES``).
        reduction: ``"mean"`` over the prompts with >= 2 present variants (0 when there is
            none), ``"sum"``, or ``"none"`` (shape ``(N,)``, 0 for prompts with < 2 variants).
        impl: ``"auto"`` (triton on CUDA, native on CPU, torch elsewhere, ``meta`` included) or a name
            of ``mlc_kernels.ops.REGISTRY``: ``"reference"``, ``"torch"``, ``"native"``, ``"triton"``.
        validate: raise ``ValueError`` naming the first prompt with a non-finite present value
            (one host sync, so it breaks a ``torch.compile`` graph). Without it such prompts get a NaN
            loss (with ``center``/``whiten`` the whole batch: the mean is shared).
        guard: None (the plain loss) or components of ``mlc_kernels.guards.GUARDS`` joined by ``"+"``:
            ``center``, ``whiten``, ``uniform`` (with center or whiten), ``anchor``. With ``uniform`` the
            result is ``mean + uniform_weight * L_unif`` (``"sum"``: that times the number of eligible
            prompts; ``"none"`` is refused). Centring/whitening run in fp32 (fp64 for fp64 input).
        uniform_weight, uniform_t: weight and temperature t of the uniformity term (defaults 1 and 2).
        whiten_shrinkage: the covariance shrinkage a of ``whiten`` (None: ``d / (n_rows + d)``).

    Returns:
        The loss, float32 (float64 for float64 ``reps``); the gradient w.r.t. ``reps`` has its dtype.
    """
    check_inputs(reps, mask, tau, objective, reduction)
    spec = parse_guard(guard)
    check_guard_options(spec, reduction, uniform_weight, uniform_t, whiten_shrinkage)
    if spec is None:  # the plain loss, exactly as without guards
        if validate:
            check_finite(reps, mask if mask is not None else all_present(reps))
        name = resolve_impl(impl, reps)
        reduced = reduced_loss(name, reps) if reduction != "none" else None
        if reduced is not None:  # the reduction and its backward inside the implementation
            return reduced(reps, mask, float(tau), objective, reduction)
        per_prompt = call_loss(name, reps, mask, float(tau), objective)
        if mask is None and reduction != "none":  # every prompt has the same m variants: the count is N (m >= 2)
            eligible = reduction == "mean" and reps.shape[1] >= 2 and reps.shape[0] > 0
            return per_prompt.mean() if eligible else per_prompt.sum()
        return reduce_with_guard(per_prompt, mask, reduction, None, reps, uniform_weight, uniform_t)
    present = mask if mask is not None else all_present(reps)
    if validate:
        check_finite(reps, present)
    work = guard_representations(reps, present, spec, whiten_shrinkage)
    name = resolve_impl(impl, work)
    per_prompt = per_prompt_loss(name)(work, present, float(tau), objective, spec.anchor)
    return reduce_with_guard(per_prompt, present, reduction, spec, work, uniform_weight, uniform_t)


def reduce_with_guard(per_prompt, present, reduction, spec, reps, uniform_weight, uniform_t) -> torch.Tensor:
    """The reduction of ``per_prompt``, plus the uniformity term of ``spec`` computed on ``reps``."""
    if reduction == "none":
        return per_prompt
    total = per_prompt.sum()
    uniform = spec is not None and spec.uniform
    if reduction == "sum" and not uniform:  # the trainer's reduction: no eligible count (4 more ops) to make
        return total
    count = eligible_count(present).to(total.dtype)
    if uniform:
        unif = uniformity(reps, present, float(uniform_t)).to(total.dtype)
        total = total + float(uniform_weight) * unif * count  # mean + weight * L_unif after the division
    if reduction == "sum":
        return total
    return total / count


class MLCLoss(nn.Module):
    """``nn.Module`` form of :func:`mlc_loss`; ``forward(reps, mask=None)``. Options as keywords, with the same
    defaults (the authors' ``relative_sv_softmax`` at ``tau=0.2``; ``objective="sv_softmax", tau=1.0`` is the
    paper text's formula)."""

    def __init__(
        self,
        *,
        tau: float = 0.2,
        objective: str = "relative_sv_softmax",
        reduction: str = "mean",
        impl: str = "auto",
        validate: bool = False,
        guard: str | None = None,
        uniform_weight: float = DEFAULT_UNIFORM_WEIGHT,
        uniform_t: float = DEFAULT_UNIFORM_T,
        whiten_shrinkage: float | None = None,
    ) -> None:
        super().__init__()
        self.options = {"tau": tau, "objective": objective, "reduction": reduction, "impl": impl, "validate": validate}
        if guard is not None:  # the repr of the unguarded module stays as it was
            parse_guard(guard)
            self.options.update(
                guard=guard, uniform_weight=uniform_weight, uniform_t=uniform_t, whiten_shrinkage=whiten_shrinkage
            )

    def forward(self, reps: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return mlc_loss(reps, mask, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())
