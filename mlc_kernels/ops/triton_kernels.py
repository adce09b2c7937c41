"""The fused Triton kernel: Gram matrix, m x m Jacobi eigensolver, loss and gradient in one launch.

One program per prompt (docs/design.md, section 3):

1. stream the m rows over d in blocks of ``BLOCK_D``, accumulating the raw Gram matrix
   ``R R^T`` in fp32 (tensor cores for bf16/fp16, IEEE fp32 FMAs for fp32);
2. normalise it to the cosine matrix G, give masked rows eigenvalue -1, and diagonalise G
   with parallel (round-robin) Jacobi: each step applies m/2 disjoint rotations at once as
   one small rotation matrix J, ``A <- J^T A J``, ``V <- V J``;
3. compute the loss and the m x m matrix B with ``dloss/dR = B R`` (docs/design.md, section 2);
4. stream the rows again and write ``B R`` in the input dtype.

The backward of the autograd wrapper only scales that gradient by ``grad_output``.
The kernel is registered as a ``torch.library.triton_op`` so that ``torch.compile`` sees it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import OBJECTIVES, singular_value_cutoff

MAX_VARIANTS = 32
"""The largest m the kernel supports (the Jacobi tile is 16x16 for m <= 16, else 32x32)."""

MAX_SWEEPS = 12
"""Jacobi sweeps at most; converged inputs stop after 1-2, random ones after 5-7 (fp32)."""


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
def mlc_fused_kernel(
    reps_ptr,
    mask_ptr,
    loss_ptr,
    grad_ptr,
    m,
    d,
    stride_n,
    stride_m,
    inv_tau,
    sv_cutoff,
    objective,
    write_grad,
    M_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    N_SWEEPS: tl.constexpr,
):
    """One prompt per program. reps: (N, m, d) with unit stride on d; mask: (N, m) uint8;
    loss: (N,) fp32; grad: (N, m, d) contiguous in the dtype of reps (written if write_grad)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, M_PAD)
    eye = rows[:, None] == rows[None, :]
    in_range = rows < m
    present = tl.load(mask_ptr + pid * m + rows, mask=in_range, other=0) != 0
    cols = tl.arange(0, BLOCK_D)
    row_ptrs = reps_ptr + pid * stride_n + rows[:, None] * stride_m

    inv_tau = tl.cast(inv_tau, tl.float32)  # torch.compile may pass Python floats as fp64
    sv_cutoff = tl.cast(sv_cutoff, tl.float32)

    # 1. raw Gram matrix, fp32: each block's product starts from zero and is added with Kahan
    # compensation, so the error does not grow with d (G's small eigenvalues are the loss's noise floor)
    raw = tl.zeros((M_PAD, M_PAD), dtype=tl.float32)
    carry = tl.zeros((M_PAD, M_PAD), dtype=tl.float32)
    for start in range(0, d, BLOCK_D):
        offs = start + cols
        x = tl.load(row_ptrs + offs[None, :], mask=present[:, None] & (offs[None, :] < d), other=0.0)
        part = tl.dot(x, tl.trans(x), input_precision="ieee") - carry
        total = raw + part
        carry = (total - raw) - part
        raw = total

    # 2. cosine matrix, masks, non-finite detection
    sq = tl.sum(tl.where(eye, raw, 0.0), axis=1)
    bad = tl.sum((present & ~(sq < 3.0e38)).to(tl.int32), axis=0) > 0  # NaN or inf in a present row
    norms = tl.sqrt(sq)
    inv = 1.0 / tl.maximum(norms, 1e-12)
    pair = present[:, None] & present[None, :]
    gram = tl.where(pair, raw * inv[:, None] * inv[None, :], 0.0)
    count = tl.sum(present.to(tl.int32), axis=0)
    count_f = tl.maximum(count, 1).to(tl.float32)

    # 3. loss and M (dloss/dZ = M Z)
    if objective == 2:  # pairwise
        off_pair = pair & ~eye
        n_pairs = tl.maximum(count_f * (count_f - 1.0) * 0.5, 1.0)
        loss = tl.sum(tl.sum(tl.where(off_pair, 1.0 - gram * gram, 0.0), axis=1), axis=0) * 0.5 / n_pairs
        mmat = tl.where(off_pair, -2.0 * gram / n_pairs, 0.0)
    else:
        shifted = tl.where(eye & ~present[:, None], -1.0, gram)
        shifted = tl.where(bad, tl.where(eye, 1.0, 0.0), shifted)
        k = m + (m % 2)
        lam, vec = _jacobi_eigh(shifted, eye, rows, k, M_PAD, N_SWEEPS)
        valid = present & (lam > -0.5)
        ahead = (lam[None, :] > lam[:, None]) | ((lam[None, :] == lam[:, None]) & (rows[None, :] < rows[:, None]))
        rank = tl.sum((ahead & valid[None, :]).to(tl.int32), axis=1)
        kept = valid & (rank < tl.minimum(count, d))  # Z has min(m_n, d) singular values
        top = valid & (rank == 0)
        sv = tl.sqrt(tl.maximum(lam, 0.0))
        if objective == 0:  # sv_softmax
            s_top = tl.sum(tl.where(top, sv, 0.0), axis=0)
            ex = tl.where(kept, tl.exp((sv - s_top) * inv_tau), 0.0)
            denom = tl.sum(ex, axis=0)
            denom = tl.where(denom > 0.0, denom, 1.0)  # 0 only for prompts without singular values
            loss = tl.log(denom)
            g = (ex / denom - top.to(tl.float32)) * inv_tau
            big = kept & (sv >= sv_cutoff)
            w = tl.where(big, g / tl.where(big, sv, 1.0), 0.0)
        else:  # rank1
            lam_top = tl.sum(tl.where(top, lam, 0.0), axis=0)
            loss = 1.0 - tl.maximum(lam_top, 0.0) / count_f
            w = tl.where(top, -2.0 / count_f, 0.0)
        mmat = tl.dot(vec * w[None, :], tl.trans(vec), input_precision="ieee")

    eligible = count >= 2
    loss = tl.where(eligible, loss, 0.0)
    loss = tl.where(bad, float("nan"), loss)
    tl.store(loss_ptr + pid, loss)

    # 4. gradient dR = B R with B = D (M - diag((M G)_ll)) D, D = diag(1 / max(|r_l|, eps))
    if write_grad:
        mmat = tl.where(eligible, mmat, 0.0)
        nonzero = norms > 1e-12
        proj = tl.where(nonzero, tl.sum(mmat * gram, axis=1), 0.0)
        out_scale = tl.where(nonzero, inv, 0.0)  # a zero row has no direction: zero gradient
        core = (mmat - tl.where(eye, proj[:, None], 0.0)) * inv[None, :]
        core = tl.where(pair, core, 0.0)
        core = tl.where(bad, float("nan"), core)
        grad_rows = grad_ptr + pid * m * d + rows[:, None] * d
        if reps_ptr.dtype.element_ty == tl.float32:
            for start in range(0, d, BLOCK_D):
                offs = start + cols
                x = tl.load(row_ptrs + offs[None, :], mask=present[:, None] & (offs[None, :] < d), other=0.0)
                out = tl.dot(core, x, input_precision="ieee") * out_scale[:, None]
                out = tl.where(present[:, None], out, 0.0)
                tl.store(grad_rows + offs[None, :], out, mask=in_range[:, None] & (offs[None, :] < d))
        else:
            # Two 16-bit tensor-core products (hi + lo split of the scaled fp32 matrix) keep
            # about 16 bits of B: the product is then as exact as the 16-bit output.
            scale = tl.max(tl.max(tl.abs(core), axis=1), axis=0)
            scale = tl.where(scale > 0.0, scale, 1.0)
            unit = core / scale
            hi = unit.to(reps_ptr.dtype.element_ty)
            lo = (unit - hi.to(tl.float32)).to(reps_ptr.dtype.element_ty)
            for start in range(0, d, BLOCK_D):
                offs = start + cols
                x = tl.load(row_ptrs + offs[None, :], mask=present[:, None] & (offs[None, :] < d), other=0.0)
                out = tl.dot(hi, x) + tl.dot(lo, x)
                out = out * (out_scale * scale)[:, None]
                out = tl.where(present[:, None], out, 0.0)
                out = out.to(reps_ptr.dtype.element_ty)
                tl.store(grad_rows + offs[None, :], out, mask=in_range[:, None] & (offs[None, :] < d))


@dataclass(frozen=True)
class KernelConfig:
    """A compile-time configuration of ``mlc_fused_kernel`` the dispatcher can pick."""

    m_pad: int
    block_d: int
    num_warps: int
    num_stages: int = 2


SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


_config_override: dict[int, KernelConfig] = {}


@contextlib.contextmanager
def kernel_config_override(configs: dict[int, KernelConfig]):
    """Benchmarks only: inside the block, launch with ``configs[m_pad]`` where given."""
    global _config_override
    previous, _config_override = _config_override, dict(configs)
    try:
        yield
    finally:
        _config_override = previous


def kernel_config(m: int, dtype: torch.dtype, arch: int = 90) -> KernelConfig:
    """The configuration the dispatcher uses for m variants of ``dtype`` on ``sm_<arch>``."""
    m_pad = 16 if m <= 16 else 32
    if m_pad in _config_override:
        return _config_override[m_pad]
    if dtype == torch.float32:  # IEEE fp32 FMA products; sized so that ptxas reports no spills
        if m_pad == 16:
            return KernelConfig(m_pad=16, block_d=64, num_warps=4, num_stages=2)
        return KernelConfig(m_pad=32, block_d=64, num_warps=8, num_stages=2)
    # 16-bit, from benchmarks/tune_triton.py on an H200 (results/nvidia-h200): for m_pad=16 two warps
    # beat four by 25% (the m x m phase is latency-bound; more CTAs per SM overlap it with streaming)
    # and 3 stages beat 2 by 35%; on sm_80 two warps spill, so older GPUs take four. For m_pad=32 one
    # warp was fastest but spills (ptxas: 332 bytes); two and four warps were within 2%.
    if m_pad == 32:
        return KernelConfig(m_pad=32, block_d=128, num_warps=4, num_stages=3)
    if arch >= 90:
        return KernelConfig(m_pad=16, block_d=128, num_warps=2, num_stages=3)
    return KernelConfig(m_pad=16, block_d=128, num_warps=4, num_stages=3)


AOT_ARCHS = (90, 80)


def all_kernel_configs() -> list[tuple[int, torch.dtype, KernelConfig]]:
    """Every (arch, dtype, configuration) ``kernel_config`` can return: what CI compiles ahead of time."""
    return [(arch, dt, kernel_config(m, dt, arch)) for arch in AOT_ARCHS for dt in SUPPORTED_DTYPES for m in (16, 32)]


def device_arch(device: torch.device) -> int:
    """``major * 10 + minor`` of a CUDA device (90 for Hopper); 90 for the CPU interpreter."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _patch_interpreter_bf16_dot() -> None:
    """Triton's interpreter (3.8) multiplies bfloat16 tiles as their raw uint16 storage in
    ``tl.dot``; convert them to fp32 first (exact) so the interpreter computes what the GPU does."""
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_mlc_bf16_dot_patched", False):
        return
    original = builder.create_dot

    def to_fp32(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        data = interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, to_fp32(a), to_fp32(b), d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
    builder._mlc_bf16_dot_patched = True


if interpreting():
    _patch_interpreter_bf16_dot()


@torch.library.triton_op("mlc_kernels::mlc_fused", mutates_args=())
def mlc_fused(
    reps: torch.Tensor, mask: torch.Tensor, tau: float, objective: int, write_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt loss ``(N,)`` fp32 and, if ``write_grad``, the per-prompt gradient ``(N, m, d)``."""
    n, m, d = reps.shape
    loss = torch.empty(n, dtype=torch.float32, device=reps.device)
    grad = torch.empty((n, m, d) if write_grad else (0, m, d), dtype=reps.dtype, device=reps.device)
    if n == 0:
        return loss, grad
    cfg = kernel_config(m, reps.dtype, device_arch(reps.device))
    torch.library.wrap_triton(mlc_fused_kernel)[(n,)](
        reps,
        mask,
        loss,
        grad if write_grad else reps,
        m,
        d,
        reps.stride(0),
        reps.stride(1),
        1.0 / tau,
        singular_value_cutoff(d, m, torch.float32),
        objective,
        write_grad,
        M_PAD=cfg.m_pad,
        BLOCK_D=cfg.block_d,
        N_SWEEPS=MAX_SWEEPS,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return loss, grad


@torch.library.triton_op("mlc_kernels::scale_rows_", mutates_args=("grad",))
def scale_rows_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """In place: ``grad[n] *= scale[n]`` (the backward of the fused kernel)."""
    grad.mul_(scale.to(grad.dtype)[:, None, None])


def _setup_context(ctx, inputs, output) -> None:
    # The gradient output is a buffer, not a differentiable result: autograd must not
    # materialise a reps-sized zero tensor as its incoming gradient.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss: torch.Tensor, _grad_grad: torch.Tensor):
    # The in-place scaling bumps the saved tensor's version: a second backward through the same
    # graph (retain_graph=True) is refused by autograd's saved-tensor check.
    (grad,) = ctx.saved_tensors
    if grad.shape[0] != grad_loss.shape[0]:
        raise RuntimeError("mlc_loss(impl='triton'): the forward ran without gradient; cannot backpropagate")
    torch.ops.mlc_kernels.scale_rows_(grad, grad_loss)
    return grad, None, None, None, None


torch.library.register_autograd("mlc_kernels::mlc_fused", _backward, setup_context=_setup_context)


def triton_mlc_loss(reps: torch.Tensor, present: torch.Tensor, tau: float, objective: str) -> torch.Tensor:
    """Per-prompt MLC loss ``(N,)`` fp32 through the fused kernel."""
    if reps.stride(-1) != 1:
        reps = reps.contiguous()
    write_grad = bool(reps.requires_grad and torch.is_grad_enabled())
    loss, _ = torch.ops.mlc_kernels.mlc_fused(
        reps, present.to(torch.uint8), float(tau), OBJECTIVES.index(objective), write_grad
    )
    return loss


__all__ = ["MAX_VARIANTS", "mlc_fused_kernel", "kernel_config", "all_kernel_configs", "triton_mlc_loss"]
