"""Tuned Triton configurations shipped with the package: ``{"sm_<arch>/<dtype>/<m_pad>": KernelConfig fields}``.

Written by ``python -m benchmarks.tune_triton`` (its ``triton_tuned.py`` output replaces this file);
``configs.kernel_config`` uses an entry when present, else its built-in defaults. Every entry is
compiled ahead of time for its arch by the test suite (no register spills allowed).
"""

from __future__ import annotations

TUNED: dict[str, dict[str, int]] = {
    "sm_90/bfloat16/16": {
        "m_pad": 16,
        "gram_block_d": 256,
        "gram_warps": 4,
        "gram_stages": 3,
        "gram_programs": 2048,
        "small_warps": 2,
        "small_prompts": 1,
        "grad_block_d": 128,
        "grad_warps": 4,
        "grad_stages": 3,
        "grad_blocks": 16,
    },
    "sm_90/bfloat16/32": {
        "m_pad": 32,
        "gram_block_d": 128,
        "gram_warps": 4,
        "gram_stages": 3,
        "gram_programs": 2048,
        "small_warps": 1,
        "small_prompts": 1,
        "grad_block_d": 128,
        "grad_warps": 4,
        "grad_stages": 3,
        "grad_blocks": 16,
    },
}
