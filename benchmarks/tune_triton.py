"""Time the fused Triton kernel (forward launch: loss + gradient) under candidate configurations.

GPU only. Writes ``triton_configs.csv`` to the output folder and prints the fastest configuration
per case. Inputs: "random" (bench inputs, Jacobi runs its full sweeps) and "collinear" (the
converged regime: one sweep), so the eigensolver's share of the time is visible.
"""

from __future__ import annotations

import argparse
import csv
import itertools
from pathlib import Path

import torch

from mlc_kernels import mlc_loss
from mlc_kernels.ops.triton_kernels import KernelConfig, kernel_config, kernel_config_override

from .runner import NOMINAL_BANDWIDTH, make_inputs, time_call


def candidates(m_pad: int) -> list[KernelConfig]:
    blocks, warps, stages = ((128, 256), (4, 8), (2, 3)) if m_pad == 16 else ((128,), (4, 8), (2,))
    return [
        KernelConfig(m_pad=m_pad, block_d=b, num_warps=w, num_stages=s, rotate_by_gather=g)
        for b, w, s, g in itertools.product(blocks, warps, stages, (True, False))
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    args = parser.parse_args(argv)
    name = torch.cuda.get_device_name()
    peak = next((bw for key, bw in NOMINAL_BANDWIDTH.items() if key in name), None)
    cases = [(4096, 10, 4096), (4096, 32, 1024)]
    rows = []
    for (n, m, d), kind in itertools.product(cases, ("random", "collinear")):
        reps = make_inputs(n, m, d, torch.bfloat16, torch.device("cuda"))
        if kind == "collinear":
            scales = torch.rand(n, m, 1, device="cuda", dtype=reps.dtype) + 0.1
            reps = (reps[:, :1] * scales).contiguous()
        leaf = reps.requires_grad_()
        default = kernel_config(m, torch.bfloat16)
        for cfg in candidates(default.m_pad):
            with kernel_config_override(cfg):
                try:
                    ms = time_call(lambda _, x=leaf: mlc_loss(x, impl="triton"), lambda: None, leaf.device, 0.2)
                except Exception as err:  # a configuration that does not compile or fit: record it
                    print(f"{cfg}: {type(err).__name__}: {str(err)[:200]}")
                    continue
            gbs = 3 * reps.numel() * reps.element_size() / (ms * 1e-3) / 1e9
            rows.append(
                {
                    "device": name,
                    "N": n,
                    "m": m,
                    "d": d,
                    "inputs": kind,
                    **{k: getattr(cfg, k) for k in ("m_pad", "block_d", "num_warps", "num_stages", "rotate_by_gather")},
                    "is_default": cfg == default,
                    "forward_ms": round(ms, 4),
                    "bandwidth_gbs": round(gbs, 1),
                    "bandwidth_pct_nominal": round(100 * gbs * 1e9 / peak, 1) if peak else None,
                }
            )
        case_rows = [r for r in rows if (r["N"], r["m"], r["d"], r["inputs"]) == (n, m, d, kind)]
        best = min(case_rows, key=lambda r: r["forward_ms"])
        dflt = next((r for r in case_rows if r["is_default"]), None)
        print(f"N={n} m={m} d={d} {kind}: best {best}")
        print(f"    default {dflt}")
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "triton_configs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
