"""The Gram route in PyTorch ops, with the closed-form gradient (docs/design.md, section 2).

Runs on any device and inside ``torch.compile``: batched matmul for G, ``torch.linalg.eigh``
on the m x m matrices, and a ``torch.autograd.Function`` whose backward is one batched
matmul ``dR = B R`` with a small per-prompt matrix ``B`` saved by the forward.
"""

from __future__ import annotations

import torch

from .common import MASKED_EIGENVALUE_THRESHOLD, NORM_EPS, OBJECTIVES, accumulation_dtype, singular_value_cutoff


def gram_loss_and_backward_matrix(
    reps: torch.Tensor, present: torch.Tensor, tau: float, objective: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt loss ``(N,)`` and the matrix ``B`` ``(N, m, m)`` with ``dloss_n/dR_n = B_n R_n``.

    ``reps``: ``(N, m, d)`` any float dtype; ``present``: ``(N, m)`` bool. Both outputs are in
    the accumulation dtype (fp32, or fp64 for fp64 input).
    """
    with torch.autocast(reps.device.type, enabled=False):  # the Gram matrix stays in fp32 under autocast
        return _gram_loss_and_backward_matrix(reps, present, tau, objective)


def _gram_loss_and_backward_matrix(
    reps: torch.Tensor, present: torch.Tensor, tau: float, objective: str
) -> tuple[torch.Tensor, torch.Tensor]:
    acc = accumulation_dtype(reps.dtype)
    n, m, d = reps.shape
    x = reps.to(acc)
    pm = present
    x = torch.where(pm[..., None], x, 0.0)  # masked rows are never read
    raw = x @ x.mT
    sq = raw.diagonal(dim1=-2, dim2=-1)
    norms = sq.sqrt()
    inv = 1.0 / norms.clamp_min(NORM_EPS)
    pair = pm[:, :, None] & pm[:, None, :]
    gram = torch.where(pair, raw * inv[:, :, None] * inv[:, None, :], 0.0)
    eye = torch.eye(m, dtype=torch.bool, device=reps.device)
    count = pm.sum(dim=1)
    finite = torch.where(pm, sq, 0.0).isfinite().all(dim=1)  # |r|^2 is non-finite iff a row is
    eligible = count >= 2

    code = OBJECTIVES.index(objective)
    if code == 2:  # pairwise: mean over pairs of (1 - G_ij^2); no eigenproblem
        off = pair & ~eye
        n_pairs = (count * (count - 1) / 2).clamp_min(1).to(acc)
        loss = torch.where(off, 1.0 - gram**2, 0.0).sum(dim=(1, 2)) / 2 / n_pairs
        mmat = torch.where(off, -2.0 * gram / n_pairs[:, None, None], 0.0)
    else:
        # Masked rows: zero row/column and diagonal -1, so their eigenvalue is exactly -1.
        shifted = torch.where(eye & ~pm[:, :, None], -1.0, gram)
        shifted = torch.where(finite[:, None, None], shifted, eye.to(acc))
        lam, vec = torch.linalg.eigh(shifted)
        lam, vec = lam.flip(-1), vec.flip(-1)  # descending: index 0 is s_1
        k = torch.minimum(count, torch.full_like(count, d))  # Z has min(m_n, d) singular values
        slot = torch.arange(m, device=reps.device)
        kept = (slot[None, :] < k[:, None]) & (lam > MASKED_EIGENVALUE_THRESHOLD)
        sv = lam.clamp_min(0.0).sqrt()
        if code == 0:
            logits = torch.where(kept, sv / tau, float("-inf"))
            lse = torch.logsumexp(logits, dim=-1)
            loss = lse - logits[:, 0]
            p = torch.exp(logits - lse[:, None])
            g = (p - (slot == 0).to(acc)) / tau
            cutoff = singular_value_cutoff(d, m, acc)
            big = kept & (sv >= cutoff)
            w = torch.where(big, g / torch.where(big, sv, 1.0), 0.0)  # 2 dloss/dlambda_j
        else:
            loss = 1.0 - lam[:, 0].clamp_min(0.0) / count.clamp_min(1).to(acc)
            w = torch.where(slot == 0, -2.0 / count.clamp_min(1).to(acc)[:, None], 0.0)
        mmat = (vec * w[:, None, :]) @ vec.mT
    loss = torch.where(eligible, loss, 0.0)
    mmat = torch.where(eligible[:, None, None], mmat, 0.0)
    # Non-finite input: NaN loss and gradient, never a finite loss.
    loss = torch.where(finite, loss, float("nan"))
    mmat = torch.where(finite[:, None, None], mmat, float("nan"))
    # dr_l = (dZ_l - z_l (dZ_l . z_l)) / max(|r_l|, eps) with dZ = M Z, written as dR = B R.
    # A zero row (|r| <= eps) has no direction: it gets zero gradient (F.normalize's r / eps
    # would scale it by 1 / eps).
    nonzero = norms > NORM_EPS
    proj = torch.where(nonzero, (mmat * gram).sum(dim=-1), 0.0)
    core = mmat - torch.diag_embed(proj)
    bmat = torch.where(nonzero, inv, 0.0)[:, :, None] * core * inv[:, None, :]
    bmat = torch.where(pair, bmat, 0.0)
    return loss, bmat


class GramMLCFunction(torch.autograd.Function):
    """Autograd wrapper: forward returns the per-prompt loss; backward is ``dR = (g B) R``."""

    @staticmethod
    def forward(ctx, reps: torch.Tensor, present: torch.Tensor, tau: float, objective: str) -> torch.Tensor:
        loss, bmat = gram_loss_and_backward_matrix(reps, present, tau, objective)
        ctx.save_for_backward(reps, present, bmat)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        reps, present, bmat = ctx.saved_tensors
        scaled = bmat * grad_loss.to(bmat.dtype)[:, None, None]
        rows = torch.where(present[..., None], reps.to(bmat.dtype), 0.0)  # masked rows may hold NaN
        with torch.autocast(reps.device.type, enabled=False):
            grad = scaled @ rows
        return grad.to(reps.dtype), None, None, None


def torch_mlc_loss(reps: torch.Tensor, present: torch.Tensor, tau: float, objective: str) -> torch.Tensor:
    """Per-prompt MLC loss ``(N,)`` through the Gram route (see module docstring)."""
    if reps.requires_grad and torch.is_grad_enabled():
        return GramMLCFunction.apply(reps, present, tau, objective)
    return gram_loss_and_backward_matrix(reps, present, tau, objective)[0]
