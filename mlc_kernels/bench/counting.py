"""Counters for host-side work per call: aten ops (a ``TorchDispatchMode``), device syncs (the ops that wait for the
device: ``.item()``/``bool()``/``int()``, ``nonzero``, boolean-mask indexing, ...) and Triton launches (every
``JITFunction.run`` / ``InterpretedFunction.run``, so it counts under ``TRITON_INTERPRET=1`` and on a GPU alike).

Each is a context manager yielding a :class:`collections.Counter` that fills while the block runs::

    with count_ops() as ops, count_syncs() as syncs, count_triton_launches() as launches:
        mlc_loss(reps, impl="triton").backward()
    assert sum(compute_ops(ops).values()) <= 2 and not syncs and sum(launches.values()) <= 3

Ops are keyed by overload packet (``"aten.sum"``); :func:`compute_ops` drops views and allocations (what costs no
kernel). Backward counts only when it runs inside the block: the autograd engine carries the modes to its threads.
``loss.backward()`` on a scalar adds the seed gradient (``aten.ones_like``/``aten.empty_like`` + ``aten.fill_``); pass
``torch.autograd.backward(loss, seed)`` with a seed made outside the block to count the loss alone.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

VIEW_OPS: frozenset[str] = frozenset(
    {
        "aten.view", "aten._unsafe_view", "aten.reshape", "aten.as_strided", "aten.slice", "aten.select",
        "aten.expand", "aten.unsqueeze", "aten.squeeze", "aten.permute", "aten.t", "aten.transpose", "aten.detach",
        "aten.alias", "aten.unbind", "aten.split", "aten.narrow", "aten.diagonal", "aten.lift_fresh",
        "aten._reshape_alias", "prim.device", "aten.sym_size", "aten.sym_stride", "aten.sym_numel",
        "aten.sym_storage_offset", "aten.is_contiguous", "aten.stride", "aten.size", "aten.dim",
    }
)  # fmt: skip
"""Metadata-only ops: no kernel, no allocation."""

ALLOC_OPS: frozenset[str] = frozenset({"aten.empty", "aten.empty_strided", "aten.empty_like", "aten.new_empty"})
"""Uninitialised allocations (no kernel)."""

SYNC_OPS: frozenset[str] = frozenset(
    {
        "aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique",
        "aten._unique2", "aten.unique_consecutive", "aten.unique_dim", "aten.is_nonzero", "aten.equal",
        "aten.allclose",
    }
)  # fmt: skip
"""Ops whose result (or output size) the host reads back: each waits for the device."""


def _name(func) -> str:
    return str(func.overloadpacket)


def _bool_index(args) -> bool:
    """True when an ``index``/``index_put`` call takes a bool/uint8 index tensor (its output size needs a sync)."""
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _repeat_interleave_syncs(func, kwargs) -> bool:
    return _name(func) == "aten.repeat_interleave" and kwargs.get("output_size") is None


class _Recorder(TorchDispatchMode):
    def __init__(self, ops: Counter | None, syncs: Counter | None) -> None:
        super().__init__()
        self.ops, self.syncs = ops, syncs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _kernel_depth[0]:  # inside a Triton kernel (the interpreter's own tensor ops)
            return func(*args, **kwargs)
        name = _name(func)
        if self.ops is not None:
            self.ops[name] += 1
        if self.syncs is not None:
            if name in SYNC_OPS:
                self.syncs[name] += 1
            elif name in ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_") and _bool_index(
                args
            ):
                self.syncs[name + "[bool]"] += 1
            elif _repeat_interleave_syncs(func, kwargs):
                self.syncs[name] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_ops() -> Iterator[Counter]:
    """Yield a Counter of every aten op dispatched inside the block, by name (``"aten.sum"``), views included; the
    ops Triton's interpreter runs inside a kernel are not counted (they are the kernel)."""
    ops: Counter = Counter()
    with _launch_hook(), _Recorder(ops, None):
        yield ops


@contextlib.contextmanager
def count_syncs() -> Iterator[Counter]:
    """Yield a Counter of the device syncs inside the block: ``aten._local_scalar_dense`` (``.item()``, ``bool()``,
    ``int()``, ``float()``), ``nonzero``, ``masked_select``, ``unique``, boolean-mask indexing (``"aten.index[bool]"``),
    ``repeat_interleave`` without ``output_size``."""
    syncs: Counter = Counter()
    with _launch_hook(), _Recorder(None, syncs):
        yield syncs


def compute_ops(ops: Counter) -> Counter:
    """``ops`` without views/metadata (:data:`VIEW_OPS`) and uninitialised allocations (:data:`ALLOC_OPS`)."""
    return Counter({name: n for name, n in ops.items() if name not in VIEW_OPS and name not in ALLOC_OPS and n})


def _launch_classes() -> list[type]:
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:  # no triton: nothing launches
        return []
    classes: list[type] = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - every supported triton has it
        return classes
    return [*classes, InterpretedFunction]


_active_launch_counters: list[Counter] = []
_patched: dict[type, object] = {}
_kernel_depth = [0]  # > 0 while a Triton kernel runs (the interpreter's own aten ops are not the caller's)


def _counted_run(run):
    def counted(self, *args, grid, warmup, **kwargs):
        if not warmup:
            fn = getattr(self, "fn", None)
            for launches in _active_launch_counters:
                launches[getattr(fn, "__name__", repr(self))] += 1
        _kernel_depth[0] += 1
        try:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            _kernel_depth[0] -= 1

    return counted


@contextlib.contextmanager
def _launch_hook() -> Iterator[None]:
    """Wrap ``run`` of Triton's kernel classes while any counter is active (reference-counted)."""
    first = not _patched
    if first:
        for cls in _launch_classes():
            _patched[cls] = cls.__dict__["run"]
            cls.run = _counted_run(cls.__dict__["run"])
    try:
        yield
    finally:
        if first:
            for cls, run in _patched.items():
                cls.run = run
            _patched.clear()


@contextlib.contextmanager
def count_triton_launches() -> Iterator[Counter]:
    """Yield a Counter of the Triton kernel launches inside the block, by kernel name (warm-ups not counted); the
    kernels still run (under ``TRITON_INTERPRET=1`` or on a GPU)."""
    launches: Counter = Counter()
    with _launch_hook():
        _active_launch_counters.append(launches)
        try:
            yield launches
        finally:
            _active_launch_counters.remove(launches)
