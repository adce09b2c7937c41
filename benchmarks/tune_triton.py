"""Configuration sweep of the three Triton kernels (Gram, small m x m, gradient), per (m_pad, dtype, arch).

Coordinate search around the dispatcher's default, one phase at a time: the Gram kernel's block,
warps, stages and split target and the small kernel's warps and prompts per program are scored
by the forward (``mlc_forward``: Gram + small), the gradient kernel's block, warps, stages and
blocks per program by the backward (``mlc_grad``). Scores are summed over the phase's shapes
(medians of ``triton.testing.do_bench``). Every candidate is checked against the default's loss
and gradient first. Writes ``triton_configs.csv`` (every timing), ``tuned_configs.json``
(``{m_pad: KernelConfig fields}`` for bf16, what ``mlc-bench --triton-configs`` applies) and
``tuned_configs_all.json`` (``{"sm_<arch>/<dtype>/<m_pad>": fields}``) to ``--out``, and
``triton_tuned.py``: the shipped table (``mlc_kernels/ops/triton/tuned.py``) with this run's entries.
``--quick`` sweeps few candidates, bf16 only; ``--smoke`` runs tiny shapes on the CPU interpreter.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
from pathlib import Path

import torch

from mlc_kernels.bench.loss import make_inputs

from .kernel_targets import bench_ms

SHAPES = {16: [(4096, 10, 4096), (256, 10, 4096)], 32: [(4096, 32, 1024), (256, 32, 4096)]}
SMOKE_SHAPES = {16: [(3, 10, 64)], 32: [(2, 20, 32)]}

FULL_SPACE = {
    "gram_block_d": (64, 128, 256),
    "gram_warps": (2, 4, 8),
    "gram_stages": (2, 3, 4),
    "gram_programs": (1024, 2048, 4096, 8192),
    "small_warps": (1, 2, 4),
    "small_prompts": (1, 2),
    "grad_block_d": (64, 128, 256),
    "grad_warps": (2, 4, 8),
    "grad_stages": (2, 3, 4),
    "grad_blocks": (1, 2, 4, 8, 16),
}
QUICK_SPACE = {
    "gram_block_d": (128, 256),
    "gram_programs": (1024, 2048, 4096),
    "small_warps": (1, 2),
    "grad_warps": (4, 8),
    "grad_blocks": (1, 4, 16),
}
SMOKE_SPACE = {"gram_programs": (2, 8), "grad_blocks": (1, 2)}
FORWARD_FIELDS = ("gram_block_d", "gram_warps", "gram_stages", "gram_programs", "small_warps", "small_prompts")


def _forward(reps, mask):
    return torch.ops.mlc_kernels.mlc_forward(reps, mask, 1.0, 0, False, True)


def _grad(reps, mask, bmat, ones):
    return torch.ops.mlc_kernels.mlc_grad(reps, mask, bmat, ones)


def _score(cfg, cases, field: str, device) -> tuple[float, bool]:
    """Summed milliseconds of the phase ``field`` belongs to, and whether the outputs match the default's."""
    from mlc_kernels.ops.triton import kernel_config_override

    total, ok = 0.0, True
    with kernel_config_override({cfg.m_pad: cfg}):
        for reps, mask, ones, (ref_loss, _, ref_grad) in cases:
            loss, bmat = _forward(reps, mask)
            grad = _grad(reps, mask, bmat, ones)
            ok &= bool(torch.allclose(loss, ref_loss, rtol=1e-4, atol=1e-5))
            ok &= bool(torch.allclose(grad.float(), ref_grad.float(), rtol=2e-2, atol=1e-3 * ref_grad.abs().max()))
            if field in FORWARD_FIELDS:
                total += bench_ms(lambda r=reps, k=mask: _forward(r, k), device)
            else:
                total += bench_ms(lambda r=reps, k=mask, b=bmat, o=ones: _grad(r, k, b, o), device)
    return total, ok


def tune(m_pad: int, dtype: torch.dtype, arch: int, space: dict, shapes, device) -> tuple[object, list[dict]]:
    """Coordinate search over ``space`` from the default configuration; returns (best config, rows)."""
    from mlc_kernels.ops.triton import kernel_config

    best = kernel_config(m_pad, dtype, arch)
    cases = []
    for n, m, d in shapes:
        reps = make_inputs(n, m, d, dtype, device)
        mask = torch.ones(n, m, dtype=torch.uint8, device=device)
        ones = torch.ones(n, dtype=torch.float32, device=device)
        loss, bmat = _forward(reps, mask)
        cases.append((reps, mask, ones, (loss, bmat, _grad(reps, mask, bmat, ones))))
    rows = []
    for field, values in space.items():
        timings = {}
        for value in values:
            cfg = dataclasses.replace(best, **{field: value})
            try:
                ms, ok = _score(cfg, cases, field, device)
            except Exception as err:  # a configuration that does not compile or fit: record it
                print(f"{cfg}: {type(err).__name__}: {str(err)[:200]}", flush=True)
                continue
            name = str(dtype).removeprefix("torch.")
            rows.append({"arch": arch, "dtype": name, "tuned": field, **dataclasses.asdict(cfg),
                         "phase_ms": round(ms, 4), "matches_default": ok})  # fmt: skip
            if ok:
                timings[value] = ms
        if timings:
            best = dataclasses.replace(best, **{field: min(timings, key=timings.get)})
            print(f"m_pad={m_pad} {dtype} {field}: {timings} -> {getattr(best, field)}", flush=True)
    return best, rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--quick", action="store_true", help="few candidates, bf16 only")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    parser.add_argument("--m-pad", type=int, nargs="+", default=[16, 32], choices=(16, 32), help="tile sizes to tune")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from mlc_kernels.ops.triton import device_arch

    device = torch.device("cpu" if args.smoke else "cuda")
    arch = device_arch(device)
    space = SMOKE_SPACE if args.smoke else QUICK_SPACE if args.quick else FULL_SPACE
    dtypes = [torch.bfloat16] if (args.quick or args.smoke) else [torch.bfloat16, torch.float16, torch.float32]
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    rows, tuned, tuned_all = [], {}, {}
    for dtype in dtypes:
        for m_pad in args.m_pad:
            best, case_rows = tune(m_pad, dtype, arch, space, shapes[m_pad], device)
            rows += case_rows
            tuned_all[f"sm_{arch}/{str(dtype).removeprefix('torch.')}/{m_pad}"] = dataclasses.asdict(best)
            if dtype == torch.bfloat16:
                tuned[m_pad] = dataclasses.asdict(best)
            print(f"best sm_{arch} {dtype} m_pad={m_pad}: {best}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "triton_configs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "tuned_configs.json").write_text(json.dumps(tuned, indent=1))
    (args.out / "tuned_configs_all.json").write_text(json.dumps(tuned_all, indent=1))
    tuned_py = Path(__file__).resolve().parent.parent / "mlc_kernels" / "ops" / "triton" / "tuned.py"
    if tuned_py.exists():  # a drop-in replacement of the shipped table, this run's entries merged in
        from mlc_kernels.ops.triton.tuned import TUNED

        text = tuned_py.read_text()
        merged = {**TUNED, **tuned_all}
        entries = "".join(
            f'    "{key}": {{\n' + "".join(f'        "{k}": {v},\n' for k, v in fields.items()) + "    },\n"
            for key, fields in sorted(merged.items())
        )
        body = "TUNED: dict[str, dict[str, int]] = {\n" + entries + "}\n"
        (args.out / "triton_tuned.py").write_text(text[: text.index("TUNED:")] + body)


if __name__ == "__main__":
    main()
