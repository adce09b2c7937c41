"""The paper's formula, literally: normalize -> torch.linalg.svdvals -> log_softmax.

This is the oracle of the tests (run in float64) and the baseline of the benchmarks. It is
deliberately not optimised: plain autograd through ``svdvals``, one batched call per distinct
mask pattern so that missing variants are simply left out of the matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import NORM_EPS


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
    return -torch.log_softmax(s / tau, dim=-1)[:, 0]


def reference_mlc_loss(
    reps: torch.Tensor, present: torch.Tensor, tau: float, objective: str, anchor: bool = False
) -> torch.Tensor:
    """Per-prompt MLC loss ``(N,)`` of ``reps`` ``(N, m, d)`` with ``present`` ``(N, m)`` bool.

    Prompts with fewer than 2 present variants get 0. Computed in the input dtype
    (fp16/bf16 are promoted to fp32, which ``svdvals`` needs); differentiable by autograd.
    ``anchor``: stop-gradient on each prompt's base row (its first present variant): ``z_b.detach()``.
    """
    with torch.autocast(reps.device.type, enabled=False):
        return _reference_mlc_loss(reps, present, tau, objective, anchor)


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
