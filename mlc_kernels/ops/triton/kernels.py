"""The Triton kernels of the MLC loss, in three phases sized for memory bandwidth.

1. ``mlc_gram_kernel``, grid ``(N, splits)``: each program streams one slice of d for one prompt
   and writes its partial raw Gram matrix ``R R^T`` (``(M_PAD, M_PAD)`` fp32, Kahan-compensated
   over the slice's blocks) to a small workspace ``(N, splits, M_PAD, M_PAD)``.
2. ``mlc_small_kernel``, one prompt per (small) program: sums the partials in a fixed order
   (bitwise deterministic), forms the cosine matrix G with masks and non-finite detection, runs
   the Jacobi eigensolver when the objective needs one, and writes the per-prompt loss and the
   ``(M_PAD, M_PAD)`` fp32 matrix ``B`` with ``dloss/dR = B R``.
   Near collinearity (the softmax objectives, ``lambda_2 < DEFLATION_RATIO * lambda_1``) the same program
   deflates: it streams its rows again for the residual Gram ``E E^T`` with ``E = (I - v_1 v_1^T) Z`` formed
   in fp32 per d-block (``_residual_gram``), takes the small singular pairs from the unit-trace-scaled
   ``E E^T`` (its own Jacobi) and rewrites the prompt's loss and ``B``: the torch impl's deflation
   (``gram_torch._deflate``). Prompts that are not flagged read nothing more.
3. ``mlc_grad_kernel``, grid ``(N, d_chunks)``: streams the rows once more and writes
   ``g_n B_n R_n`` in the input dtype (``g``: the incoming gradient of each prompt's loss).

Three launches per forward+backward whatever the inputs (none depends on a value read back). The forward runs
phases 1-2 and saves only ``B`` (N x M_PAD x M_PAD fp32) with the inputs; the
backward runs phase 3. A loss-only call (no grad, eval) reads reps once and writes no gradient;
forward+backward reads reps twice and writes the gradient once. The launches are in ``launch.py``, the
registered ops in ``op.py``; this module holds the ``@triton.jit`` kernels only (their sizes: ``configs.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _round_robin_partner(idx, step, k):
    """Partner of each index in round ``step`` of the circle-method tournament of k (even) players.

    Indices >= k are paired with themselves (no rotation).
    """
    last = k - 1
    other = (2 * step - idx + 2 * last) % last
    partner = tl.where(idx == step, last, other)
    partner = tl.where(idx == last, step, partner)
    return tl.where(idx >= k, idx, partner)


@triton.jit
def _jacobi_eigh(a, eye, rows, k, M_PAD: tl.constexpr, N_SWEEPS: tl.constexpr):
    """Eigen-decomposition of the symmetric ``(M_PAD, M_PAD)`` fp32 tile ``a``.

    Returns ``(lam, v)``: eigenvalues on the diagonal order, eigenvectors as columns of v.
    Only indices < k (k even) are rotated; the others must be decoupled already.
    Each round applies the rotation ``J`` (``J[i, i] = c_i``, ``J[i, P(i)] = s_i``, P the round's
    pairing) as permutation gathers: O(M^2) work, no tile products (measured faster on H200).
    """
    v = tl.where(eye, 1.0, 0.0)
    off = tl.sum(tl.sum(tl.where(eye, 0.0, a * a), axis=1), axis=0)
    total = tl.sum(tl.sum(a * a, axis=1), axis=0)
    tol = 1.4210855e-14 * total  # (fp32 eps)^2 * |A|_F^2
    sweep = 0
    while (sweep < N_SWEEPS) & (off > tol):
        for step in range(0, k - 1):
            partner = _round_robin_partner(rows, step, k)
            onehot = rows[None, :] == partner[:, None]
            paired = rows != partner
            first = rows < partner
            diag = tl.sum(tl.where(eye, a, 0.0), axis=1)
            a_pq = tl.sum(tl.where(onehot, a, 0.0), axis=1)
            d_partner = tl.sum(tl.where(onehot, diag[None, :], 0.0), axis=1)
            a_pp = tl.where(first, diag, d_partner)
            a_qq = tl.where(first, d_partner, diag)
            diff = a_qq - a_pp
            sign = tl.where(diff >= 0.0, 1.0, -1.0)
            denom = tl.abs(diff) + tl.sqrt(diff * diff + 4.0 * a_pq * a_pq)
            # tan of the rotation angle that zeroes a_pq (Rutishauser's stable form)
            t = tl.where(paired & (a_pq != 0.0), 2.0 * a_pq * sign / tl.where(denom > 0.0, denom, 1.0), 0.0)
            # both members of a pair take the first member's angle (A may drift from symmetry by rounding)
            t = tl.where(first, t, tl.gather(t, partner, 0))
            c = 1.0 / tl.sqrt(1.0 + t * t)
            s = tl.where(first, t * c, -t * c)
            s_partner = tl.gather(s, partner, 0)  # J[P(i), i]
            by_col = tl.broadcast_to(partner[None, :], (M_PAD, M_PAD))
            by_row = tl.broadcast_to(partner[:, None], (M_PAD, M_PAD))
            # (A J)[i, j] = c_j A[i, j] + s_P(j) A[i, P(j)];  (J^T B)[i, j] = c_i B[i, j] + s_P(i) B[P(i), j]
            b = a * c[None, :] + tl.gather(a, by_col, 1) * s_partner[None, :]
            a = b * c[:, None] + tl.gather(b, by_row, 0) * s_partner[:, None]
            v = v * c[None, :] + tl.gather(v, by_col, 1) * s_partner[None, :]
        off = tl.sum(tl.sum(tl.where(eye, 0.0, a * a), axis=1), axis=0)
        sweep += 1
    lam = tl.sum(tl.where(eye, a, 0.0), axis=1)
    return lam, v


@triton.jit
def _load_present(mask_ptr, pid, m, rows, HAS_MASK: tl.constexpr):
    """The prompt's present variants: its row of the (N, m) uint8 mask, or every row < m without one."""
    if HAS_MASK:
        present = tl.load(mask_ptr + pid * m + rows, mask=rows < m, other=0) != 0
    else:
        present = rows < m
    return present


@triton.jit
def mlc_gram_kernel(
    reps_ptr,
    mask_ptr,
    part_ptr,
    m,
    d,
    stride_n,
    stride_m,
    chunk,
    n_splits,
    M_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    """Partial Gram matrices. reps: (N, m, d), unit stride on d; mask: (N, m) uint8;
    part: (N, n_splits, M_PAD, M_PAD) fp32. Program (n, s) covers d in [s*chunk, (s+1)*chunk)."""
    pid = tl.program_id(0).to(tl.int64)
    sid = tl.program_id(1)
    rows = tl.arange(0, M_PAD)
    present = _load_present(mask_ptr, pid, m, rows, HAS_MASK)
    cols = tl.arange(0, BLOCK_D)
    row_ptrs = reps_ptr + pid * stride_n + rows[:, None] * stride_m
    begin = sid * chunk
    stop = tl.minimum(begin + chunk, d)
    # each block's product starts from zero and is added with Kahan compensation, so the error
    # does not grow with d (G's small eigenvalues are the loss's noise floor)
    raw = tl.zeros((M_PAD, M_PAD), dtype=tl.float32)
    carry = tl.zeros((M_PAD, M_PAD), dtype=tl.float32)
    for start in range(begin, stop, BLOCK_D):
        offs = start + cols
        x = tl.load(row_ptrs + offs[None, :], mask=present[:, None] & (offs[None, :] < stop), other=0.0)
        part = tl.dot(x, tl.trans(x), input_precision="ieee") - carry
        total = raw + part
        carry = (total - raw) - part
        raw = total
    out = part_ptr + (pid * n_splits + sid) * (M_PAD * M_PAD) + rows[:, None] * M_PAD + rows[None, :]
    tl.store(out, raw)


@triton.jit
def _descending_rank(lam, valid, rows):
    """Position of each valid eigenvalue in descending order (ties by index); invalid ones are not counted."""
    ahead = (lam[None, :] > lam[:, None]) | ((lam[None, :] == lam[:, None]) & (rows[None, :] < rows[:, None]))
    return tl.sum((ahead & valid[None, :]).to(tl.int32), axis=1)


@triton.jit
def _spectral_objective(gram, lam, vec, valid, rank, pair, d, count, count_f, inv_tau, sv_cutoff, objective):
    """Loss and M of the eigen objectives (sv_softmax 0, rank1 1, signed_sv_softmax 5, relative_sv_softmax 6) from
    the spectrum: eigenvalues ``lam`` with eigenvectors the columns of ``vec``, ``rank`` their descending order
    among the ``valid`` ones; ``g_j / s_j`` is cut off below ``sv_cutoff``."""
    kept = valid & (rank < tl.minimum(count, d))  # Z has min(m_n, d) singular values
    top = valid & (rank == 0)
    sv = tl.sqrt(tl.maximum(lam, 0.0))
    extra = count_f * 0.0  # coefficient of the all-ones (present) block in M
    if (objective == 0) | (objective == 6):  # sv_softmax, relative_sv_softmax
        s_top = tl.sum(tl.where(top, sv, 0.0), axis=0)
        # relative: logits s / (sigma tau) with sigma = s_1 + eps held constant
        scale = tl.where(objective == 6, inv_tau / (s_top + 1e-12), inv_tau)
        ex = tl.where(kept, tl.exp((sv - s_top) * scale), 0.0)
        denom = tl.sum(ex, axis=0)
        denom = tl.where(denom > 0.0, denom, 1.0)  # 0 only for prompts without singular values
        loss = tl.log(denom)
        g = (ex / denom - top.to(tl.float32)) * scale
        big = kept & (sv >= sv_cutoff)
        w = tl.where(big, g / tl.where(big, sv, 1.0), 0.0)
    elif objective == 1:  # rank1
        lam_top = tl.sum(tl.where(top, lam, 0.0), axis=0)
        loss = 1.0 - tl.maximum(lam_top, 0.0) / count_f
        w = tl.where(top, -2.0 / count_f, 0.0)
    else:  # signed_sv_softmax: rho = sqrt(1^T G 1 / c) in place of s_1
        rho = tl.sqrt(tl.maximum(tl.sum(tl.sum(gram, axis=1), axis=0) / count_f, 0.0))
        rest = kept & (rank > 0)
        s_max = tl.maximum(rho, tl.max(tl.where(rest, sv, 0.0), axis=0))
        ex = tl.where(rest, tl.exp((sv - s_max) * inv_tau), 0.0)
        ex_rho = tl.exp((rho - s_max) * inv_tau)
        denom = ex_rho + tl.sum(ex, axis=0)
        loss = tl.log(denom) + (s_max - rho) * inv_tau
        g = ex / denom * inv_tau
        big = rest & (sv >= sv_cutoff)
        w = tl.where(big, g / tl.where(big, sv, 1.0), 0.0)
        g_rho = (ex_rho / denom - 1.0) * inv_tau
        extra = tl.where(rho >= sv_cutoff, g_rho / (count_f * tl.where(rho > 0.0, rho, 1.0)), 0.0)
    mmat = tl.dot(vec * w[None, :], tl.trans(vec), input_precision="ieee")
    mmat = mmat + tl.where(pair, extra, 0.0)
    return loss, mmat


@triton.jit
def _pairwise_objective(gram, pair, eye, rows, base, count_f, objective):
    """Loss and M of the pairwise objectives (pairwise 2, signed_pairwise 3, anchor_cos 4)."""
    off_pair = pair & ~eye
    n_pairs = tl.maximum(count_f * (count_f - 1.0) * 0.5, 1.0)
    if objective == 2:  # pairwise: mean of 1 - G_ij^2
        loss = tl.sum(tl.sum(tl.where(off_pair, 1.0 - gram * gram, 0.0), axis=1), axis=0) * 0.5 / n_pairs
        mmat = tl.where(off_pair, -2.0 * gram / n_pairs, 0.0)
    elif objective == 3:  # signed_pairwise: mean of 1 - G_ij
        loss = tl.sum(tl.sum(tl.where(off_pair, 1.0 - gram, 0.0), axis=1), axis=0) * 0.5 / n_pairs
        mmat = tl.where(off_pair, -1.0 / n_pairs, 0.0)
    else:  # anchor_cos: mean over j != b of 1 - cos(z_j, stopgrad(z_b))
        n_other = tl.maximum(count_f - 1.0, 1.0)
        to_base = off_pair & (rows[None, :] == base)
        loss = tl.sum(tl.sum(tl.where(to_base, 1.0 - gram, 0.0), axis=1), axis=0) / n_other
        mmat = tl.where(to_base, -1.0 / n_other, 0.0)
    return loss, mmat


@triton.jit
def _sum_partials(ptr, pid, n_splits, tile, M_PAD: tl.constexpr):
    """Sum of the ``(M_PAD, M_PAD)`` partials of prompt ``pid`` in split order with Kahan compensation."""
    raw = tl.zeros((M_PAD, M_PAD), dtype=tl.float32)
    carry = tl.zeros((M_PAD, M_PAD), dtype=tl.float32)
    for s in range(n_splits):
        part = tl.load(ptr + (pid * n_splits + s) * (M_PAD * M_PAD) + tile) - carry
        total = raw + part
        carry = (total - raw) - part
        raw = total
    return raw


@triton.jit
def _cosines(part_ptr, mask_ptr, pid, m, n_splits, rows, eye, tile, M_PAD: tl.constexpr, HAS_MASK: tl.constexpr):
    """The prompt's masks, row norms and cosine matrix G from its partial Gram matrices."""
    present = _load_present(mask_ptr, pid, m, rows, HAS_MASK)
    raw = _sum_partials(part_ptr, pid, n_splits, tile, M_PAD)
    sq = tl.sum(tl.where(eye, raw, 0.0), axis=1)
    bad = tl.sum((present & ~(sq < 3.0e38)).to(tl.int32), axis=0) > 0  # NaN or inf in a present row
    norms = tl.sqrt(sq)
    inv = 1.0 / tl.maximum(norms, 1e-12)
    pair = present[:, None] & present[None, :]
    gram = tl.where(pair, raw * inv[:, None] * inv[None, :], 0.0)
    gram = tl.where(bad, 0.0, gram)
    count = tl.sum(present.to(tl.int32), axis=0)
    base = tl.min(tl.where(present, rows, M_PAD), axis=0)  # the first present variant
    return present, bad, norms, inv, pair, gram, count, base


@triton.jit
def _store_outputs(loss_ptr, bmat_ptr, pid, loss, mmat, gram, norms, inv, pair, eye, rows, tile, base, count, bad,
                   anchor, write_b, M_PAD: tl.constexpr):  # fmt: skip
    """Store the loss and, if write_b, B = D (M - diag((M G)_ll)) D with D = diag(1 / max(|r_l|, eps))."""
    eligible = count >= 2
    loss = tl.where(eligible, loss, 0.0)
    loss = tl.where(bad, float("nan"), loss)
    tl.store(loss_ptr + pid, loss)
    if write_b:
        mmat = tl.where(eligible, mmat, 0.0)
        nonzero = norms > 1e-12
        proj = tl.where(nonzero, tl.sum(mmat * gram, axis=1), 0.0)
        out_scale = tl.where(nonzero, inv, 0.0)  # a zero row has no direction: zero gradient
        bmat = (mmat - tl.where(eye, proj[:, None], 0.0)) * out_scale[:, None] * inv[None, :]
        bmat = tl.where(pair, bmat, 0.0)
        bmat = tl.where(anchor & (rows[:, None] == base), 0.0, bmat)  # stop-gradient on the base row
        bmat = tl.where(bad, float("nan"), bmat)
        tl.store(bmat_ptr + pid * (M_PAD * M_PAD) + tile, bmat)


@triton.jit
def _residual_gram(reps_ptr, mask_ptr, info, pid, m, d, stride_n, stride_m, rows, M_PAD: tl.constexpr,
                   BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr):  # fmt: skip
    """The residual Gram E E^T of prompt ``pid`` over all of d, with E = (I - v_1 v_1^T) Z formed in fp32 per
    d-block from the rows (Z = diag(1 / |r|) R; accurate to eps * |z|), Kahan-compensated over the blocks;
    v_1 and the inverse norms from ``info`` (its ``defl`` row)."""
    present = _load_present(mask_ptr, pid, m, rows, HAS_MASK)
    v1 = tl.where(present, tl.load(info + rows), 0.0)
    inv = tl.where(present, tl.load(info + M_PAD + rows), 0.0)
    coef = v1 * inv  # v_1^T Z = sum_i (v1_i / |r_i|) r_i
    cols = tl.arange(0, BLOCK_D)
    row_ptrs = reps_ptr + pid * stride_n + rows[:, None] * stride_m
    raw = tl.zeros((M_PAD, M_PAD), dtype=tl.float32)
    carry = tl.zeros((M_PAD, M_PAD), dtype=tl.float32)
    for start in range(0, d, BLOCK_D):
        offs = start + cols
        x = tl.load(row_ptrs + offs[None, :], mask=present[:, None] & (offs[None, :] < d), other=0.0)
        x = x.to(tl.float32)
        along = tl.sum(x * coef[:, None], axis=0)  # (v_1^T Z) on this block
        e = x * inv[:, None] - v1[:, None] * along[None, :]
        part = tl.dot(e, tl.trans(e), input_precision="ieee") - carry
        total = raw + part
        carry = (total - raw) - part
        raw = total
    return raw


@triton.jit
def mlc_small_kernel(
    part_ptr,
    mask_ptr,
    loss_ptr,
    bmat_ptr,
    defl_ptr,
    reps_ptr,
    n,
    m,
    d,
    stride_n,
    stride_m,
    n_splits,
    inv_tau,
    sv_cutoff,
    defl_ratio,
    defl_cutoff,
    objective,
    anchor,
    write_b,
    deflate,
    M_PAD: tl.constexpr,
    PROMPTS: tl.constexpr,
    N_SWEEPS: tl.constexpr,
    RESID_BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    """Per prompt: sum the partial Gram matrices, loss (N,) fp32 and, if write_b, B (N, M_PAD, M_PAD) fp32
    with dloss/dR = B R. part: (N, n_splits, M_PAD, M_PAD) fp32; mask: (N, m) uint8; reps: (N, m, d) with unit
    stride on d (read only by deflated prompts).

    Deflation (``ops.common.DEFLATION_RATIO``), for the eigen objectives when ``deflate``: the prompt writes
    ``defl`` (N, 3, M_PAD) fp32 scratch: v_1, the inverse row norms and ``(flag, lambda_1)``, with flag 1 where
    ``lambda_2 < defl_ratio * lambda_1``; a flagged prompt then streams its rows once more for the residual Gram
    ``E E^T`` (``_residual_gram``), takes the small singular pairs from it (its own Jacobi) and overwrites its
    loss and B: the torch impl's deflation (``gram_torch._deflate``), in the same launch."""
    rows = tl.arange(0, M_PAD)
    eye = rows[:, None] == rows[None, :]
    tile = rows[:, None] * M_PAD + rows[None, :]
    inv_tau = tl.cast(inv_tau, tl.float32)  # torch.compile may pass Python floats as fp64
    sv_cutoff = tl.cast(sv_cutoff, tl.float32)
    defl_ratio = tl.cast(defl_ratio, tl.float32)
    defl_cutoff = tl.cast(defl_cutoff, tl.float32)
    k = m + (m % 2)  # the Jacobi sweeps rotate the first k (even) indices
    for j in range(PROMPTS):
        # the last program may run past N: it recomputes prompt N-1 (same values, same stores)
        pid = tl.minimum(tl.program_id(0) * PROMPTS + j, n - 1).to(tl.int64)
        info = defl_ptr + pid * (3 * M_PAD)
        present, bad, norms, inv, pair, gram, count, base = _cosines(
            part_ptr, mask_ptr, pid, m, n_splits, rows, eye, tile, M_PAD, HAS_MASK)  # fmt: skip
        count_f = tl.maximum(count, 1).to(tl.float32)
        if (objective == 0) | (objective == 1) | (objective == 5) | (objective == 6):
            shifted = tl.where(eye & ~present[:, None], -1.0, gram)  # masked rows: eigenvalue -1
            shifted = tl.where(bad, tl.where(eye, 1.0, 0.0), shifted)
            lam, vec = _jacobi_eigh(shifted, eye, rows, k, M_PAD, N_SWEEPS)
            if M_PAD > 16:  # G again from the partials (the same values): not live through the sweeps,
                # which kept ptxas from spilling with one warp per 32 x 32 prompt
                present, bad, norms, inv, pair, gram, count, base = _cosines(
                    part_ptr, mask_ptr, pid, m, n_splits, rows, eye, tile, M_PAD, HAS_MASK)  # fmt: skip
            valid = present & (lam > -0.5)
            rank = _descending_rank(lam, valid, rows)
            if deflate:  # stored at once: nothing more stays live through the objective
                top = valid & (rank == 0)
                lam1 = tl.sum(tl.where(top, lam, 0.0), axis=0)
                lam2 = tl.sum(tl.where(valid & (rank == 1), lam, 0.0), axis=0)
                flag = (count >= 2) & ~bad & (lam2 < defl_ratio * lam1)
                tl.store(info + rows, tl.sum(tl.where(top[None, :], vec, 0.0), axis=1))  # v_1
                tl.store(info + M_PAD + rows, tl.where(present, inv, 0.0))
                tl.store(info + 2 * M_PAD + rows, tl.where(rows == 0, flag.to(tl.float32),
                                                           tl.where(rows == 1, lam1, 0.0)))  # fmt: skip
            loss, mmat = _spectral_objective(gram, lam, vec, valid, rank, pair, d, count, count_f, inv_tau,
                                             sv_cutoff, objective)  # fmt: skip
        else:
            loss, mmat = _pairwise_objective(gram, pair, eye, rows, base, count_f, objective)
        _store_outputs(loss_ptr, bmat_ptr, pid, loss, mmat, gram, norms, inv, pair, eye, rows, tile, base,
                       count, bad, anchor, write_b, M_PAD)  # fmt: skip
        if deflate:
            tl.debug_barrier()  # the first pass's stores (info, loss, B) are seen and overwritten in order
            if tl.load(info + 2 * M_PAD) > 0.0:  # flagged: finite, >= 2 present rows, lambda_2 small
                # E E^T, scaled to unit trace (no marker entries: masked rows stay exact zeros, decoupled);
                # its eigensolver runs before G is formed, so that G is not live through the sweeps
                small = _residual_gram(reps_ptr, mask_ptr, info, pid, m, d, stride_n, stride_m, rows, M_PAD,
                                       RESID_BLOCK_D, HAS_MASK)  # fmt: skip
                scale = tl.sum(tl.sum(tl.where(eye, small, 0.0), axis=1), axis=0)
                scale = tl.where(scale > 1.1754944e-38, scale, 1.0)
                lam_r, vec_r = _jacobi_eigh(small / scale, eye, rows, k, M_PAD, N_SWEEPS)
                lam_r = lam_r * scale
                present, bad, norms, inv, pair, gram, count, base = _cosines(
                    part_ptr, mask_ptr, pid, m, n_splits, rows, eye, tile, M_PAD, HAS_MASK)  # fmt: skip
                v1 = tl.load(info + rows)
                lam1 = tl.load(info + 2 * M_PAD + 1)
                # the c residual eigenpairs of the present rows hold the c - 1 small singular pairs and the
                # null direction v_1 (the smallest): that slot takes (lambda_1, v_1)
                rank_r = _descending_rank(lam_r, present, rows)
                drop = present & (rank_r == count - 1)
                lam = tl.where(drop, lam1, lam_r)
                vec = tl.where(drop[None, :], v1[:, None], vec_r)
                rank = tl.where(drop, 0, rank_r + 1)
                count_f = tl.maximum(count, 1).to(tl.float32)
                loss, mmat = _spectral_objective(gram, lam, vec, present, rank, pair, d, count, count_f, inv_tau,
                                                 defl_cutoff, objective)  # fmt: skip
                _store_outputs(loss_ptr, bmat_ptr, pid, loss, mmat, gram, norms, inv, pair, eye, rows, tile, base,
                               count, bad, anchor, write_b, M_PAD)  # fmt: skip


@triton.jit
def mlc_grad_kernel(
    reps_ptr,
    mask_ptr,
    bmat_ptr,
    gscale_ptr,
    grad_ptr,
    gscale_stride,
    m,
    d,
    stride_n,
    stride_m,
    chunk,
    M_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    """grad[n, :, slice] = gscale[n] * B[n] @ reps[n, :, slice] for the slice [s*chunk, (s+1)*chunk).
    reps: (N, m, d), unit stride on d; bmat: (N, M_PAD, M_PAD) fp32; gscale: (N,) fp32 read with stride
    gscale_stride (0: one scale for all);
    grad: (N, m, d) contiguous in the dtype of reps. Masked rows get zero."""
    pid = tl.program_id(0).to(tl.int64)
    sid = tl.program_id(1)
    rows = tl.arange(0, M_PAD)
    in_range = rows < m
    present = _load_present(mask_ptr, pid, m, rows, HAS_MASK)
    cols = tl.arange(0, BLOCK_D)
    row_ptrs = reps_ptr + pid * stride_n + rows[:, None] * stride_m
    grad_rows = grad_ptr + pid * m * d + rows[:, None] * d
    core = tl.load(bmat_ptr + pid * (M_PAD * M_PAD) + rows[:, None] * M_PAD + rows[None, :])
    core = core * tl.load(gscale_ptr + pid * gscale_stride)
    begin = sid * chunk
    stop = tl.minimum(begin + chunk, d)
    if reps_ptr.dtype.element_ty == tl.float32:
        for start in range(begin, stop, BLOCK_D):
            offs = start + cols
            x = tl.load(row_ptrs + offs[None, :], mask=present[:, None] & (offs[None, :] < stop), other=0.0)
            out = tl.dot(core, x, input_precision="ieee")
            out = tl.where(present[:, None], out, 0.0)
            tl.store(grad_rows + offs[None, :], out, mask=in_range[:, None] & (offs[None, :] < stop))
    else:
        # Two 16-bit tensor-core products (hi + lo split of each row of B scaled to max 1) keep
        # about 16 bits of B: the product is then as exact as the 16-bit output.
        scale = tl.max(tl.abs(core), axis=1)
        scale = tl.where((scale > 0.0) & (scale < 3.0e38), scale, 1.0)  # NaN/inf rows propagate through unit
        unit = core / scale[:, None]
        hi = unit.to(reps_ptr.dtype.element_ty)
        lo = (unit - hi.to(tl.float32)).to(reps_ptr.dtype.element_ty)
        for start in range(begin, stop, BLOCK_D):
            offs = start + cols
            x = tl.load(row_ptrs + offs[None, :], mask=present[:, None] & (offs[None, :] < stop), other=0.0)
            out = (tl.dot(hi, x) + tl.dot(lo, x)) * scale[:, None]
            out = tl.where(present[:, None], out, 0.0)
            tl.store(grad_rows + offs[None, :], out.to(reps_ptr.dtype.element_ty),
                     mask=in_range[:, None] & (offs[None, :] < stop))  # fmt: skip
