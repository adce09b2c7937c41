"""Tuned Triton configurations shipped with the package: ``{"sm_<arch>/<dtype>/<m_pad>": KernelConfig fields}``.

Written by ``python -m benchmarks.tune_triton`` (its ``triton_tuned.py`` output replaces this file);
``triton_kernels.kernel_config`` uses an entry when present, else its built-in defaults. Every entry is
compiled ahead of time for its arch by the test suite (no register spills allowed).
"""

from __future__ import annotations

TUNED: dict[str, dict[str, int]] = {}
