"""Launching the Triton kernels: the inputs as the kernels read them, the launch plan of each (shape, dtype, device,
objective, tau) (configuration, grids, splits and scalars, computed once and cached), the forward (Gram, small,
deflation) and gradient launches, and the interpreter's bf16 ``tl.dot`` patch.

The launches take ``wrap``: ``torch.library.wrap_triton`` inside the registered ops (``op.py``), the kernel as
it is in eager calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton.language as tl

from .. import common
from ..common import deflated_cutoff, interpreting, singular_value_cutoff
from .configs import (
    INTERPRETER_CONFIG,
    MAX_SWEEPS,
    KernelConfig,
    config_override,
    device_arch,
    gram_splits,
    kernel_config,
    override_epoch,
    tile_size,
)
from .kernels import mlc_grad_kernel, mlc_gram_kernel, mlc_small_kernel

DEFLATED_OBJECTIVES = (0, 5, 6)
"""Codes of the objectives whose gradient needs the small singular pairs: they deflate near collinearity
(``ops.common.DEFLATION_RATIO``). rank1 needs only (lambda_1, v_1), which deflation leaves as they are."""


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


def prepare(reps: torch.Tensor, present: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(reps, mask)`` as the kernels read them: reps with unit stride on d; the ``(N, m)`` bool mask viewed as
    uint8 (no copy when contiguous), None without one (the kernels' ``HAS_MASK=False``: every row present)."""
    if reps.stride(-1) != 1:
        reps = reps.contiguous()
    if present is None:
        return reps, None
    if not present.is_contiguous():
        present = present.contiguous()
    return reps, (present.view(torch.uint8) if present.dtype == torch.bool else present.to(torch.uint8))


def launch_config(reps: torch.Tensor) -> KernelConfig:
    """The configuration of a call on ``reps``: ``INTERPRETER_CONFIG`` under ``TRITON_INTERPRET=1`` (unless
    ``kernel_config_override`` gives one), else ``kernel_config`` for the device's arch."""
    m_pad = tile_size(reps.shape[1])
    if interpreting() and config_override(m_pad) is None:
        return INTERPRETER_CONFIG[m_pad]
    return kernel_config(reps.shape[1], reps.dtype, device_arch(reps.device))


@dataclass(frozen=True)
class LaunchPlan:
    """Everything about a call that depends only on (shape, dtype, device, objective, tau): the configuration,
    the grids and d-slices of each kernel, the small kernel's scalars and compile-time arguments."""

    cfg: KernelConfig
    deflate: bool
    splits: int
    chunk: int
    grad_chunk: int
    gram_grid: tuple[int, int]
    small_grid: tuple[int]
    grad_grid: tuple[int, int]
    scalars: tuple  # inv_tau, sv_cutoff, defl_ratio, defl_cutoff, objective
    gram_meta: dict
    small_meta: dict
    grad_meta: dict


_PLANS: dict[tuple, LaunchPlan] = {}
_MAX_PLANS = 512


def small_resid_block_d(cfg: KernelConfig) -> int:
    """``RESID_BLOCK_D`` of the small kernel's residual Gram (deflated prompts): ``resid_block_d`` scaled to the small
    kernel's warps, so that each thread holds as many elements of the tile as with ``resid_warps``; at least 16
    (``tl.dot``'s smallest K)."""
    return max(16, cfg.resid_block_d * cfg.small_warps // cfg.resid_warps)


def _build_plan(reps: torch.Tensor, tau: float, objective: int) -> LaunchPlan:
    n, m, d = reps.shape
    cfg = launch_config(reps)
    splits, chunk = gram_splits(n, d, cfg)
    grad_chunk = cfg.grad_block_d * cfg.grad_blocks
    # rank1 needs only (lambda_1, v_1), which deflation keeps: only the softmax objectives deflate
    deflate = objective in DEFLATED_OBJECTIVES
    scalars = (1.0 / tau, singular_value_cutoff(d, m, torch.float32),
               float(common.DEFLATION_RATIO), deflated_cutoff(m, torch.float32), objective)  # fmt: skip
    return LaunchPlan(
        cfg, deflate, splits, chunk, grad_chunk,
        gram_grid=(n, splits), small_grid=(-(-n // cfg.small_prompts),), grad_grid=(n, -(-max(d, 1) // grad_chunk)),
        scalars=scalars,
        gram_meta={"M_PAD": cfg.m_pad, "BLOCK_D": cfg.gram_block_d, "num_warps": cfg.gram_warps,
                   "num_stages": cfg.gram_stages},
        small_meta={"M_PAD": cfg.m_pad, "PROMPTS": cfg.small_prompts, "N_SWEEPS": MAX_SWEEPS,
                    "RESID_BLOCK_D": small_resid_block_d(cfg), "num_warps": cfg.small_warps, "num_stages": 1},
        grad_meta={"M_PAD": cfg.m_pad, "BLOCK_D": cfg.grad_block_d, "num_warps": cfg.grad_warps,
                   "num_stages": cfg.grad_stages},
    )  # fmt: skip


def launch_plan(reps: torch.Tensor, tau: float, objective: int) -> LaunchPlan:
    """The cached :class:`LaunchPlan` of a call on ``reps`` (built on first use of its key)."""
    key = (reps.shape, reps.dtype, reps.device, tau, objective, override_epoch())
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = _build_plan(reps, tau, objective)
    return plan


def _direct(kernel):
    """Eager launches skip ``torch.library.wrap_triton``: the kernel is called as it is."""
    return kernel


def forward_launch(
    reps: torch.Tensor,
    mask: torch.Tensor | None,
    tau: float,
    objective: int,
    anchor: bool,
    write_b: bool,
    wrap=_direct,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Phases 1-2: loss ``(N,)`` fp32 and, if ``write_b``, ``B`` ``(N, M_PAD, M_PAD)`` fp32 (else ``(0, ...)``).
    ``mask``: ``(N, m)`` uint8, or None when every variant is present."""
    n, m, d = reps.shape
    plan = launch_plan(reps, tau, objective)
    m_pad = plan.cfg.m_pad
    device = reps.device
    loss = torch.empty(n, dtype=torch.float32, device=device)
    bmat = torch.empty((n if write_b else 0, m_pad, m_pad), dtype=torch.float32, device=device)
    if n == 0:
        return loss, bmat
    has_mask = mask is not None
    mask_arg = mask if has_mask else loss  # never read without HAS_MASK
    part = torch.empty((n, plan.splits, m_pad, m_pad), dtype=torch.float32, device=device)
    wrap(mlc_gram_kernel)[plan.gram_grid](
        reps, mask_arg, part, m, d, reps.stride(0), reps.stride(1), plan.chunk, plan.splits,
        HAS_MASK=has_mask, **plan.gram_meta,
    )  # fmt: skip
    deflate = plan.deflate
    defl = torch.empty((n, 3, m_pad), dtype=torch.float32, device=device) if deflate else loss  # scratch
    wrap(mlc_small_kernel)[plan.small_grid](
        part, mask_arg, loss, bmat if write_b else loss, defl, reps, n, m, d, reps.stride(0), reps.stride(1),
        plan.splits, *plan.scalars, anchor, write_b, deflate, HAS_MASK=has_mask, **plan.small_meta,
    )  # fmt: skip
    return loss, bmat


def grad_launch(
    reps: torch.Tensor,
    mask: torch.Tensor | None,
    bmat: torch.Tensor,
    gscale: torch.Tensor,
    wrap=_direct,
    tau: float = 1.0,
    objective: int = 0,
) -> torch.Tensor:
    """Phase 3: ``gscale[n] * B[n] @ reps[n]``, ``(N, m, d)`` in the dtype of reps. ``gscale``: ``(N,)`` fp32, any
    stride (0: one scale for every prompt); ``tau``/``objective`` pick the forward's cached plan."""
    n, m, d = reps.shape
    grad = torch.empty((n, m, d), dtype=reps.dtype, device=reps.device)
    if n == 0 or d == 0:
        return grad
    plan = launch_plan(reps, tau, objective)
    wrap(mlc_grad_kernel)[plan.grad_grid](
        reps, mask if mask is not None else bmat, bmat, gscale, grad, gscale.stride(0), m, d, reps.stride(0),
        reps.stride(1), plan.grad_chunk, HAS_MASK=mask is not None, **plan.grad_meta,
    )  # fmt: skip
    return grad
