"""The paper's formula, literally: normalize -> torch.linalg.svdvals -> log_softmax
(``relative_sv_softmax``: the singular values divided by ``s[:, :1].detach()`` first, as the authors' code).

This is the oracle of the tests (run in float64) and the baseline of the benchmarks. It is
deliberately not optimised: plain autograd through ``svdvals``, one batched call per distinct
mask pattern so that missing variants are simply left out of the matrix.

Under ``torch.compile`` and for ``meta`` tensors (no values to group by) the same formula runs on
the whole ``(N, m, d)`` batch with masks instead (:func:`_dense_reference_mlc_loss`): missing rows
are zero, which adds only zero singular values past the ``min(c, d)`` real ones, and those are
left out of the softmax. The tests hold both forms to the same values and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import NORM_EPS, RELATIVE_SV_EPS, autocast_off


def _objective_per_prompt(z: torch.Tensor, tau: float, objective: str) -> torch.Tensor:
    """Loss of each prompt of ``z``: ``(B, k, d)`` unit rows, all present, the base row first; returns ``(B,)``."""
    k = z.shape[1]
    if objective in ("pairwise", "signed_pairwise"):
        cos = z @ z.mT
        iu = torch.triu_indices(k, k, offset=1, device=z.device)
        pairs = cos[:, iu[0], iu[1]]
        return (1.0 - (pairs if objective == "signed_pairwise" else pairs**2)).mean(dim=-1)
    if objective == "anchor_cos":  # 1 - cos(z_j, stopgrad(z_b)) averaged over j != b (b = row 0 here)
        return (1.0 - (z[:, 1:] * z[:, :1].detach()).sum(dim=-1)).mean(dim=-1)
    # svdvals refuses non-finite input; such prompts get NaN from the caller's 0 * sum(rows).
    finite = torch.where(torch.isfinite(z), z, 0.0)
    s = torch.linalg.svdvals(finite)  # (B, min(k, d)), descending
    if objective == "rank1":
        return 1.0 - s[:, 0] ** 2 / k
    if objective == "signed_sv_softmax":  # s_1 replaced by the signed consensus |sum_j z_j| / sqrt(k)
        rho = finite.sum(dim=1).norm(dim=-1) / k**0.5
        s = torch.cat([rho[:, None], s[:, 1:]], dim=1)
    if objective == "relative_sv_softmax":  # the authors' code: s / stopgrad(s_1 + eps)
        s = s / (s[:, :1].detach() + RELATIVE_SV_EPS)
    return -torch.log_softmax(s / tau, dim=-1)[:, 0]


def reference_mlc_loss(
    reps: torch.Tensor, present: torch.Tensor, tau: float, objective: str, anchor: bool = False
) -> torch.Tensor:
    """Per-prompt MLC loss ``(N,)`` of ``reps`` ``(N, m, d)`` with ``present`` ``(N, m)`` bool.

    Prompts with fewer than 2 present variants get 0. Computed in the input dtype
    (fp16/bf16 are promoted to fp32, which ``svdvals`` needs); differentiable by autograd.
    ``anchor``: stop-gradient on each prompt's base row (its first present variant): ``z_b.detach()``.
    """
    with autocast_off(reps.device):
        if reps.device.type == "meta" or torch.compiler.is_compiling():
            return _dense_reference_mlc_loss(reps, present, tau, objective, anchor)
        return _reference_mlc_loss(reps, present, tau, objective, anchor)


def reference_loss_and_grad(
    reps: torch.Tensor, present: torch.Tensor, tau: float, objective: str, anchor: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss (N,), grad (N, m, d))``: :func:`reference_mlc_loss` and its unscaled gradient by autograd on a
    detached leaf; no graph is returned."""
    with torch.enable_grad():
        leaf = reps.detach().requires_grad_()
        loss = reference_mlc_loss(leaf, present, tau, objective, anchor)
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
    return loss.detach(), grad


def _dense_reference_mlc_loss(
    reps: torch.Tensor, present: torch.Tensor, tau: float, objective: str, anchor: bool = False
) -> torch.Tensor:
    """:func:`reference_mlc_loss` without data-dependent shapes or branches (masks in place of groups)."""
    work = reps if reps.dtype in (torch.float32, torch.float64) else reps.float()
    n, m, d = reps.shape
    z = F.normalize(torch.where(present[..., None], work, 0.0), dim=-1, eps=NORM_EPS)
    count = present.sum(dim=1)
    k = count.to(work.dtype).clamp_min(1.0)
    is_base = F.one_hot(torch.argmax(present.to(torch.uint8), dim=1), m).bool() & present  # first present row
    if anchor:
        z = torch.where(is_base[..., None], z.detach(), z)
    if objective in ("pairwise", "signed_pairwise"):
        cos = z @ z.mT
        upper = torch.ones(m, m, dtype=torch.bool, device=reps.device).triu(diagonal=1)
        pair = present[:, :, None] & present[:, None, :] & upper
        terms = torch.where(pair, 1.0 - (cos if objective == "signed_pairwise" else cos**2), 0.0)
        loss = terms.sum(dim=(1, 2)) / (k * (k - 1) / 2).clamp_min(1.0)
    elif objective == "anchor_cos":
        base = (z * is_base[..., None]).sum(dim=1).detach()
        terms = torch.where(present & ~is_base, 1.0 - (z * base[:, None]).sum(dim=-1), 0.0)
        loss = terms.sum(dim=1) / (k - 1).clamp_min(1.0)
    else:
        finite = torch.where(torch.isfinite(z), z, 0.0)
        s = torch.linalg.svdvals(finite)  # (N, min(m, d)); past min(c, d) only the zeros of missing rows
        if objective == "rank1":
            loss = 1.0 - s[:, 0] ** 2 / k
        else:
            if objective == "signed_sv_softmax":
                rho = finite.sum(dim=1).norm(dim=-1) / k.sqrt()
                s = torch.cat([rho[:, None], s[:, 1:]], dim=1)
            if objective == "relative_sv_softmax":
                s = s / (s[:, :1].detach() + RELATIVE_SV_EPS)
            rank = torch.minimum(count, torch.full_like(count, d)).clamp_min(1)
            valid = torch.arange(s.shape[1], device=reps.device) < rank[:, None]
            logits = torch.where(valid, s / tau, float("-inf"))
            loss = -torch.log_softmax(logits, dim=-1)[:, 0]
    loss = torch.where(count >= 2, loss, 0.0)
    return loss + 0.0 * torch.where(present[..., None], work, 0.0).sum(dim=(1, 2))


def _reference_mlc_loss(
    reps: torch.Tensor, present: torch.Tensor, tau: float, objective: str, anchor: bool = False
) -> torch.Tensor:
    work = reps if reps.dtype in (torch.float32, torch.float64) else reps.float()
    loss_dtype = work.dtype
    z = F.normalize(torch.where(present[..., None], work, 0.0), dim=-1, eps=NORM_EPS)  # missing rows: never read
    n, m, _ = reps.shape
    counts = present.sum(dim=1)
    losses = torch.zeros(n, dtype=loss_dtype, device=reps.device)
    if n == 0:
        return losses + 0.0 * work.sum()
    eligible = counts >= 2
    if bool(present[eligible].all()):
        groups = [(torch.ones(m, dtype=torch.bool, device=reps.device), eligible.nonzero().flatten())]
    else:
        patterns, inverse = torch.unique(present, dim=0, return_inverse=True)
        groups = [(p, (inverse == i).nonzero().flatten()) for i, p in enumerate(patterns) if int(p.sum()) >= 2]
    for pattern, idx in groups:
        if idx.numel() == 0:
            continue
        sub = z[idx][:, pattern]  # the pattern's first present variant (the base row b) is column 0
        if anchor:
            sub = torch.cat([sub[:, :1].detach(), sub[:, 1:]], dim=1)
        losses = losses.index_put((idx,), _objective_per_prompt(sub, tau, objective))
    # 0 * (sum of present entries): keeps every prompt in the graph, and turns its loss into
    # NaN when a present row is non-finite (masked rows are never read).
    return losses + 0.0 * torch.where(present[..., None], work, 0.0).sum(dim=(1, 2))
