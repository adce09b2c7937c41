"""Host time per forward+backward of ``mlc_loss`` for each impl, as a ratio to ``F.cross_entropy`` at a tiny size
(logits (4, 16)) measured in the same interleaved run (issue 22, items 3 and 6).

Shapes: the tiny (4, 4, 16) and the realistic training shape (8 and 64 prompts, m = 10, d = 512); inputs random
and converged (variants ``u + spread * noise``, spread 0.1 and 0.3: where the softmax objectives' deflation runs).
On CPU ``native`` and ``torch`` run for real (at d = 512 their time includes the arithmetic, not only host work);
``triton`` runs Triton's real Python launch path (argument binding, cache lookup, launcher call) with a stand-in
driver that compiles for sm_90 and launches nothing: its ratio is the host cost a GPU would wait for. On CUDA every
impl runs for real (synchronised after each timed block).

    python -m benchmarks.host_overhead [--device cpu|cuda] [--rounds 15] [--out results.json]

Prints one JSON line per case; ``--out`` also writes them as a JSON list. The triton stand-in runs in a child
process (the driver is replaced process-wide; no ``TRITON_INTERPRET``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = ((4, 4, 16), (8, 10, 512), (64, 10, 512))
INPUTS = ("random", "spread=0.3", "spread=0.1")
OBJECTIVE = "relative_sv_softmax"  # the default objective, one that deflates
GOALS = {"native": 2.0, "torch": 5.0, "triton": 3.0}
"""Issue 22's goals at the tiny shape, as a ratio to ``F.cross_entropy``."""


def make_reps(shape: tuple[int, int, int], kind: str, device: str) -> torch.Tensor:
    """``(N, m, d)`` fp32: random rows, or converged ones ``u + spread * noise`` with random positive scales."""
    n, m, d = shape
    gen = torch.Generator().manual_seed(0)
    if kind == "random":
        reps = torch.randn(n, m, d, generator=gen)
    else:
        spread = float(kind.split("=")[1])
        u = torch.randn(n, 1, d, generator=gen)
        noise = torch.randn(n, m, d, generator=gen) / math.sqrt(d) * u.norm(dim=-1, keepdim=True)
        reps = (u + spread * noise) * (torch.rand(n, m, 1, generator=gen) * 3 + 0.1)
    return reps.to(device).requires_grad_()


def _install_stand_in_driver() -> None:
    """Replace Triton's active driver: kernels compile for sm_90 (real binding, specialisation and cache) and every
    launch goes to a launcher that does nothing."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class Utils:
        def load_binary(self, name, kernel, shared, device):
            return 1, 1, 0, 0, 1024

        def get_device_properties(self, device):
            return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

        def unload_module(self, module):
            pass

    class StandInDriver:
        utils = Utils()

        def __init__(self) -> None:
            self.launcher_cls = lambda src, metadata: lambda *args: None

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def is_active(self):
            return True

    driver.set_active(StandInDriver())
    import mlc_kernels.ops as ops

    ops.interpreting = lambda: True  # the registry lets impl="triton" take CPU tensors; the launches use sm_90 sizes


def _step(reps: torch.Tensor, impl: str):
    from mlc_kernels import mlc_loss

    def run() -> None:
        reps.grad = None
        mlc_loss(reps, impl=impl, objective=OBJECTIVE).backward()

    return run


def _baseline(device: str):
    logits = torch.randn(4, 16, device=device, requires_grad=True)
    target = torch.arange(4, device=device)

    def run() -> None:
        logits.grad = None
        F.cross_entropy(logits, target).backward()

    return run


def _time(fn, iters: int, device: str) -> float:
    """Seconds per call of ``fn`` over ``iters`` calls."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def measure(impls: list[str], device: str, rounds: int, iters: int) -> list[dict]:
    """Interleaved rounds: each round times the baseline and every case once; medians over rounds."""
    cases = {("cross_entropy", (4, 16), "-"): _baseline(device)}
    for impl in impls:
        for shape in SHAPES:
            for kind in INPUTS:
                cases[(impl, shape, kind)] = _step(make_reps(shape, kind, device), impl)
    for fn in cases.values():  # warm-up: builds, compiles, launch plans
        fn()
        fn()
    times: dict[tuple, list[float]] = {key: [] for key in cases}
    for _ in range(rounds):
        for key, fn in cases.items():
            times[key].append(_time(fn, iters, device))
    base = statistics.median(times[("cross_entropy", (4, 16), "-")])
    rows = []
    for (impl, shape, kind), samples in times.items():
        med = statistics.median(samples)
        row = {"impl": impl, "shape": list(shape), "inputs": kind, "device": device, "us_per_fwd_bwd": med * 1e6,
               "ratio_to_cross_entropy": med / base}  # fmt: skip
        if impl in GOALS and tuple(shape) == SHAPES[0]:
            row["goal"] = GOALS[impl]
        if impl == "triton" and device == "cpu":
            row["note"] = "stand-in driver: Triton's Python launch path, no kernel runs"
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--impls", default=None, help="comma-separated (default: native,torch,triton on CPU)")
    parser.add_argument("--out", default=None, help="also write the rows as a JSON list here")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: host cost only)")
    parser.add_argument("--stand-in", action="store_true", help=argparse.SUPPRESS)  # the triton child on CPU
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.stand_in:
        _install_stand_in_driver()
    impls = args.impls.split(",") if args.impls else (["triton", "torch"] if args.device == "cuda" else
                                                      ["native", "torch", "triton"])  # fmt: skip
    rows = []
    local = [i for i in impls if not (i == "triton" and args.device == "cpu" and not args.stand_in)]
    if local:
        rows += measure(local, args.device, args.rounds, args.iters)
    if len(local) < len(impls):  # triton on CPU: its own process with the stand-in driver (and its own baseline)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "benchmarks.host_overhead", "--device", "cpu", "--impls", "triton", "--stand-in",
               "--rounds", str(args.rounds), "--iters", str(args.iters), "--threads", str(args.threads)]  # fmt: skip
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    for row in rows:
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
