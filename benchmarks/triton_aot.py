"""Ahead-of-time compilation of the Triton kernels for NVIDIA targets, with no GPU needed.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` lowers a kernel to PTX and
a cubin on any machine; ``cuobjdump --dump-resource-usage`` (shipped in Triton's NVIDIA backend)
then reads the registers and stack of the cubin, and the compile's own ``ptxas -v`` log its spills.
CI runs this for every kernel and configuration the dispatcher can pick (sm_90 and sm_80), so code
that the interpreter accepts but the compiler rejects, and register spills, show up without a device.

A maintainer tool, not shipped: run from a checkout as ``python -m benchmarks.triton_aot [--arch 90 80]``
(``tests/test_triton_aot.py`` does); prints one JSON line per kernel.
Must run without ``TRITON_INTERPRET`` (the interpreter replaces ``@triton.jit`` functions).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch

from mlc_kernels.ops.common import interpreting

_TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _nvidia_tool(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def _parse_ptxas_log(log: str) -> dict[str, int]:
    """Stack frame and spill bytes from the ``ptxas -v`` log of the compile itself."""
    found = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not found:
        raise RuntimeError(f"could not read the ptxas -v log:\n{log}")
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


def _signature(kernel: str, elem: str) -> dict[str, str]:
    if kernel == "mlc_gram_kernel":
        return {"reps_ptr": f"*{elem}", "mask_ptr": "*u8", "part_ptr": "*fp32", "m": "i32", "d": "i32",
                "stride_n": "i32", "stride_m": "i32", "chunk": "i32", "n_splits": "i32",
                "M_PAD": "constexpr", "BLOCK_D": "constexpr", "HAS_MASK": "constexpr"}  # fmt: skip
    if kernel == "mlc_small_kernel":
        return {"part_ptr": "*fp32", "mask_ptr": "*u8", "loss_ptr": "*fp32", "bmat_ptr": "*fp32",
                "defl_ptr": "*fp32", "reps_ptr": f"*{elem}", "n": "i32", "m": "i32", "d": "i32", "stride_n": "i32",
                "stride_m": "i32", "n_splits": "i32", "inv_tau": "fp32", "sv_cutoff": "fp32", "defl_ratio": "fp32",
                "defl_cutoff": "fp32", "objective": "i32", "anchor": "i1", "write_b": "i1", "deflate": "i1",
                "M_PAD": "constexpr", "PROMPTS": "constexpr", "N_SWEEPS": "constexpr",
                "RESID_BLOCK_D": "constexpr", "HAS_MASK": "constexpr"}  # fmt: skip
    return {"reps_ptr": f"*{elem}", "mask_ptr": "*u8", "bmat_ptr": "*fp32", "gscale_ptr": "*fp32",
            "grad_ptr": f"*{elem}", "gscale_stride": "i32", "m": "i32", "d": "i32", "stride_n": "i32",
            "stride_m": "i32", "chunk": "i32",
            "M_PAD": "constexpr", "BLOCK_D": "constexpr", "HAS_MASK": "constexpr"}  # fmt: skip


def kernel_launches(dtype: torch.dtype, cfg) -> list[tuple[str, dict, dict]]:
    """``(kernel, constexprs, options)`` of the kernels the dispatcher launches with ``cfg``: the Gram kernel, the
    small kernel (with the deflation's residual Gram folded in) and the gradient kernel, each with ``HAS_MASK=True``
    (the mask-less variant only drops the mask loads: fewer registers, not compiled here)."""
    from mlc_kernels.ops.triton import MAX_SWEEPS
    from mlc_kernels.ops.triton.launch import small_resid_block_d

    small = {"M_PAD": cfg.m_pad, "PROMPTS": cfg.small_prompts, "N_SWEEPS": MAX_SWEEPS,
             "RESID_BLOCK_D": small_resid_block_d(cfg), "HAS_MASK": True}  # fmt: skip
    return [
        ("mlc_gram_kernel", {"M_PAD": cfg.m_pad, "BLOCK_D": cfg.gram_block_d, "HAS_MASK": True},
         {"num_warps": cfg.gram_warps, "num_stages": cfg.gram_stages}),
        ("mlc_small_kernel", small, {"num_warps": cfg.small_warps, "num_stages": 1}),
        ("mlc_grad_kernel", {"M_PAD": cfg.m_pad, "BLOCK_D": cfg.grad_block_d, "HAS_MASK": True},
         {"num_warps": cfg.grad_warps, "num_stages": cfg.grad_stages}),
    ]  # fmt: skip


def compile_kernel(kernel: str, dtype: torch.dtype, constexprs: dict, options: dict, arch: int) -> dict:
    """Compile one kernel of ``mlc_kernels.ops.triton.kernels`` for ``dtype`` with ``constexprs``/``options``
    on ``sm_<arch>``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mlc_kernels.ops.triton import kernels

    elem = _TRITON_DTYPE[dtype]
    signature = _signature(kernel, elem)
    # The launches see 16-byte aligned pointers (fresh allocations) and, for d % 16 == 0, divisible d and strides.
    names = list(signature)
    aligned = [a for a in names if a.endswith("_ptr") or a in ("d", "stride_n", "stride_m", "chunk")]
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(fn=getattr(kernels, kernel), signature=signature, constexprs=constexprs, attrs=attrs)
    # Triton runs ptxas with -v; its knob prints that log, which holds the spill bytes.
    log = io.StringIO()
    previous = triton.knobs.nvidia.dump_ptxas_log, triton.knobs.compilation.always_compile
    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True  # a cached cubin would skip ptxas and its log
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    finally:
        triton.knobs.nvidia.dump_ptxas_log, triton.knobs.compilation.always_compile = previous
    usage = _resource_usage(compiled.asm["cubin"])
    usage.update(_parse_ptxas_log(log.getvalue()))
    return {
        "kernel": kernel,
        "arch": f"sm_{arch}",
        "dtype": elem,
        **{k.lower(): v for k, v in constexprs.items() if k != "N_SWEEPS"},
        **options,
        "ptx_bytes": len(compiled.asm["ptx"]),
        **usage,
    }


def compile_all(archs: tuple[int, ...] = (90, 80), workers: int = 1) -> list[dict]:
    """Compile every kernel of every (dtype, config) the dispatcher can pick on each arch, once each."""
    if interpreting():
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset (run it in a separate process)")
    from mlc_kernels.ops.triton import all_kernel_configs

    jobs, seen = [], set()
    for arch, dtype, cfg in all_kernel_configs():
        if arch not in archs:
            continue
        for kernel, constexprs, options in kernel_launches(dtype, cfg):
            key = (arch, kernel, dtype, tuple(sorted(constexprs.items())), tuple(sorted(options.items())))
            if key not in seen:
                seen.add(key)
                jobs.append((kernel, dtype, constexprs, options, arch))
    if workers <= 1:
        return [compile_kernel(*job) for job in jobs]
    # each compilation is one single-threaded ptxas run: spread them over the cores (order kept)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_job, jobs))


def _compile_job(job: tuple) -> dict:
    return compile_kernel(*job)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="SM versions, e.g. 90 80")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="compiling processes")
    args = parser.parse_args()
    for row in compile_all(tuple(args.arch), args.workers):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
