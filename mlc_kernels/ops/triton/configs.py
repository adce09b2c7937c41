"""Sizes of the Triton kernels: one :class:`KernelConfig` per (m_pad, dtype, arch), from the shipped tuned table
(``tuned.py``) or the built-in defaults; the interpreter's small configuration; what CI compiles ahead of time."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .tuned import TUNED

MAX_SWEEPS = 12
"""Jacobi sweeps at most; converged inputs stop after 1-2, random ones after 5-7 (fp32)."""


@dataclass(frozen=True)
class KernelConfig:
    """Compile-time configurations of the three kernels for one (m_pad, dtype, arch).

    ``gram_programs``: the Gram kernel splits d so that about this many programs run
    (``N * splits``); ``small_prompts``: prompts per program of the small kernel;
    ``grad_blocks``: ``BLOCK_D`` blocks streamed by each program of the gradient kernel;
    ``resid_block_d`` / ``resid_warps``: the d-block of the deflation's residual Gram (fp32 tiles whatever the
    input dtype) for ``resid_warps`` warps; the small kernel, which computes it, scales the block to its own warps
    (``launch.small_resid_block_d``); ``resid_stages`` is unused since the residual kernel was folded in.
    """

    m_pad: int
    gram_block_d: int = 128
    gram_warps: int = 4
    gram_stages: int = 3
    gram_programs: int = 2048
    small_warps: int = 1
    small_prompts: int = 1
    grad_block_d: int = 128
    grad_warps: int = 4
    grad_stages: int = 3
    grad_blocks: int = 4
    resid_block_d: int = 64
    resid_warps: int = 4
    resid_stages: int = 2


SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


_config_override: dict[int, KernelConfig] = {}
_override_epoch = [0]  # bumped on every override change: cached launch plans keyed by it go stale


def tile_size(m: int) -> int:
    """``M_PAD`` of m variants: 16 for m <= 16, else 32 (the kernels' largest, ``MAX_VARIANTS``)."""
    return 16 if m <= 16 else 32


@contextlib.contextmanager
def kernel_config_override(configs: dict[int, KernelConfig]):
    """Benchmarks and tests only: inside the block, launch with ``configs[m_pad]`` where given."""
    global _config_override
    previous, _config_override = _config_override, dict(configs)
    _override_epoch[0] += 1
    try:
        yield
    finally:
        _config_override = previous
        _override_epoch[0] += 1


def override_epoch() -> int:
    """Changes whenever :func:`kernel_config_override` enters or leaves (part of the launch plans' cache key)."""
    return _override_epoch[0]


def config_override(m_pad: int) -> KernelConfig | None:
    """The configuration :func:`kernel_config_override` gives for ``m_pad`` now, if any."""
    return _config_override.get(m_pad)


def kernel_config(m: int, dtype: torch.dtype, arch: int = 90) -> KernelConfig:
    """The configuration the dispatcher uses for m variants of ``dtype`` on ``sm_<arch>``."""
    m_pad = tile_size(m)
    override = config_override(m_pad)
    if override is not None:
        return override
    tuned = TUNED.get(f"sm_{arch}/{str(dtype).removeprefix('torch.')}/{m_pad}")
    if tuned is not None:
        return KernelConfig(**tuned)
    small_warps = 1 if m_pad == 16 else 2  # the m x m phase: one prompt per warp-sized program
    if dtype == torch.float32:  # IEEE fp32 FMA products: smaller tiles, sized so that ptxas reports no spills
        return KernelConfig(m_pad, gram_block_d=64, gram_warps=4, gram_stages=2, small_warps=small_warps,
                            grad_block_d=64, grad_warps=4, grad_stages=2, grad_blocks=8)  # fmt: skip
    return KernelConfig(m_pad, gram_block_d=128, gram_warps=4, gram_stages=3, small_warps=small_warps,
                        grad_block_d=128, grad_warps=4, grad_stages=3, grad_blocks=4)  # fmt: skip


INTERPRETER_CONFIG = {
    m_pad: KernelConfig(m_pad, gram_block_d=16, gram_programs=8, grad_block_d=16, grad_blocks=2, resid_block_d=16)
    for m_pad in (16, 32)
}
"""Under ``TRITON_INTERPRET=1``: small blocks and several splits, so that small test shapes exercise
the multi-block, multi-split and multi-chunk paths."""

AOT_ARCHS = (90, 80)


def all_kernel_configs() -> list[tuple[int, torch.dtype, KernelConfig]]:
    """Every (arch, dtype, configuration) ``kernel_config`` can return: what CI compiles ahead of time
    (the built-in defaults for ``AOT_ARCHS`` and every shipped tuned entry, for its own arch)."""
    archs = sorted({*AOT_ARCHS, *(int(key.split("/")[0].removeprefix("sm_")) for key in TUNED)}, reverse=True)
    return [(arch, dt, kernel_config(m, dt, arch)) for arch in archs for dt in SUPPORTED_DTYPES for m in (16, 32)]


def device_arch(device: torch.device) -> int:
    """``major * 10 + minor`` of a CUDA device (90 for Hopper); 90 for the CPU interpreter."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def gram_splits(n: int, d: int, cfg: KernelConfig, block_d: int | None = None) -> tuple[int, int]:
    """``(splits, chunk)``: the Gram kernel's slices of d per prompt and their length (a multiple of
    ``block_d``, default ``gram_block_d``), so that ``n * splits`` is about ``cfg.gram_programs``. Depends
    only on the shape."""
    block_d = cfg.gram_block_d if block_d is None else block_d
    d, n = max(d, 1), max(n, 1)
    blocks = -(-d // block_d)  # ceil division in int arithmetic (triton.cdiv costs ~15x more host time)
    want = min(blocks, max(1, -(-cfg.gram_programs // n)))
    chunk = -(-blocks // want) * block_d
    return -(-d // chunk), chunk
