"""The fused GPU kernel of the MLC loss (Triton), split by concern:

- ``kernels.py``: the ``@triton.jit`` kernels (Gram, small m x m phase, deflation residual, gradient);
- ``configs.py``: their sizes per (m_pad, dtype, arch), the shipped tuned table (``tuned.py``), the interpreter's
  configuration and what CI compiles ahead of time;
- ``launch.py``: inputs as the kernels read them, the configuration of each call, the launches;
- ``op.py``: the registered ops with their meta kernels and autograd, the eager path and the entry points.

Imported on first use of ``impl="triton"`` (``ops.REGISTRY``): triton is an optional dependency.
"""

from __future__ import annotations

from ..common import MAX_VARIANTS
from .configs import (
    AOT_ARCHS,
    MAX_SWEEPS,
    TUNED,
    KernelConfig,
    all_kernel_configs,
    device_arch,
    kernel_config,
    kernel_config_override,
)
from .op import triton_loss_and_grad, triton_mlc_loss

__all__ = [
    "AOT_ARCHS",
    "MAX_SWEEPS",
    "MAX_VARIANTS",
    "TUNED",
    "KernelConfig",
    "all_kernel_configs",
    "device_arch",
    "kernel_config",
    "kernel_config_override",
    "triton_loss_and_grad",
    "triton_mlc_loss",
]
