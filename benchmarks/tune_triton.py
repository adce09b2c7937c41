"""Time the fused Triton kernel (forward launch: loss + gradient) under candidate configurations.

GPU only. Every candidate is first checked against the dispatcher's default configuration
(same loss and gradient within fp32/bf16 tolerances). Writes ``triton_configs.csv`` (all
timings) and ``tuned_configs.json`` (the fastest per m_pad on random inputs, which
``mlc-bench --triton-configs`` can apply) to the output folder. Inputs: "random" (Jacobi runs
its full sweeps) and "collinear" (the converged regime: one sweep). For the fastest
configuration it also times the forward without gradient and the ``pairwise`` objective (no
eigensolver), to show where the time goes.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
from pathlib import Path

import torch

from mlc_kernels import mlc_loss
from mlc_kernels.ops.triton_kernels import KernelConfig, device_arch, kernel_config, kernel_config_override

from .runner import NOMINAL_BANDWIDTH, make_inputs, time_call


def candidates(m_pad: int, quick: bool = False) -> list[KernelConfig]:
    if quick:  # around the shipped sm_90 defaults only
        if m_pad == 16:
            return [KernelConfig(16, b, w, 3) for b in (128, 256) for w in (2, 4)]
        return [KernelConfig(32, 128, w, 3) for w in (2, 4)]
    if m_pad == 16:
        blocks, warps, stages = (128, 256, 512), (1, 2, 4), (2, 3, 4)
    else:
        blocks, warps, stages = (128, 256), (1, 2, 4), (2, 3)
    return [KernelConfig(m_pad, b, w, s) for b, w, s in itertools.product(blocks, warps, stages)]


def _loss_and_grad(x: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = x.detach().clone().requires_grad_()
    loss = mlc_loss(leaf, impl="triton", reduction="none", **kw)
    loss.sum().backward()
    return loss, leaf.grad


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--quick", action="store_true", help="only a few candidates around the defaults")
    args = parser.parse_args(argv)
    name = torch.cuda.get_device_name()
    peak = next((bw for key, bw in NOMINAL_BANDWIDTH.items() if key in name), None)
    dtype = torch.bfloat16
    rows, tuned = [], {}
    for (n, m, d), kind in itertools.product([(4096, 10, 4096), (4096, 32, 1024)], ("random", "collinear")):
        reps = make_inputs(n, m, d, dtype, torch.device("cuda"))
        if kind == "collinear":
            scales = torch.rand(n, m, 1, device="cuda", dtype=dtype) + 0.1
            reps = (reps[:, :1] * scales).contiguous()
        default = kernel_config(m, dtype, device_arch(torch.device("cuda")))
        check = reps[:64]
        ref_loss, ref_grad = _loss_and_grad(check)
        nbytes = 3 * reps.numel() * reps.element_size()

        def timed(cfg: KernelConfig, grad: bool = True, objective: str = "sv_softmax", reps=reps) -> float:
            leaf = reps.detach().requires_grad_(grad)
            with kernel_config_override({cfg.m_pad: cfg}):
                return time_call(
                    lambda _: mlc_loss(leaf, impl="triton", objective=objective), lambda: None, leaf.device, 0.2
                )

        case_rows = []
        for cfg in candidates(default.m_pad, args.quick):
            try:
                with kernel_config_override({cfg.m_pad: cfg}):
                    loss, grad = _loss_and_grad(check)
                ok = torch.allclose(loss, ref_loss, rtol=1e-4, atol=1e-5) and bool(
                    torch.nn.functional.cosine_similarity(grad.double().flatten(), ref_grad.double().flatten(), 0)
                    > 0.9999
                )
                ms = timed(cfg) if ok else float("nan")
            except Exception as err:  # a configuration that does not compile or fit: record it
                print(f"{cfg}: {type(err).__name__}: {str(err)[:200]}")
                continue
            gbs = nbytes / (ms * 1e-3) / 1e9
            row = {
                "device": name,
                "N": n,
                "m": m,
                "d": d,
                "inputs": kind,
                **dataclasses.asdict(cfg),
                "is_default": cfg == default,
                "matches_default": ok,
                "forward_ms": round(ms, 4),
                "bandwidth_gbs": round(gbs, 1),
                "bandwidth_pct_nominal": round(100 * gbs * 1e9 / peak, 1) if peak else None,
            }
            case_rows.append(row)
        rows += case_rows
        valid = [r for r in case_rows if r["matches_default"]]
        best = min(valid, key=lambda r: r["forward_ms"])
        best_cfg = KernelConfig(*(best[k] for k in ("m_pad", "block_d", "num_warps", "num_stages")))
        if kind == "random":
            tuned[best_cfg.m_pad] = dataclasses.asdict(best_cfg)
        dflt = next((r for r in case_rows if r["is_default"]), None)
        no_grad_ms = timed(best_cfg, grad=False)
        pairwise_ms = timed(best_cfg, objective="pairwise")
        print(
            f"N={n} m={m} d={d} {kind}: best {best_cfg} {best['forward_ms']} ms "
            f"({best['bandwidth_pct_nominal']}% of nominal bandwidth); default "
            f"{dflt['forward_ms'] if dflt else '-'} ms; same config without gradient {no_grad_ms:.4f} ms, "
            f"pairwise objective (no eigensolver) {pairwise_ms:.4f} ms"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "triton_configs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "tuned_configs.json").write_text(json.dumps(tuned, indent=1))


if __name__ == "__main__":
    main()
