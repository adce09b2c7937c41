"""The native CPU kernel (``csrc/mlc_native.cpp``), built lazily with ``torch.utils.cpp_extension``.

The build runs on first use (about a minute on 2 cores, then cached in the torch extensions folder)
against the installed torch, so ``pip install`` never needs torch in a build environment. When it
cannot be built, :func:`native_available` returns False: ``impl="auto"`` then uses the torch impl
and warns once; ``impl="native"`` raises.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import torch

from .common import OBJECTIVES, singular_value_cutoff

# csrc/ at the repository root (source checkout, editable install) or packaged as mlc_kernels/csrc (wheel)
_CANDIDATES = (
    Path(__file__).resolve().parents[2] / "csrc" / "mlc_native.cpp",
    Path(__file__).resolve().parents[1] / "csrc" / "mlc_native.cpp",
)
SOURCE = next((p for p in _CANDIDATES if p.exists()), _CANDIDATES[0])

_lock = threading.Lock()
_state: dict[str, object] = {}


def _build() -> None:
    from torch.utils.cpp_extension import load

    if not SOURCE.exists():
        raise FileNotFoundError(f"native kernel source not found at {SOURCE}")
    load(
        name="mlc_native",
        sources=[str(SOURCE)],
        extra_cflags=["-O3"],
        is_python_module=False,
        verbose=False,
    )


def native_error() -> Exception | None:
    """Build (once) and return the build error, or None when ``torch.ops.mlc_native`` is ready."""
    with _lock:
        if "error" not in _state:
            try:
                _build()
                _state["error"] = None
            except Exception as err:  # compiler missing, headers missing, ...
                _state["error"] = err
        return _state["error"]  # type: ignore[return-value]


def native_available(warn: bool = False) -> bool:
    """True when the native kernel is built; with ``warn``, says once why it is not."""
    err = native_error()
    if err is not None and warn and not _state.get("warned"):
        _state["warned"] = True
        warnings.warn(
            f"mlc_kernels: native CPU kernel unavailable ({type(err).__name__}: {str(err)[:200]}); "
            "impl='auto' uses the torch impl",
            RuntimeWarning,
            stacklevel=3,
        )
    return err is None


def native_loss_and_grad(
    reps: torch.Tensor,
    present: torch.Tensor,
    tau: float,
    objective: str,
    write_grad: bool = True,
    anchor: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt loss ``(N,)`` (fp32; fp64 for fp64 input) and per-prompt gradient ``(N, m, d)``
    in the dtype of reps (empty when not ``write_grad``). No autograd. ``anchor``: the base row
    (first present variant) gets zero gradient."""
    err = native_error()
    if err is not None:
        raise RuntimeError(f"native kernel unavailable: {err}")
    cutoff = singular_value_cutoff(reps.shape[2], reps.shape[1], torch.float64)
    return torch.ops.mlc_native.mlc_fused(
        reps, present, float(tau), OBJECTIVES.index(objective), bool(anchor), write_grad, cutoff
    )


class NativeMLCFunction(torch.autograd.Function):
    """Autograd wrapper: the forward writes the per-prompt gradient, the backward scales it in place."""

    @staticmethod
    def forward(
        ctx, reps: torch.Tensor, present: torch.Tensor, tau: float, objective: str, anchor: bool = False
    ) -> torch.Tensor:
        loss, grad = native_loss_and_grad(reps, present, tau, objective, write_grad=True, anchor=anchor)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors
        grad.mul_(grad_loss.to(grad.dtype)[:, None, None])
        return grad, None, None, None, None


def native_mlc_loss(
    reps: torch.Tensor, present: torch.Tensor, tau: float, objective: str, anchor: bool = False
) -> torch.Tensor:
    """Per-prompt MLC loss ``(N,)`` through the native kernel."""
    if reps.requires_grad and torch.is_grad_enabled():
        return NativeMLCFunction.apply(reps, present, tau, objective, anchor)
    return native_loss_and_grad(reps, present, tau, objective, write_grad=False, anchor=anchor)[0]
