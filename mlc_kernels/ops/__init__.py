"""Implementations of the MLC loss and their registry.

- ``reference``: the literal formula (``reference.py``), ``torch``: the Gram route in torch ops
  (``gram_torch.py``), ``native``: the C++ CPU kernel (``native.py`` + ``csrc/``), ``triton``: the
  fused GPU kernel (``triton_kernels.py``).
- :func:`per_prompt_loss` gives the autograd-aware ``fn(reps, present, tau, objective, anchor=False) -> (N,)``;
  :func:`per_prompt_loss_and_grad` the forward that also returns the per-prompt gradient
  ``(N, m, d)`` without autograd (what the fused linear loss needs after its GEMM).

The public dispatcher (argument checks, ``impl="auto"``) lives in ``mlc_kernels.loss``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LossFn = Callable[..., torch.Tensor]
"""``fn(reps, present, tau, objective, anchor=False) -> (N,)``."""
LossAndGradFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
"""``fn(reps, present, tau, objective, anchor=False) -> (loss (N,), grad (N, m, d))``."""


def per_prompt_loss(name: str) -> LossFn:
    """The per-prompt loss of implementation ``name`` (differentiable w.r.t. reps)."""
    if name == "reference":
        from .reference import reference_mlc_loss

        return reference_mlc_loss
    if name == "torch":
        from .gram_torch import torch_mlc_loss

        return torch_mlc_loss
    if name == "native":
        from .native import native_mlc_loss

        return native_mlc_loss
    if name == "triton":
        return _triton_loss
    raise ValueError(f"unknown implementation {name!r}")


def _triton_loss(reps, present, tau, objective, anchor=False):
    from .triton_kernels import triton_mlc_loss

    return triton_mlc_loss(reps, present, tau, objective, anchor)


def _reference_loss_and_grad(reps, present, tau, objective, anchor=False):
    from .reference import reference_mlc_loss

    with torch.enable_grad():
        leaf = reps.detach().requires_grad_()
        loss = reference_mlc_loss(leaf, present, tau, objective, anchor)
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
    return loss.detach(), grad


def _torch_loss_and_grad(reps, present, tau, objective, anchor=False):
    from .gram_torch import gram_loss_and_backward_matrix

    loss, bmat = gram_loss_and_backward_matrix(reps, present, tau, objective, anchor)
    rows = torch.where(present[..., None], reps.to(bmat.dtype), 0.0)
    with torch.autocast(reps.device.type, enabled=False):
        return loss, (bmat @ rows).to(reps.dtype)


def _native_loss_and_grad(reps, present, tau, objective, anchor=False):
    from .native import native_loss_and_grad

    return native_loss_and_grad(reps, present, tau, objective, write_grad=True, anchor=anchor)


def _triton_loss_and_grad(reps, present, tau, objective, anchor=False):
    from .triton_kernels import triton_loss_and_grad

    return triton_loss_and_grad(reps, present, tau, objective, anchor)


def per_prompt_loss_and_grad(name: str) -> LossAndGradFn:
    """``fn(reps, present, tau, objective, anchor=False) -> (loss (N,), grad (N, m, d))``: the unscaled gradient
    of each prompt's loss w.r.t. its rows, in the dtype of reps; no autograd graph."""
    table = {
        "reference": _reference_loss_and_grad,
        "torch": _torch_loss_and_grad,
        "native": _native_loss_and_grad,
        "triton": _triton_loss_and_grad,
    }
    if name not in table:
        raise ValueError(f"unknown implementation {name!r}")
    return table[name]
