"""Consistency metrics: how collinear the variants of each prompt are, and whether prompts collapse."""

from __future__ import annotations

import torch

from .ops.common import NORM_EPS


@torch.no_grad()
def consistency_metrics(reps: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Metrics of ``reps`` ``(N, m, d)`` with optional ``mask`` ``(N, m)`` bool; no gradients.

    Returns float32 (float64 for float64 input) tensors:

    - ``s1_share`` ``(N,)``: ``s_1^2 / sum_j s_j^2`` of each prompt's unit rows (1 = all variants collinear).
    - ``mean_cosine`` ``(N,)``: mean pairwise cosine between the present variants.
    - ``cosine_to_consensus`` ``(N, m)``: cosine of each variant to its prompt's consensus direction
      (the first right singular vector, signed towards the variants); NaN where masked.
    - ``valid`` ``(N,)`` bool: prompts with >= 2 present variants, all finite (the others hold NaN).
    - ``between_prompt_cosine`` ``()``: mean |cosine| between the consensus directions of different
      prompts. Close to 1 means collapse: every prompt maps to the same direction.
    - ``between_prompt_s1_share`` ``()``: ``s1_share`` of the matrix of consensus directions.

    Collapse diagnostics on the sign-aligned consensus directions
    ``c_i = normalize(sum_j sign(z_ij . z_ib) z_ij)`` (b: the base row, the prompt's first present variant;
    ``mlc_kernels.guards.signed_consensus``), over the prompts with >= 2 present variants:

    - ``signed_between_prompt_cosine`` ``()``: mean over pairs of prompts of ``c_i . c_k`` (signed, not
      ``|cos|``): about 1 when every prompt maps to the same direction, about 0 when they are spread.
    - ``consensus_effective_rank`` ``()``: RankMe, ``exp(-sum_k p_k log p_k)`` with ``p = sigma / sum(sigma)``
      the normalised singular values of the matrix of the c_i: 1 when they collapse, up to min(#prompts, d).
    - ``between_prompt_spread`` ``()``: ``1 - |mean_i c_i|^2``, the mean squared distance of the c_i from their
      mean: 0 when every prompt maps to one direction. A shared component (raw hidden states are anisotropic)
      makes it small from the start, so it reads as a collapse only relative to its value before training.
    - ``sign_flip_share`` ``()``: share of the present non-base rows whose cosine to their base row is
      negative, ``z_ij . z_ib < 0`` (j != b): the rows an unsigned objective aligns with a flipped sign.
    """
    acc = torch.float64 if reps.dtype == torch.float64 else torch.float32
    n, m, _ = reps.shape
    present = mask if mask is not None else torch.ones(n, m, dtype=torch.bool, device=reps.device)
    # a prompt with a non-finite present value gets NaN metrics and stays out of the batch-level ones
    finite = torch.where(present[..., None], reps.isfinite(), True).flatten(1).all(dim=1)
    reps = torch.where(finite[:, None, None], reps, 0.0)
    z = torch.nn.functional.normalize(torch.where(present[..., None], reps.to(acc), 0.0), dim=-1, eps=NORM_EPS)
    gram = z @ z.mT
    count = present.sum(dim=1)
    valid = (count >= 2) & finite
    nan = torch.tensor(float("nan"), dtype=acc, device=reps.device)

    lam, vec = torch.linalg.eigh(gram)
    top_lam, top_vec = lam[:, -1].clamp_min(0.0), vec[:, :, -1]
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(dim=-1)
    s1_share = torch.where(valid, top_lam / trace.clamp_min(NORM_EPS), nan)

    eye = torch.eye(m, dtype=torch.bool, device=reps.device)
    off = present[:, :, None] & present[:, None, :] & ~eye
    n_pairs = off.sum(dim=(1, 2)).clamp_min(1)
    mean_cosine = torch.where(valid, torch.where(off, gram, 0.0).sum(dim=(1, 2)) / n_pairs, nan)

    consensus = torch.einsum("nm,nmd->nd", top_vec, z)
    consensus = torch.nn.functional.normalize(consensus, dim=-1, eps=NORM_EPS)
    to_consensus = torch.einsum("nmd,nd->nm", z, consensus)
    sign = torch.where(torch.where(present, to_consensus, 0.0).sum(dim=1) < 0, -1.0, 1.0).to(acc)
    consensus = consensus * sign[:, None]
    to_consensus = torch.where(present & valid[:, None], to_consensus * sign[:, None], nan)

    centers = consensus[valid]
    k = centers.shape[0]
    if k >= 2:
        cos = centers @ centers.T
        iu = torch.triu_indices(k, k, offset=1, device=reps.device)
        between = cos[iu[0], iu[1]].abs().mean()
        between_s1 = torch.linalg.eigvalsh(cos)[-1] / k
    else:
        between, between_s1 = nan, nan
    signed = _signed_diagnostics(reps, present, valid, nan)
    return {
        "s1_share": s1_share,
        "mean_cosine": mean_cosine,
        "cosine_to_consensus": to_consensus,
        "valid": valid,
        "between_prompt_cosine": between,
        "between_prompt_s1_share": between_s1,
        **signed,
    }


def _signed_diagnostics(reps, present, valid, nan) -> dict[str, torch.Tensor]:
    from .guards import signed_consensus

    c, _, sign = signed_consensus(reps, present)
    base = torch.argmax(present.to(torch.uint8), dim=1)
    slot = torch.arange(present.shape[1], device=present.device)
    rows = present & valid[:, None] & (slot[None, :] != base[:, None])
    flips = (sign < 0) & rows
    flip_share = flips.sum().to(nan.dtype) / rows.sum() if bool(rows.any()) else nan
    centers = c[valid]
    k = centers.shape[0]
    if k >= 2:
        cos = centers @ centers.T
        iu = torch.triu_indices(k, k, offset=1, device=reps.device)
        signed_cos = cos[iu[0], iu[1]].mean()
        sv = torch.linalg.svdvals(centers)
        p = sv / sv.sum().clamp_min(NORM_EPS)
        rank = torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum())
        spread = (1.0 - centers.mean(dim=0).square().sum()).clamp_min(0.0)
    else:
        signed_cos, rank, spread = nan, nan, nan
    return {"signed_between_prompt_cosine": signed_cos, "consensus_effective_rank": rank,
            "between_prompt_spread": spread, "sign_flip_share": flip_share}  # fmt: skip
