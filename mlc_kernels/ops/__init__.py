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

import functools
from collections.abc import Callable

import torch

LossFn = Callable[..., torch.Tensor]
"""``fn(reps, present, tau, objective, anchor=False) -> (N,)``."""
LossAndGradFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
"""``fn(reps, present, tau, objective, anchor=False) -> (loss (N,), grad (N, m, d))``."""


@functools.cache
def _triton_takes_anchor() -> bool:
    """Whether the registered Triton op has the redesigned schema (signed objectives and ``anchor``)."""
    from .triton_kernels import mlc_fused  # noqa: F401  (registers the op)

    schema = torch.ops.mlc_kernels.mlc_fused.default._schema
    return any(arg.name == "anchor" for arg in schema.arguments)


def _check_triton_options(objective: str, anchor: bool) -> bool:
    """True when the op takes ``anchor``; raises for what an older kernel cannot do.

    Shim until the kernel redesign lands: the older kernel knows objective codes 0-2 and has no anchor flag.
    """
    from .common import SIGNED_OBJECTIVES

    if _triton_takes_anchor():
        return True
    if anchor or objective in SIGNED_OBJECTIVES:  # until the kernel redesign lands
        raise NotImplementedError(
            f"impl='triton': this Triton kernel does not implement anchor=True or objective={objective!r} yet; "
            "use impl='torch'"
        )
    return False


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

    if _check_triton_options(objective, anchor):
        return triton_mlc_loss(reps, present, tau, objective, anchor)
    return triton_mlc_loss(reps, present, tau, objective)  # until the kernel redesign lands


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
    from .common import OBJECTIVES

    reps = reps if reps.stride(-1) == 1 else reps.contiguous()
    args = (reps, present.to(torch.uint8), float(tau), OBJECTIVES.index(objective))
    if _check_triton_options(objective, anchor):
        return torch.ops.mlc_kernels.mlc_fused(*args, bool(anchor), True)
    return torch.ops.mlc_kernels.mlc_fused(*args, True)  # until the kernel redesign lands


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
