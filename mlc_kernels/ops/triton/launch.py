"""Launching the Triton kernels: the inputs as the kernels read them, the configuration of each call, the forward
(Gram, small, deflation) and gradient launches, and the interpreter's bf16 ``tl.dot`` patch.

The launches take ``wrap``: ``torch.library.wrap_triton`` inside the registered ops (``op.py``), the kernel as
it is in eager calls.
"""

from __future__ import annotations

import torch
import triton
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
    tile_size,
)
from .kernels import mlc_grad_kernel, mlc_gram_kernel, mlc_residual_kernel, mlc_small_kernel

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


def prepare(reps: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(reps, mask)`` as the kernels read them: reps with unit stride on d, ``(N, m)`` uint8 contiguous mask."""
    return (reps if reps.stride(-1) == 1 else reps.contiguous()), present.to(torch.uint8).contiguous()


def launch_config(reps: torch.Tensor) -> KernelConfig:
    """The configuration of a call on ``reps``: ``INTERPRETER_CONFIG`` under ``TRITON_INTERPRET=1`` (unless
    ``kernel_config_override`` gives one), else ``kernel_config`` for the device's arch."""
    m_pad = tile_size(reps.shape[1])
    if interpreting() and config_override(m_pad) is None:
        return INTERPRETER_CONFIG[m_pad]
    return kernel_config(reps.shape[1], reps.dtype, device_arch(reps.device))


def _direct(kernel):
    """Eager launches skip ``torch.library.wrap_triton``: the kernel is called as it is."""
    return kernel


def forward_launch(
    reps: torch.Tensor, mask: torch.Tensor, tau: float, objective: int, anchor: bool, write_b: bool, wrap=_direct
) -> tuple[torch.Tensor, torch.Tensor]:
    """Phases 1-2: loss ``(N,)`` fp32 and, if ``write_b``, ``B`` ``(N, M_PAD, M_PAD)`` fp32 (else ``(0, ...)``)."""
    n, m, d = reps.shape
    cfg = launch_config(reps)
    loss = torch.empty(n, dtype=torch.float32, device=reps.device)
    bmat = torch.empty((n if write_b else 0, cfg.m_pad, cfg.m_pad), dtype=torch.float32, device=reps.device)
    if n == 0:
        return loss, bmat
    splits, chunk = gram_splits(n, d, cfg)
    part = torch.empty((n, splits, cfg.m_pad, cfg.m_pad), dtype=torch.float32, device=reps.device)
    wrap(mlc_gram_kernel)[(n, splits)](
        reps, mask, part, m, d, reps.stride(0), reps.stride(1), chunk, splits,
        M_PAD=cfg.m_pad, BLOCK_D=cfg.gram_block_d, num_warps=cfg.gram_warps, num_stages=cfg.gram_stages,
    )  # fmt: skip
    # rank1 needs only (lambda_1, v_1), which deflation keeps: only the softmax objectives deflate
    deflate = objective in DEFLATED_OBJECTIVES
    defl = torch.empty((n if deflate else 0, 3, cfg.m_pad), dtype=torch.float32, device=reps.device)
    r_splits, r_chunk = gram_splits(n, d, cfg, cfg.resid_block_d)
    resid = torch.empty((n if deflate else 0, r_splits, cfg.m_pad, cfg.m_pad), dtype=torch.float32,
                        device=reps.device)  # fmt: skip
    small_args = (
        part, mask, loss, bmat if write_b else loss, defl if deflate else loss, resid if deflate else loss,
        n, m, d, splits, r_splits, 1.0 / tau, singular_value_cutoff(d, m, torch.float32),
        float(common.DEFLATION_RATIO), deflated_cutoff(m, torch.float32), objective, anchor, write_b, deflate,
    )  # fmt: skip
    small_grid = (triton.cdiv(n, cfg.small_prompts),)
    small_meta = {"M_PAD": cfg.m_pad, "PROMPTS": cfg.small_prompts, "N_SWEEPS": MAX_SWEEPS,
                  "num_warps": cfg.small_warps, "num_stages": 1}  # fmt: skip
    wrap(mlc_small_kernel)[small_grid](*small_args, DEFLATE=False, **small_meta)
    if deflate:  # prompts not flagged by the first pass exit after reading their flag
        wrap(mlc_residual_kernel)[(n, r_splits)](
            reps, mask, defl, resid, m, d, reps.stride(0), reps.stride(1), r_chunk, r_splits,
            M_PAD=cfg.m_pad, BLOCK_D=cfg.resid_block_d, num_warps=cfg.resid_warps, num_stages=cfg.resid_stages,
        )  # fmt: skip
        wrap(mlc_small_kernel)[small_grid](*small_args, DEFLATE=True, **small_meta)
    return loss, bmat


def grad_launch(
    reps: torch.Tensor, mask: torch.Tensor, bmat: torch.Tensor, gscale: torch.Tensor, wrap=_direct
) -> torch.Tensor:
    """Phase 3: ``gscale[n] * B[n] @ reps[n]``, ``(N, m, d)`` in the dtype of reps."""
    n, m, d = reps.shape
    grad = torch.empty((n, m, d), dtype=reps.dtype, device=reps.device)
    if n == 0 or d == 0:
        return grad
    cfg = launch_config(reps)
    chunk = cfg.grad_block_d * cfg.grad_blocks
    wrap(mlc_grad_kernel)[(n, triton.cdiv(d, chunk))](
        reps, mask, bmat, gscale, grad, m, d, reps.stride(0), reps.stride(1), chunk,
        M_PAD=cfg.m_pad, BLOCK_D=cfg.grad_block_d, num_warps=cfg.grad_warps, num_stages=cfg.grad_stages,
    )  # fmt: skip
    return grad

