"""Ahead-of-time compilation of the Triton kernels for NVIDIA targets, with no GPU needed.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` lowers a kernel to PTX and
a cubin on any machine; ``cuobjdump --dump-resource-usage`` (shipped in Triton's NVIDIA backend)
then reads the registers and stack of the cubin, and ``ptxas -v`` on the PTX its spill bytes.
CI runs this for every kernel configuration the dispatcher can pick (sm_90 and sm_80), so code
that the interpreter accepts but the compiler rejects, and register spills, show up without a device.

Run as ``python -m mlc_kernels.ops.triton_aot [--arch 90 80]``: prints one JSON line per kernel.
Must run without ``TRITON_INTERPRET`` (the interpreter replaces ``@triton.jit`` functions).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch

_TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _nvidia_tool(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def _ptxas_spills(ptx: str, arch: int) -> dict[str, int]:
    """Spill stores/loads and stack frame bytes reported by ``ptxas -v`` for the kernel's PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        arch_name = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        from triton.backends.nvidia.compiler import get_ptxas  # the ptxas Triton itself uses for arch

        out = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name={arch_name}", str(path), "-o", str(Path(tmp) / "k.o")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    found = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", out)
    if not found:
        raise RuntimeError(f"could not read ptxas -v output:\n{out}")
    frame, stores, loads = (int(v) for v in found.groups())
    return {"stack_frame": frame, "spill_stores": stores, "spill_loads": loads}


def _resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run(
            [str(_nvidia_tool("cuobjdump")), "--dump-resource-usage", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        found = re.search(rf"\b{key}:(\d+)", out)
        usage[key.lower()] = int(found.group(1)) if found else -1
    return usage


def compile_fused_kernel(dtype: torch.dtype, cfg, arch: int) -> dict:
    """Compile ``mlc_fused_kernel`` for ``dtype`` and ``cfg`` (a ``KernelConfig``) on ``sm_<arch>``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .triton_kernels import MAX_SWEEPS, mlc_fused_kernel

    elem = _TRITON_DTYPE[dtype]
    signature = {
        "reps_ptr": f"*{elem}",
        "mask_ptr": "*u8",
        "loss_ptr": "*fp32",
        "grad_ptr": f"*{elem}",
        "m": "i32",
        "d": "i32",
        "stride_n": "i32",
        "stride_m": "i32",
        "inv_tau": "fp32",
        "sv_cutoff": "fp32",
        "objective": "i32",
        "write_grad": "i1",
        "M_PAD": "constexpr",
        "BLOCK_D": "constexpr",
        "N_SWEEPS": "constexpr",
    }
    constexprs = {
        "M_PAD": cfg.m_pad,
        "BLOCK_D": cfg.block_d,
        "N_SWEEPS": MAX_SWEEPS,
    }
    # The launches see 16-byte aligned pointers and (for d % 16 == 0) divisible d and strides.
    names = list(signature)
    aligned = ["reps_ptr", "mask_ptr", "loss_ptr", "grad_ptr", "d", "stride_n", "stride_m"]
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(fn=mlc_fused_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
    )
    usage = _resource_usage(compiled.asm["cubin"])
    usage.update(_ptxas_spills(compiled.asm["ptx"], arch))
    return {
        "kernel": "mlc_fused_kernel",
        "arch": f"sm_{arch}",
        "dtype": elem,
        "m_pad": cfg.m_pad,
        "block_d": cfg.block_d,
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
        "ptx_bytes": len(compiled.asm["ptx"]),
        **usage,
    }


def compile_all(archs: tuple[int, ...] = (90, 80)) -> list[dict]:
    """Compile every (dtype, config) the dispatcher can pick on each arch, for that arch."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset (run it in a separate process)")
    from .triton_kernels import all_kernel_configs

    return [compile_fused_kernel(dtype, cfg, arch) for arch, dtype, cfg in all_kernel_configs() if arch in archs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="SM versions, e.g. 90 80")
    args = parser.parse_args()
    for row in compile_all(tuple(args.arch)):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
