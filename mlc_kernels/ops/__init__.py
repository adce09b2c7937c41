"""Implementations of the MLC loss and their registry, the one place that lists them.

- ``reference``: the literal formula (``reference.py``), ``torch``: the Gram route in torch ops
  (``gram_torch.py``), ``native``: the C++ CPU kernel (``native.py`` + ``csrc/``), ``triton``: the
  fused GPU kernel (``triton_kernels.py``).
- :data:`REGISTRY` holds one :class:`Implementation` record per name: its per-prompt loss
  ``fn(reps, present, tau, objective, anchor=False) -> (N,)`` (autograd-aware), its loss-and-gradient
  ``fn(...) -> (loss (N,), grad (N, m, d))`` without autograd (what the fused linear loss needs after
  its GEMM), and what it accepts (dtypes, variants, devices), checked by :meth:`Implementation.check`.
- :func:`resolve_impl` turns ``"auto"`` or an explicit name into the implementation that runs; an
  explicit one that cannot run raises (never a silent fallback).

The public entry point (argument checks, reduction) is ``mlc_kernels.loss.mlc_loss``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .common import MAX_VARIANTS, OBJECTIVES, autocast_off, interpreting

LossFn = Callable[..., torch.Tensor]
"""``fn(reps, present, tau, objective, anchor=False) -> (N,)``."""
LossAndGradFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
"""``fn(reps, present, tau, objective, anchor=False) -> (loss (N,), grad (N, m, d))``."""

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ImplementationUnavailableError(RuntimeError):
    """An explicitly requested ``impl`` cannot run on this input or machine (never a silent fallback)."""


def _dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    names = [str(dt).removeprefix("torch.") for dt in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


@dataclass(frozen=True)
class Implementation:
    """One implementation of the MLC loss and what it accepts.

    ``devices``: device types it runs on (``meta`` through its fake kernel); ``interpreted_devices``:
    more device types under ``TRITON_INTERPRET=1``; ``max_variants``: the largest m (None: any);
    ``extra_check``: raises when the machine cannot run it (a missing package or compiler).
    """

    name: str
    loss_fn: LossFn
    loss_and_grad_fn: LossAndGradFn
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    max_variants: int | None = None
    devices: tuple[str, ...] | None = None
    interpreted_devices: tuple[str, ...] = ()
    device_hint: str = ""
    extra_check: Callable[[torch.Tensor], None] | None = field(default=None, repr=False)

    def check(self, reps: torch.Tensor) -> None:
        """Raise (``TypeError``/``ValueError``/:class:`ImplementationUnavailableError`, naming the argument)
        unless this implementation can run on ``reps``."""
        tag = f"impl={self.name!r}"
        if reps.dtype not in self.dtypes:
            raise TypeError(
                f"{tag} takes reps in {_dtype_names(self.dtypes)}, got {reps.dtype}; use impl='torch' for {reps.dtype}"
            )
        if self.max_variants is not None and reps.shape[1] > self.max_variants:
            raise ValueError(
                f"{tag} supports at most {self.max_variants} variants per prompt (reps.shape[1]), "
                f"got {reps.shape[1]}; use impl='torch' for more"
            )
        if self.devices is not None:
            allowed = self.devices + (self.interpreted_devices if interpreting() else ())
            if reps.device.type not in allowed:
                raise ImplementationUnavailableError(
                    f"{tag} needs reps on {' or '.join(self.devices)}, got reps on {reps.device}{self.device_hint}"
                )
        if self.extra_check is not None:
            self.extra_check(reps)

    def runs_on(self, reps: torch.Tensor) -> bool:
        """True when :meth:`check` passes."""
        try:
            self.check(reps)
        except (ImplementationUnavailableError, TypeError, ValueError):
            return False
        return True


# -- the per-implementation functions (imported lazily: triton and the native build are optional) --


def _reference_loss(reps, present, tau, objective, anchor=False):
    from .reference import reference_mlc_loss

    return reference_mlc_loss(reps, present, tau, objective, anchor)


def _reference_loss_and_grad(reps, present, tau, objective, anchor=False):
    from .reference import reference_mlc_loss

    with torch.enable_grad():
        leaf = reps.detach().requires_grad_()
        loss = reference_mlc_loss(leaf, present, tau, objective, anchor)
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
    return loss.detach(), grad


def _torch_loss(reps, present, tau, objective, anchor=False):
    from .gram_torch import torch_mlc_loss

    return torch_mlc_loss(reps, present, tau, objective, anchor)


def _torch_loss_and_grad(reps, present, tau, objective, anchor=False):
    from .gram_torch import gram_loss_and_backward_matrix

    loss, bmat = gram_loss_and_backward_matrix(reps, present, tau, objective, anchor)
    rows = torch.where(present[..., None], reps.to(bmat.dtype), 0.0)
    with autocast_off(reps.device):
        return loss, (bmat @ rows).to(reps.dtype)


def _native_loss(reps, present, tau, objective, anchor=False):
    from .native import native_mlc_loss

    return native_mlc_loss(reps, present, tau, objective, anchor)


def _native_loss_and_grad(reps, present, tau, objective, anchor=False):
    from .native import native_loss_and_grad

    return native_loss_and_grad(reps, present, tau, objective, write_grad=True, anchor=anchor)


def _native_check(reps: torch.Tensor) -> None:
    if reps.device.type == "meta":  # the fake kernel: nothing to build
        return
    from .native import build_problem

    problem = build_problem()
    if problem is not None:
        raise ImplementationUnavailableError(f"impl='native' could not be built: {problem}")


def _triton_loss(reps, present, tau, objective, anchor=False):
    from . import triton_kernels

    if reps.device.type == "meta":  # the registered op, whose meta kernels give the shapes
        _register_triton_meta_kernels()
        reps, mask = triton_kernels._prepare(reps, present)
        write_b = bool(reps.requires_grad and torch.is_grad_enabled())
        code = OBJECTIVES.index(objective)
        return torch.ops.mlc_kernels.mlc_forward(reps, mask, float(tau), code, bool(anchor), write_b)[0]
    return triton_kernels.triton_mlc_loss(reps, present, tau, objective, anchor)


def _triton_loss_and_grad(reps, present, tau, objective, anchor=False):
    if reps.device.type == "meta":
        return reps.new_empty(reps.shape[0], dtype=torch.float32), torch.empty_like(reps)
    from .triton_kernels import triton_loss_and_grad

    return triton_loss_and_grad(reps, present, tau, objective, anchor)


@functools.cache
def _register_triton_meta_kernels() -> None:
    """Meta kernels of the Triton ops (their own implementation would launch the kernels on meta
    tensors; ``torch.compile``'s fake tensors need none of this)."""
    from . import triton_kernels

    def forward_meta(reps, mask, tau, objective, anchor, write_b):
        pad = triton_kernels._launch_config(reps).m_pad
        bmat = reps.new_empty((reps.shape[0] if write_b else 0, pad, pad), dtype=torch.float32)
        return reps.new_empty(reps.shape[0], dtype=torch.float32), bmat

    def grad_meta(reps, mask, bmat, gscale):
        return torch.empty_like(reps, memory_format=torch.contiguous_format)

    torch.library.register_kernel("mlc_kernels::mlc_forward", "meta", forward_meta)
    torch.library.register_kernel("mlc_kernels::mlc_grad", "meta", grad_meta)


@torch.compiler.assume_constant_result
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_check(reps: torch.Tensor) -> None:
    if not _triton_importable():
        raise ImplementationUnavailableError("impl='triton' needs the triton package: pip install triton")


REGISTRY: dict[str, Implementation] = {
    impl.name: impl
    for impl in (
        Implementation("reference", _reference_loss, _reference_loss_and_grad),
        Implementation("torch", _torch_loss, _torch_loss_and_grad),
        Implementation(
            "native",
            _native_loss,
            _native_loss_and_grad,
            devices=("cpu", "meta"),
            device_hint="; impl='native' is the CPU kernel, use impl='torch' or 'triton' elsewhere",
            extra_check=_native_check,
        ),
        Implementation(
            "triton",
            _triton_loss,
            _triton_loss_and_grad,
            dtypes=(torch.float32, torch.bfloat16, torch.float16),
            max_variants=MAX_VARIANTS,
            devices=("cuda", "meta"),
            interpreted_devices=("cpu",),
            device_hint="; set TRITON_INTERPRET=1 to run the kernel on CPU through Triton's interpreter, "
            "or use impl='torch'",
            extra_check=_triton_check,
        ),
    )
}
"""Every implementation by name; ``"auto"`` is not one of them but a rule (:func:`resolve_impl`)."""

IMPLEMENTATION_NAMES: tuple[str, ...] = ("auto", *REGISTRY)
"""What ``impl=`` accepts: ``"auto"`` and the registry's names."""


def auto_impl(reps: torch.Tensor) -> str:
    """What ``impl="auto"`` runs for ``reps``: ``triton`` on CUDA when it can run (fp32/bf16/fp16,
    m <= ``MAX_VARIANTS``, triton installed), else ``torch``; on CPU ``native`` when it builds (else
    ``torch``, with a one-time warning); ``torch`` anywhere else, ``meta`` included (a meta tensor
    has no real device to choose for)."""
    if reps.device.type == "cuda":
        return "triton" if REGISTRY["triton"].runs_on(reps) else "torch"
    if reps.device.type == "cpu":
        from .native import usable_for_auto

        if usable_for_auto():
            return "native"
    return "torch"


def resolve_impl(impl: str, reps: torch.Tensor) -> str:
    """The implementation ``impl`` means for ``reps``; raises if an explicit one cannot run (see :func:`auto_impl`)."""
    if impl not in IMPLEMENTATION_NAMES:
        raise ValueError(f"impl must be one of {IMPLEMENTATION_NAMES}, got {impl!r}")
    if impl == "auto":
        return auto_impl(reps)
    REGISTRY[impl].check(reps)
    return impl


def _lookup(name: str) -> Implementation:
    if name not in REGISTRY:
        raise ValueError(f"unknown implementation {name!r}; one of {tuple(REGISTRY)}")
    return REGISTRY[name]


def per_prompt_loss(name: str) -> LossFn:
    """The per-prompt loss of implementation ``name`` (differentiable w.r.t. reps)."""
    return _lookup(name).loss_fn


def per_prompt_loss_and_grad(name: str) -> LossAndGradFn:
    """``fn(reps, present, tau, objective, anchor=False) -> (loss (N,), grad (N, m, d))``: the unscaled gradient
    of each prompt's loss w.r.t. its rows, in the dtype of reps; no autograd graph."""
    return _lookup(name).loss_and_grad_fn
