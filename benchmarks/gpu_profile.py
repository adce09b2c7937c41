"""Where the Triton loss's time goes on a GPU (issue 22, item 7), in one run:

1. ``kernels``: device time of each Triton kernel (Gram, small m x m, gradient) per forward+backward, from
   ``torch.profiler``, at three shapes and two input spreads (random rows; converged rows ``u + 0.1 * noise``, where
   the softmax objectives deflate), beside the whole call's host time (Python until the last launch returns, no
   sync) and device time (CUDA events around the same calls).
2. ``graph``: forward+backward at N = 256 eagerly and replayed from one captured CUDA graph: the replay is the floor
   a host-free launch path would reach.
3. ``eigh``: ``torch.linalg.eigh`` of (4096, 32, 32) fp32 matrices, the batched solver baseline for the small
   kernel's Jacobi at (4096, 32, d).
4. ``fused``: fused linear MLC loss (bf16, (1024, 10, 4096 -> 1024)) peak extra memory at the default chunk and at
   1, 2, 4, 8, 16 chunks; the part that does not shrink with the chunk is the intercept of peak against chunk rows.

    python -m benchmarks.gpu_profile --out DIR [--parts kernels,graph,eigh,fused] [--smoke]

Writes ``gpu_profile.json`` (every row) and ``gpu_profile.txt`` (one line per row) to ``--out``. ``--smoke`` runs
tiny shapes on the CPU (Triton interpreter; the ``graph`` part is skipped without CUDA) to check the script.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

SHAPES = ((256, 10, 512), (256, 10, 4096), (4096, 10, 4096), (4096, 32, 1024))
SMOKE_SHAPES = ((4, 10, 32),)
SPREADS = ("random", "spread=0.1")
OBJECTIVE = "relative_sv_softmax"
KERNELS = ("mlc_gram_kernel", "mlc_small_kernel", "mlc_grad_kernel")


def make_reps(shape, kind: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(N, m, d)`` leaf in ``dtype``: :func:`benchmarks.host_overhead.make_reps`'s random or converged rows."""
    from benchmarks.host_overhead import make_reps as fp32_reps

    return fp32_reps(shape, kind, "cpu").detach().to(device=device, dtype=dtype).requires_grad_()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fwd_bwd(leaf: torch.Tensor, impl: str = "triton") -> None:
    from mlc_kernels import mlc_loss

    leaf.grad = None
    mlc_loss(leaf, impl=impl, objective=OBJECTIVE).backward()


def host_and_device_ms(fn, device: torch.device, iters: int) -> tuple[float, float]:
    """(host ms per call: until the call returns, no sync; device ms per call: events around the same calls)."""
    for _ in range(3):
        fn()
    _sync(device)
    host = []
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t)
    if device.type == "cuda":
        end.record()
        end.synchronize()
        device_ms = start.elapsed_time(end) / iters
    else:
        device_ms = (time.perf_counter() - t0) * 1e3 / iters
    host.sort()
    return 1e3 * host[len(host) // 2], device_ms


def kernel_device_us(fn, device: torch.device, iters: int) -> dict[str, float]:
    """Device microseconds per call of each kernel (summed over its launches), from ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync(device)
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(iters):
            fn()
        _sync(device)
    out: dict[str, float] = {}
    for evt in prof.key_averages():
        name = next((k for k in KERNELS if k in evt.key), None)
        if name is None:
            continue
        total = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0) or evt.cpu_time_total
        out[name] = out.get(name, 0.0) + total / iters
    other = 0.0
    if device.type == "cuda":
        for evt in prof.key_averages():
            if evt.device_type == torch.autograd.DeviceType.CUDA and not any(k in evt.key for k in KERNELS):
                other += getattr(evt, "device_time_total", 0.0) / iters
    out["other_device_kernels"] = other
    return {k: round(v, 2) for k, v in out.items()}


def part_kernels(device, dtype, shapes, iters) -> list[dict]:
    from mlc_kernels.bench.utils import nominal_bandwidth

    rows = []
    peak = nominal_bandwidth(device)
    for shape in shapes:
        for kind in SPREADS:
            leaf = make_reps(shape, kind, dtype, device)
            host_ms, device_ms = host_and_device_ms(lambda leaf=leaf: fwd_bwd(leaf), device, iters)
            per_kernel = kernel_device_us(lambda leaf=leaf: fwd_bwd(leaf), device, max(3, iters // 4))
            nbytes = leaf.numel() * leaf.element_size()
            row = {"part": "kernels", "shape": list(shape), "inputs": kind, "dtype": str(dtype)[6:],
                   "objective": OBJECTIVE, "host_ms": round(host_ms, 4), "device_ms": round(device_ms, 4),
                   "kernels_us": per_kernel}  # fmt: skip
            if peak:
                row["pct_nominal_3_passes"] = round(100 * 3 * nbytes / (device_ms * 1e-3) / peak, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def part_graph(device, dtype, shape, iters) -> list[dict]:
    if device.type != "cuda":
        return [{"part": "graph", "skipped": "no CUDA"}]
    leaf = make_reps(shape, "random", dtype, device)
    _, eager_ms = host_and_device_ms(lambda leaf=leaf: fwd_bwd(leaf), device, iters)
    _, torch_ms = host_and_device_ms(lambda: fwd_bwd(leaf, "torch"), device, iters)
    from mlc_kernels import mlc_loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            (grad,) = torch.autograd.grad(mlc_loss(leaf, impl="triton"), leaf)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = mlc_loss(leaf, impl="triton")
        (grad,) = torch.autograd.grad(loss, leaf)
    graph.replay()
    torch.cuda.synchronize()
    expect = torch.autograd.grad(mlc_loss(leaf, impl="triton"), leaf)[0]
    same = bool(torch.allclose(grad.float(), expect.float(), rtol=1e-2, atol=1e-4))
    _, replay_ms = host_and_device_ms(graph.replay, device, iters)
    row = {"part": "graph", "shape": list(shape), "dtype": str(dtype)[6:], "eager_ms": round(eager_ms, 4),
           "graph_replay_ms": round(replay_ms, 4), "torch_composite_ms": round(torch_ms, 4),
           "eager_over_replay": round(eager_ms / replay_ms, 2), "torch_over_replay": round(torch_ms / replay_ms, 2),
           "torch_over_eager": round(torch_ms / eager_ms, 2), "replay_grad_matches_eager": same}  # fmt: skip
    print(json.dumps(row), flush=True)
    return [row]


def part_eigh(device, shape, iters) -> list[dict]:
    n, m, d = shape
    x = torch.randn(n, m, d, device=device)
    gram = (x @ x.transpose(1, 2)).float()
    _, eigh_ms = host_and_device_ms(lambda: torch.linalg.eigh(gram), device, iters)
    leaf = make_reps(shape, "random", torch.bfloat16 if device.type == "cuda" else torch.float32, device)
    from mlc_kernels import mlc_loss

    def loss_only():
        with torch.no_grad():
            mlc_loss(leaf, impl="triton")

    _, loss_ms = host_and_device_ms(loss_only, device, iters)
    per_kernel = kernel_device_us(loss_only, device, max(3, iters // 4))
    row = {"part": "eigh", "batch": [n, m, m], "eigh_ms": round(eigh_ms, 4), "triton_loss_only_ms": round(loss_ms, 4),
           "triton_small_kernel_us": per_kernel.get("mlc_small_kernel"), "reps_shape": list(shape)}  # fmt: skip
    print(json.dumps(row), flush=True)
    return [row]


def part_fused(device, dtype, shape, iters) -> list[dict]:
    from mlc_kernels import fused_linear_mlc_loss, mlc_loss
    from mlc_kernels.fused_linear import default_chunk_prompts

    n, m, d_h, d = shape
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, m, d_h, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(d, d_h, generator=gen) / math.sqrt(d_h)).to(device, dtype).requires_grad_()
    bias = torch.zeros(d).to(device, dtype).requires_grad_()
    default = default_chunk_prompts(n, m, device)

    def run(chunk):
        for p in (hidden, weight, bias):
            p.grad = None
        if chunk == "unfused":
            loss = mlc_loss(torch.nn.functional.linear(hidden, weight, bias), impl="auto")
        else:
            loss = fused_linear_mlc_loss(hidden, weight, bias, chunk_size=chunk)
        loss.backward()

    rows = []
    for chunk in ["unfused", default, *[max(1, n // k) for k in (1, 2, 4, 8, 16)]]:
        run(chunk)
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        run(chunk)
        _sync(device)
        extra = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
        _, ms = host_and_device_ms(lambda c=chunk: run(c), device, iters)
        rows.append({"part": "fused", "shape": list(shape), "dtype": str(dtype)[6:], "chunk_prompts": chunk,
                     "default": chunk == default, "extra_mib": None if extra is None else round(extra, 1),
                     "ms": round(ms, 4)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    unfused = rows[0]
    chunked = [r for r in rows[1:] if not r["default"]] or rows[1:]
    if unfused["extra_mib"] is not None:
        for r in rows[1:]:
            r["mem_over_unfused"] = round(r["extra_mib"] / unfused["extra_mib"], 3)
            r["time_over_unfused"] = round(r["ms"] / unfused["ms"], 3)
        rows.append(attribution(chunked, weight.numel() * weight.element_size() / 2**20))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def attribution(chunked: list[dict], weight_mib: float) -> dict:
    """Least-squares line of peak extra MiB against chunk prompts: the slope (MiB per prompt in a chunk) and the
    intercept (MiB that do not shrink with the chunk, e.g. weight-sized buffers)."""
    xs = [float(r["chunk_prompts"]) for r in chunked]
    ys = [float(r["extra_mib"]) for r in chunked]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    intercept = mean_y - slope * mean_x
    return {"part": "fused_attribution", "mib_per_chunk_prompt": round(slope, 4),
            "mib_not_shrinking_with_chunk": round(intercept, 1), "weight_mib": round(weight_mib, 1)}  # fmt: skip


def line(row: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in row.items())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--parts", default="kernels,graph,eigh,fused")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    iters = 3 if args.smoke else args.iters
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    parts = args.parts.split(",")
    runs = {
        "kernels": lambda: part_kernels(device, dtype, SMOKE_SHAPES if args.smoke else SHAPES, iters),
        "graph": lambda: part_graph(device, dtype, (4, 10, 32) if args.smoke else (256, 10, 4096), iters),
        "eigh": lambda: part_eigh(device, (4, 32, 16) if args.smoke else (4096, 32, 1024), iters),
        "fused": lambda: part_fused(device, dtype, (16, 10, 64, 32) if args.smoke else (1024, 10, 4096, 1024), iters),
    }
    for part in parts:
        try:  # one part failing (e.g. graph capture) must not lose the others' rows
            rows += runs[part]()
        except Exception as exc:  # noqa: BLE001
            rows.append({"part": part, "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(json.dumps(rows[-1]), flush=True)
        (args.out / "gpu_profile.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "gpu_profile.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "gpu_profile.txt").write_text("\n".join(line(r) for r in rows) + "\n")


if __name__ == "__main__":
    main()
