"""The Gram route in PyTorch ops, with the closed-form gradient ``dZ = M Z`` (``ops.common.OBJECTIVES``).

Runs on any device and inside ``torch.compile``: batched matmul for G, ``torch.linalg.eigh``
on the m x m matrices, and a ``torch.autograd.Function`` whose backward is one batched
matmul ``dR = B R`` with a small per-prompt matrix ``B`` saved by the forward.
"""

from __future__ import annotations

import torch

from .common import (
    DEFLATION_RATIO,
    MASKED_EIGENVALUE_THRESHOLD,
    NORM_EPS,
    OBJECTIVES,
    RELATIVE_SV_EPS,
    accumulation_dtype,
    autocast_off,
    deflated_cutoff,
    singular_value_cutoff,
)


def base_index(present: torch.Tensor) -> torch.Tensor:
    """``(N,)`` index of each prompt's base row b: its first present variant (0 when none is present)."""
    return torch.argmax(present.to(torch.uint8), dim=1)  # argmax returns the first maximal index


def gram_loss_and_backward_matrix(
    reps: torch.Tensor, present: torch.Tensor, tau: float, objective: str, anchor: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt loss ``(N,)`` and the matrix ``B`` ``(N, m, m)`` with ``dloss_n/dR_n = B_n R_n``.

    ``reps``: ``(N, m, d)`` any float dtype; ``present``: ``(N, m)`` bool. Both outputs are in
    the accumulation dtype (fp32, or fp64 for fp64 input). ``anchor``: row b of B is zeroed (the
    base row gets no gradient; the loss is unchanged).
    """
    with autocast_off(reps.device):  # the Gram matrix stays in fp32 under autocast
        return _gram_loss_and_backward_matrix(reps, present, tau, objective, anchor)


def _gram_loss_and_backward_matrix(
    reps: torch.Tensor, present: torch.Tensor, tau: float, objective: str, anchor: bool = False
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
    slot = torch.arange(m, device=reps.device)
    base = base_index(pm)
    is_base = slot[None, :] == base[:, None]  # (N, m)
    if code in (2, 3):  # pairwise: mean over pairs of (1 - G_ij^2); signed_pairwise: of (1 - G_ij)
        off = pair & ~eye
        n_pairs = (count * (count - 1) / 2).clamp_min(1).to(acc)
        if code == 2:
            loss = torch.where(off, 1.0 - gram**2, 0.0).sum(dim=(1, 2)) / 2 / n_pairs
            mmat = torch.where(off, -2.0 * gram / n_pairs[:, None, None], 0.0)
        else:
            loss = torch.where(off, 1.0 - gram, 0.0).sum(dim=(1, 2)) / 2 / n_pairs
            mmat = torch.where(off, -1.0 / n_pairs[:, None, None], 0.0).to(acc)
    elif code == 4:  # anchor_cos: mean over j != b of 1 - G_jb; M_jb = -1 / (c - 1)
        others = pm & ~is_base
        denom = (count - 1).clamp_min(1).to(acc)
        to_base = (gram * is_base[:, None, :].to(acc)).sum(dim=-1)  # G_jb
        loss = torch.where(others, 1.0 - to_base, 0.0).sum(dim=1) / denom
        mmat = torch.where(others[:, :, None] & is_base[:, None, :], -1.0 / denom[:, None, None], 0.0).to(acc)
    else:
        # Masked rows: zero row/column and diagonal -1, so their eigenvalue is exactly -1.
        shifted = torch.where(eye & ~pm[:, :, None], -1.0, gram)
        shifted = torch.where(finite[:, None, None], shifted, eye.to(acc))
        lam, vec = torch.linalg.eigh(shifted)
        lam, vec = lam.flip(-1), vec.flip(-1)  # descending: index 0 is s_1
        lam, vec, deflated = _deflate(x * inv[:, :, None], finite, lam, vec)
        k = torch.minimum(count, torch.full_like(count, d))  # Z has min(m_n, d) singular values
        kept = (slot[None, :] < k[:, None]) & (lam > MASKED_EIGENVALUE_THRESHOLD)
        sv = lam.clamp_min(0.0).sqrt()
        cutoff = torch.where(deflated, deflated_cutoff(m, acc), singular_value_cutoff(d, m, acc))[:, None]
        extra = None
        if code in (0, 5, 6):
            lead = sv
            if code == 5:  # signed consensus rho = sqrt(1^T G 1 / c) in place of s_1
                total = torch.where(pair & finite[:, None, None], gram, 0.0).sum(dim=(1, 2))
                rho = (total.clamp_min(0.0) / count.clamp_min(1).to(acc)).sqrt()
                lead = torch.where(slot[None, :] == 0, rho[:, None], sv)
            # relative: logits s / (sigma tau) with sigma = s_1 + eps held constant (no gradient through it)
            temp = tau * (sv[:, :1] + RELATIVE_SV_EPS) if code == 6 else tau
            logits = torch.where(kept, lead / temp, float("-inf"))
            lse = torch.logsumexp(logits, dim=-1)
            loss = lse - logits[:, 0]
            p = torch.exp(logits - lse[:, None])
            g = (p - (slot == 0).to(acc)) / temp
            big = kept & (sv >= cutoff)
            if code == 5:
                big = big & (slot[None, :] >= 1)
                use = rho >= cutoff[:, 0]
                coef = torch.where(use, g[:, 0] / (count.clamp_min(1).to(acc) * torch.where(use, rho, 1.0)), 0.0)
                extra = torch.where(pair, coef[:, None, None], 0.0)  # (g_rho / (c rho)) 1 1^T on the present rows
            w = torch.where(big, g / torch.where(big, sv, 1.0), 0.0)  # 2 dloss/dlambda_j
        else:
            loss = 1.0 - lam[:, 0].clamp_min(0.0) / count.clamp_min(1).to(acc)
            w = torch.where(slot == 0, -2.0 / count.clamp_min(1).to(acc)[:, None], 0.0)
        mmat = (vec * w[:, None, :]) @ vec.mT
        if extra is not None:
            mmat = mmat + extra
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
    if anchor:  # stop-gradient on the base row: dR_b = 0, every other row unchanged
        bmat = torch.where(is_base[:, :, None], 0.0, bmat)
    return loss, bmat


def _deflate(
    z: torch.Tensor, finite: torch.Tensor, lam: torch.Tensor, vec: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The spectrum of G with its small part recomputed from the residual rows where the top eigenvalue
    dominates (see ``DEFLATION_RATIO``). ``z``: ``(N, m, d)`` unit rows (zero where masked); ``lam``, ``vec``:
    descending eigenpairs of the shifted G. Returns ``(lam, vec, deflated (N,) bool)``; branch-free (both
    routes are computed and each prompt's is selected), so it traces under ``torch.compile``.

    The residual Gram ``E E^T`` is used as it is, with no shift or marker entries: any O(1) entry would cost
    its small eigenvalues their precision (a symmetric eigensolver is accurate to eps * |A|). Its spectrum is
    the c - 1 residual eigenvalues and zeros (v_1 and the masked rows); slots past ``min(c, d)`` are not kept,
    and a zero that takes a kept slot has ``s < eps_s``: no gradient, the same softmax term as the true 0."""
    m = z.shape[1]
    if m < 2:
        return lam, vec, torch.zeros_like(finite)
    v1 = vec[:, :, :1]
    residual = z - v1 @ (v1.mT @ z)  # (I - v1 v1^T) Z, row by row
    residual = torch.where(finite[:, None, None], residual, 0.0)
    small = residual @ residual.mT
    # scaled to unit trace: LAPACK's eigensolver returned NaN on fp32 matrices of entries around 1e-14
    scale = small.diagonal(dim1=-2, dim2=-1).sum(dim=-1)
    scale = torch.where(scale > torch.finfo(z.dtype).tiny, scale, 1.0)
    lam_r, vec_r = torch.linalg.eigh(small / scale[:, None, None])
    lam_r, vec_r = lam_r.flip(-1) * scale[:, None], vec_r.flip(-1)
    deflated = finite & (lam[:, 1] < DEFLATION_RATIO * lam[:, 0])
    lam_d = torch.cat([lam[:, :1], lam_r[:, : m - 1]], dim=1)
    vec_d = torch.cat([v1, vec_r[:, :, : m - 1]], dim=2)
    return (
        torch.where(deflated[:, None], lam_d, lam),
        torch.where(deflated[:, None, None], vec_d, vec),
        deflated,
    )


def apply_backward_matrix(bmat: torch.Tensor, reps: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """``B R``: ``bmat`` ``(N, m, m)`` (accumulation dtype) applied to the present rows of ``reps`` ``(N, m, d)``,
    returned in the dtype of reps."""
    rows = torch.where(present[..., None], reps.to(bmat.dtype), 0.0)  # masked rows may hold NaN
    with autocast_off(reps.device):
        return (bmat @ rows).to(reps.dtype)


class GramMLCFunction(torch.autograd.Function):
    """Autograd wrapper: forward returns the per-prompt loss; backward is ``dR = (g B) R``."""

    @staticmethod
    def forward(
        ctx, reps: torch.Tensor, present: torch.Tensor, tau: float, objective: str, anchor: bool = False
    ) -> torch.Tensor:
        loss, bmat = gram_loss_and_backward_matrix(reps, present, tau, objective, anchor)
        ctx.save_for_backward(reps, present, bmat)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        reps, present, bmat = ctx.saved_tensors
        scaled = bmat * grad_loss.to(bmat.dtype)[:, None, None]
        return apply_backward_matrix(scaled, reps, present), None, None, None, None


def torch_mlc_loss(
    reps: torch.Tensor, present: torch.Tensor, tau: float, objective: str, anchor: bool = False
) -> torch.Tensor:
    """Per-prompt MLC loss ``(N,)`` through the Gram route (see module docstring)."""
    if reps.requires_grad and torch.is_grad_enabled():
        return GramMLCFunction.apply(reps, present, tau, objective, anchor)
    return gram_loss_and_backward_matrix(reps, present, tau, objective, anchor)[0]


def torch_loss_and_grad(
    reps: torch.Tensor, present: torch.Tensor, tau: float, objective: str, anchor: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss (N,), grad (N, m, d))``: each prompt's loss (accumulation dtype) and its unscaled gradient in the
    dtype of reps, no autograd."""
    loss, bmat = gram_loss_and_backward_matrix(reps, present, tau, objective, anchor)
    return loss, apply_backward_matrix(bmat, reps, present)
