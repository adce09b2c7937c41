"""The Triton backend's ops and entry points: ``mlc_kernels::mlc_forward`` and ``mlc_kernels::mlc_grad``
(``torch.library.triton_op``, so that ``torch.compile`` sees them) with their meta kernels and autograd
formula, the eager path that skips the op dispatch, and :func:`triton_mlc_loss` / :func:`triton_loss_and_grad`.
"""

from __future__ import annotations

import torch

from ..common import OBJECTIVES, use_registered_op
from .launch import _direct, forward_launch, grad_launch, launch_config, prepare


@torch.library.triton_op("mlc_kernels::mlc_forward", mutates_args=())
def mlc_forward(
    reps: torch.Tensor, mask: torch.Tensor | None, tau: float, objective: int, anchor: bool, write_b: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt loss ``(N,)`` fp32 and, if ``write_b``, ``B`` ``(N, M_PAD, M_PAD)`` fp32 (else ``(0, ...)``).

    ``reps``: ``(N, m, d)`` fp32/bf16/fp16 with unit stride on d; ``mask``: ``(N, m)`` uint8 or None (all present).
    """
    if reps.device.type == "meta":
        return _forward_meta(reps, mask, tau, objective, anchor, write_b)
    return forward_launch(reps, mask, tau, objective, anchor, write_b, torch.library.wrap_triton)


@torch.library.triton_op("mlc_kernels::mlc_grad", mutates_args=())
def mlc_grad(reps: torch.Tensor, mask: torch.Tensor | None, bmat: torch.Tensor, gscale: torch.Tensor) -> torch.Tensor:
    """``gscale[n] * B[n] @ reps[n]``: ``(N, m, d)`` in the dtype of reps (masked rows zero).

    ``bmat``: ``(N, M_PAD, M_PAD)`` fp32 from :func:`mlc_forward`; ``gscale``: ``(N,)`` fp32.
    """
    if reps.device.type == "meta":
        return _grad_meta(reps, mask, bmat, gscale)
    return grad_launch(reps, mask, bmat, gscale, torch.library.wrap_triton)


# Meta kernels: the ops' own implementation would launch the kernels on meta tensors (torch.compile's fake
# tensors trace the implementation and need none of this). Some torch versions (2.11) register the
# implementation itself for the Meta key (``triton_op``'s ``register_fake``); there the implementation's own
# meta branch answers instead.
def _forward_meta(reps, mask, tau, objective, anchor, write_b):
    pad = launch_config(reps).m_pad
    bmat = reps.new_empty((reps.shape[0] if write_b else 0, pad, pad), dtype=torch.float32)
    return reps.new_empty(reps.shape[0], dtype=torch.float32), bmat


def _grad_meta(reps, mask, bmat, gscale):
    return torch.empty_like(reps, memory_format=torch.contiguous_format)


def _register_meta(op, kernel) -> None:
    try:
        op.register_kernel("meta")(kernel)
    except RuntimeError as exc:
        if "already a kernel registered" not in str(exc):
            raise


_register_meta(mlc_forward, _forward_meta)
_register_meta(mlc_grad, _grad_meta)


def _setup_context(ctx, inputs, output) -> None:
    reps, mask, *_ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(reps, mask, output[1])


def _backward(ctx, grad_loss: torch.Tensor | None, _grad_bmat: torch.Tensor | None):
    reps, mask, bmat = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None, None, None, None
    if bmat.shape[0] != reps.shape[0]:
        raise RuntimeError("mlc_loss(impl='triton'): the forward ran without gradient; cannot backpropagate")
    grad = torch.ops.mlc_kernels.mlc_grad(reps, mask, bmat, grad_loss.to(torch.float32))
    return grad, None, None, None, None, None


mlc_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerTritonMLC(torch.autograd.Function):
    """The same launches as the registered ops, without the custom-op dispatch (about half a
    millisecond of host time per forward+backward in eager mode, which small batches wait for)."""

    @staticmethod
    def forward(ctx, reps, mask, tau: float, objective: int, anchor: bool):
        loss, bmat = forward_launch(reps, mask, tau, objective, anchor, True)
        ctx.save_for_backward(reps, mask, bmat)
        ctx.plan_key = (tau, objective)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        reps, mask, bmat = ctx.saved_tensors
        if grad_loss.dtype != torch.float32:  # the kernel reads it with its stride (0 after a mean: no copy)
            grad_loss = grad_loss.to(torch.float32)
        return grad_launch(reps, mask, bmat, grad_loss, _direct, *ctx.plan_key), None, None, None, None


_UNIT: dict[torch.device, torch.Tensor] = {}


def _unit_scale(reps: torch.Tensor) -> torch.Tensor:
    """``(N,)`` fp32 ones as a stride-0 view of one cached element (no per-call fill)."""
    unit = _UNIT.get(reps.device)
    if unit is None:
        unit = _UNIT[reps.device] = torch.ones(1, dtype=torch.float32, device=reps.device)
    return unit.expand(reps.shape[0])


def triton_mlc_loss(
    reps: torch.Tensor, present: torch.Tensor | None, tau: float, objective: str, anchor: bool = False
) -> torch.Tensor:
    """Per-prompt MLC loss ``(N,)`` fp32; differentiable w.r.t. ``reps`` ``(N, m, d)``.

    ``present``: ``(N, m)`` bool, or None (every variant present: no mask is read); ``anchor``: no gradient to
    each prompt's base row (its first present variant); the loss is unchanged.
    """
    reps, mask = prepare(reps, present)
    write_b = bool(reps.requires_grad and torch.is_grad_enabled())
    code = OBJECTIVES.index(objective)
    if use_registered_op(reps):
        return torch.ops.mlc_kernels.mlc_forward(reps, mask, float(tau), code, bool(anchor), write_b)[0]
    if write_b:
        return _EagerTritonMLC.apply(reps, mask, float(tau), code, bool(anchor))
    return forward_launch(reps, mask, float(tau), code, bool(anchor), False)[0]


def triton_loss_and_grad(
    reps: torch.Tensor, present: torch.Tensor | None, tau: float, objective: str, anchor: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss (N,) fp32, grad (N, m, d))``: each prompt's loss and its unscaled gradient, no autograd."""
    reps, mask = prepare(reps.detach(), present)
    code = OBJECTIVES.index(objective)
    args = (reps, mask, float(tau), code, bool(anchor), True)
    if use_registered_op(reps):
        loss, bmat = torch.ops.mlc_kernels.mlc_forward(*args)
        ones = torch.ones(reps.shape[0], dtype=torch.float32, device=reps.device)
        return loss, torch.ops.mlc_kernels.mlc_grad(reps, mask, bmat, ones)
    loss, bmat = forward_launch(*args)
    return loss, grad_launch(reps, mask, bmat, _unit_scale(reps), _direct, float(tau), code)
