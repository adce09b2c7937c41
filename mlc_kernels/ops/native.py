"""The native CPU kernel (``csrc/mlc_native.cpp``), built lazily with ``torch.utils.cpp_extension``.

The build runs on first use (about 15 s on 2 cores, then cached in the torch extensions folder)
against the installed torch, so ``pip install`` never needs torch in a build environment. The build
folder is named after a hash of the source text, the torch version and everything else that changes the
build command (:func:`build_environment`: compiler flags, the compiler, Python and its ABI, the environment's
prefix, torch's location, the source's path; :func:`extension_name`), so checkouts with different sources and
environments sharing one extensions folder keep their own builds instead of rebuilding each other's. Every
build that starts says so in one line on stderr (:data:`BUILD_MESSAGE`). Every build registers the C++ op as
``torch.ops.mlc_native.mlc_fused``: a process loads only one of them (the one matching its source), so the
namespace never clashes.
When it cannot be built, :func:`native_available` returns False: ``impl="auto"`` then uses the
torch impl and warns once; ``impl="native"`` raises.

``torch.ops.mlc_kernels.native_forward`` wraps the C++ op as a ``torch.library`` custom op with a
fake kernel (shapes only, never builds) and an autograd formula, so ``torch.compile`` and ``meta``
tensors see it. Eager CPU calls skip the custom-op dispatch (``common.use_registered_op``, as the Triton
backend does) and save memory with an in-place backward.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import threading
import warnings
from pathlib import Path

import torch

from .common import OBJECTIVES, singular_value_cutoff, use_registered_op

# csrc/ at the repository root (source checkout, editable install) or packaged as mlc_kernels/csrc (wheel)
_CANDIDATES = (
    Path(__file__).resolve().parents[2] / "csrc" / "mlc_native.cpp",
    Path(__file__).resolve().parents[1] / "csrc" / "mlc_native.cpp",
)
SOURCE = next((p for p in _CANDIDATES if p.exists()), _CANDIDATES[0])

BUILD_MESSAGE = "mlc_kernels: building the CPU kernel once (about 15 s; cached afterwards) ..."
EXTRA_CFLAGS = ("-O3",)

_lock = threading.Lock()
_state: dict[str, object] = {}


def build_environment() -> dict[str, str]:
    """Everything besides the source text and the torch version that changes the build command or its result:
    the compiler flags, the compiler (``$CXX`` or ``c++``, resolved), Python (version, ABI tag, extension
    suffix), the environment's prefix (``sys.prefix``), torch's location and C++ ABI, the source's path."""
    compiler = os.environ.get("CXX", "c++")
    return {
        "cflags": " ".join(EXTRA_CFLAGS),
        "compiler": os.path.realpath(shutil.which(compiler) or compiler),
        "python": f"{sys.version} {sys.implementation.cache_tag}{getattr(sys, 'abiflags', '')} "
        f"{sysconfig.get_config_var('EXT_SUFFIX')}",
        "prefix": sys.prefix,
        "torch": f"{Path(torch.__file__).parent} cxx11abi={int(torch.compiled_with_cxx11_abi())}",
        "source": str(SOURCE),
    }


def extension_name(source_text: str, torch_version: str = torch.__version__,
                   environment: dict[str, str] | None = None) -> str:  # fmt: skip
    """``mlc_native_<hash8>``: the build folder of this source text under this torch version in this
    ``environment`` (default: :func:`build_environment`)."""
    environment = build_environment() if environment is None else environment
    blob = json.dumps({"torch": torch_version, "source": source_text, "environment": environment}, sort_keys=True)
    return f"mlc_native_{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def _build() -> None:
    from torch.utils.cpp_extension import load

    if not SOURCE.exists():
        raise FileNotFoundError(f"native kernel source not found at {SOURCE}")
    name = extension_name(SOURCE.read_text())
    if not _built_already(name):
        print(f"{BUILD_MESSAGE} ({name})", file=sys.stderr, flush=True)
    load(name=name, sources=[str(SOURCE)], extra_cflags=list(EXTRA_CFLAGS), is_python_module=False, verbose=False)


def _built_already(name: str) -> bool:
    """Whether ``load`` finds the library built and up to date (ninja rebuilds when the source is newer)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory  # private: guarded

        library = Path(_get_build_directory(name, verbose=False)) / f"{name}.so"
        return library.exists() and library.stat().st_mtime >= SOURCE.stat().st_mtime
    except Exception:
        return False


def native_error() -> Exception | None:
    """Build (once) and return the build error, or None when ``torch.ops.mlc_native`` is ready."""
    if "error" in _state:  # built (or failed) already: no lock
        return _state["error"]  # type: ignore[return-value]
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


@torch.compiler.assume_constant_result
def build_problem() -> str | None:
    """Why the native kernel cannot run here (``"OSError: ..."``), or None once it is built.

    ``torch.compile`` calls it outside the traced graph (the build and its lock are not traceable)
    and treats the answer as a constant.
    """
    err = native_error()
    return None if err is None else f"{type(err).__name__}: {err}"


@torch.compiler.assume_constant_result
def usable_for_auto() -> bool:
    """:func:`native_available` with the one-time warning, callable inside ``torch.compile``."""
    return native_available(warn=True)


def _native_op(name: str):
    """``torch.ops.mlc_native.<name>.default``; the first call builds the kernel, then the handle is kept (the
    ``torch.ops`` lookups cost host time per call)."""
    op = _state.get(name)
    if op is None:
        err = native_error()
        if err is not None:
            raise RuntimeError(f"native kernel unavailable: {type(err).__name__}: {err}")
        op = _state[name] = getattr(torch.ops.mlc_native, name).default
    return op


def _fused(reps, mask, tau, objective, anchor, write_grad, sv_cutoff) -> tuple[torch.Tensor, torch.Tensor]:
    return _native_op("mlc_fused")(reps, mask, tau, objective, anchor, write_grad, sv_cutoff)


@torch.library.custom_op("mlc_kernels::native_forward", mutates_args=(), device_types="cpu")
def native_forward(
    reps: torch.Tensor, mask: torch.Tensor, tau: float, objective: int, anchor: bool, write_grad: bool, sv_cutoff: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt loss ``(N,)`` (fp32; fp64 for fp64 reps) and unscaled gradient ``(N, m, d)`` in the
    dtype of reps (``(0, m, d)`` unless ``write_grad``). Builds the kernel on first use."""
    return _fused(reps, mask, tau, objective, anchor, write_grad, sv_cutoff)


@native_forward.register_fake
def _native_forward_fake(reps, mask, tau, objective, anchor, write_grad, sv_cutoff):
    n, m, d = reps.shape
    loss_dtype = torch.float64 if reps.dtype == torch.float64 else torch.float32
    return reps.new_empty((n,), dtype=loss_dtype), reps.new_empty((n if write_grad else 0, m, d))


def _setup_context(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])
    ctx.n = inputs[0].shape[0]


def _backward(ctx, grad_loss: torch.Tensor | None, _grad_grad: torch.Tensor | None):
    (grad,) = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None, None, None, None, None
    if grad.shape[0] != ctx.n:
        raise RuntimeError("mlc_loss(impl='native'): the forward ran without gradient; cannot backpropagate")
    return grad * grad_loss.to(grad.dtype)[:, None, None], None, None, None, None, None, None


native_forward.register_autograd(_backward, setup_context=_setup_context)


def native_loss_and_grad(
    reps: torch.Tensor,
    present: torch.Tensor,
    tau: float,
    objective: str,
    anchor: bool = False,
    write_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt loss ``(N,)`` (fp32; fp64 for fp64 input) and per-prompt gradient ``(N, m, d)``
    in the dtype of reps (empty when not ``write_grad``). No autograd. ``anchor``: the base row
    (first present variant) gets zero gradient."""
    args = _arguments(reps, present, tau, objective, anchor)
    if use_registered_op(reps):
        return native_forward(*args[:5], write_grad, args[5])
    return _fused(*args[:5], write_grad, args[5])


@functools.lru_cache(maxsize=1024)
def _cutoff(d: int, m: int) -> float:
    return singular_value_cutoff(d, m, torch.float64)


_OBJECTIVE_CODES = {name: code for code, name in enumerate(OBJECTIVES)}


def _arguments(reps, present, tau, objective, anchor) -> tuple:
    cutoff = _cutoff(reps.shape[2], reps.shape[1])
    return reps, present, float(tau), _OBJECTIVE_CODES[objective], bool(anchor), cutoff


_REDUCTION_CODES = {"sum": 1, "mean": 2}


def native_reduced_loss(
    reps: torch.Tensor, mask: torch.Tensor | None, tau: float, objective: str, reduction: str
) -> torch.Tensor:
    """The ``"sum"``/``"mean"`` loss (0-dim, fp32; fp64 for fp64 reps) through ``mlc_native.mlc_reduced``: the
    kernel, the reduction over the prompts with >= 2 present variants and the autograd formula all in C++ (the
    mean's 1/count folded into the gradient; the backward is one in-place scale). ``mask``: ``(N, m)`` bool or None
    (every variant present). Eager CPU calls; refuses double backward."""
    cutoff = _cutoff(reps.shape[2], reps.shape[1])
    code = _OBJECTIVE_CODES[objective]
    return _native_op("mlc_reduced")(reps, mask, float(tau), code, False, cutoff, _REDUCTION_CODES[reduction])


class NativeMLCFunction(torch.autograd.Function):
    """Eager autograd wrapper: the forward writes the per-prompt gradient, the backward scales it in place."""

    @staticmethod
    def forward(
        ctx, reps: torch.Tensor, present: torch.Tensor, tau: float, objective: str, anchor: bool = False
    ) -> torch.Tensor:
        loss, grad = native_loss_and_grad(reps, present, tau, objective, anchor, write_grad=True)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors
        if grad_loss.dtype != grad.dtype:
            grad_loss = grad_loss.to(grad.dtype)
        grad.mul_(grad_loss[:, None, None])
        return grad, None, None, None, None


def native_mlc_loss(
    reps: torch.Tensor, present: torch.Tensor, tau: float, objective: str, anchor: bool = False
) -> torch.Tensor:
    """Per-prompt MLC loss ``(N,)`` through the native kernel (the custom op under ``torch.compile``
    and for ``meta`` tensors, a plain autograd Function in eager CPU calls)."""
    write_grad = bool(reps.requires_grad and torch.is_grad_enabled())
    if use_registered_op(reps):
        args = _arguments(reps, present, tau, objective, anchor)
        return native_forward(*args[:5], write_grad, args[5])[0]
    if write_grad:
        return NativeMLCFunction.apply(reps, present, tau, objective, anchor)
    return native_loss_and_grad(reps, present, tau, objective, anchor, write_grad=False)[0]
