"""Implementations of the MLC loss and their registry, the one place that lists them.

- ``reference``: the literal formula (``reference.py``), ``torch``: the Gram route in torch ops
  (``gram_torch.py``), ``native``: the C++ CPU kernel (``native.py`` + ``csrc/``), ``triton``: the
  fused GPU kernel (``triton/``, imported on first use). Each backend exposes ``<name>_mlc_loss`` and
  ``<name>_loss_and_grad`` with the signature below; those with a registered op (native, triton) keep its
  fake/meta kernel next to it and choose op or direct launch by ``common.use_registered_op``.
- :data:`REGISTRY` holds one :class:`Implementation` record per name: its per-prompt loss
  ``fn(reps, present, tau, objective, anchor=False) -> (N,)`` (autograd-aware), its loss-and-gradient
  ``fn(...) -> (loss (N,), grad (N, m, d))`` without autograd (what the fused linear loss needs after
  its GEMM), and what it accepts (dtypes, variants, devices), checked by :meth:`Implementation.check`.
- :func:`resolve_impl` turns ``"auto"`` or an explicit name into the implementation that runs; an
  explicit one that cannot run raises (never a silent fallback).

The public entry point (reduction) is ``mlc_kernels.loss.mlc_loss``; its argument checks are ``mlc_kernels.checks``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .common import MAX_VARIANTS, all_present, interpreting, use_registered_op
from .gram_torch import torch_loss_and_grad, torch_mlc_loss
from .native import build_problem, native_loss_and_grad, native_mlc_loss, native_reduced_loss, usable_for_auto
from .reference import reference_loss_and_grad, reference_mlc_loss

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
    ``extra_check``: raises when the machine cannot run it (a missing package or compiler); ``mask_optional``:
    ``loss_fn`` takes ``present=None`` for "every variant present" (and then reads no mask); ``reduced_loss_fn``:
    ``fn(reps, mask_or_None, tau, objective, reduction) -> 0-dim loss`` with the ``"sum"``/``"mean"`` reduction
    and its backward inside the implementation (fewer host ops per call; eager calls only).
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
    mask_optional: bool = False
    reduced_loss_fn: Callable[..., torch.Tensor] | None = field(default=None, repr=False)

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
        if self.devices is not None and reps.device.type not in self.devices:  # the env read only off the list
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


# -- the capability checks and the lazy Triton entry points (triton is optional) ------------------------


def _native_check(reps: torch.Tensor) -> None:
    if reps.device.type == "meta":  # the fake kernel: nothing to build
        return
    problem = build_problem()
    if problem is not None:
        raise ImplementationUnavailableError(f"impl='native' could not be built: {problem}")


_TRITON_ENTRY: dict[str, Callable] = {}


def _triton_entry(name: str) -> Callable:
    """``ops.triton``'s entry point ``name``, imported on first use (triton is optional) and kept."""
    fn = _TRITON_ENTRY.get(name)
    if fn is None:
        from . import triton as backend

        fn = _TRITON_ENTRY[name] = getattr(backend, name)
    return fn


def _triton_loss(reps, present, tau, objective, anchor=False):
    return _triton_entry("triton_mlc_loss")(reps, present, tau, objective, anchor)


def _triton_loss_and_grad(reps, present, tau, objective, anchor=False):
    return _triton_entry("triton_loss_and_grad")(reps, present, tau, objective, anchor)


_TRITON_IMPORTABLE: list[bool] = []


@torch.compiler.assume_constant_result
def _triton_importable() -> bool:
    if not _TRITON_IMPORTABLE:  # asked once per process (an import attempt costs host time per call)
        try:
            import triton  # noqa: F401
        except ImportError:
            _TRITON_IMPORTABLE.append(False)
        else:
            _TRITON_IMPORTABLE.append(True)
    return _TRITON_IMPORTABLE[0]


def _triton_check(reps: torch.Tensor) -> None:
    if not _triton_importable():
        raise ImplementationUnavailableError("impl='triton' needs the triton package: pip install triton")


REGISTRY: dict[str, Implementation] = {
    impl.name: impl
    for impl in (
        Implementation("reference", reference_mlc_loss, reference_loss_and_grad),
        Implementation("torch", torch_mlc_loss, torch_loss_and_grad),
        Implementation(
            "native",
            native_mlc_loss,
            native_loss_and_grad,
            devices=("cpu", "meta"),
            device_hint="; impl='native' is the CPU kernel, use impl='torch' or 'triton' elsewhere",
            extra_check=_native_check,
            reduced_loss_fn=native_reduced_loss,
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
            mask_optional=True,
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


def call_loss(name: str, reps: torch.Tensor, mask: torch.Tensor | None, tau: float, objective: str,
              anchor: bool = False) -> torch.Tensor:  # fmt: skip
    """Implementation ``name``'s per-prompt loss of ``reps`` with ``mask`` ``(N, m)`` bool or None (every variant
    present): None is passed on to the implementations that take it (``mask_optional``), else a cached all-ones."""
    impl = _lookup(name)
    if mask is None and not impl.mask_optional:
        mask = all_present(reps)
    return impl.loss_fn(reps, mask, tau, objective, anchor)


def reduced_loss(name: str, reps: torch.Tensor) -> Callable[..., torch.Tensor] | None:
    """Implementation ``name``'s reduced loss (``Implementation.reduced_loss_fn``) for an eager call on ``reps``, or
    None (none, or ``torch.compile``/``meta``, where the registered per-prompt op and a torch reduction run)."""
    fn = _lookup(name).reduced_loss_fn
    return None if fn is None or use_registered_op(reps) else fn


def per_prompt_loss_and_grad(name: str) -> LossAndGradFn:
    """``fn(reps, present, tau, objective, anchor=False) -> (loss (N,), grad (N, m, d))``: the unscaled gradient
    of each prompt's loss w.r.t. its rows, in the dtype of reps; no autograd graph."""
    return _lookup(name).loss_and_grad_fn
