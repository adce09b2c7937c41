# ruff: noqa: E501  (one mutation per line reads best)
"""Targeted mutation testing of the core modules (on demand, not in CI: each mutant runs a slice of the suite).

Each mutation is one deliberate bug: a file, an exact text to replace, its replacement, and the test files
that must catch it. The runner copies the working tree to a temporary folder per mutant, applies the bug,
runs those tests there, and reports ``caught`` (some test failed), ``SURVIVED`` (all passed) or ``stale``
(the text is no longer in the file: update the list). Native-kernel mutants build their own extension.

    python tests/mutations.py                 # every mutation
    python tests/mutations.py --only native   # names containing "native"
    python tests/mutations.py --list

A change to a kernel, its autograd wrapper or a trainer adds mutants of the same kind here and is not done
while any survives without a written reason (an equivalent mutant, for example).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()


INTERPRET = (("TRITON_INTERPRET", "1"),)

MUTATIONS: tuple[Mutation, ...] = (
    # the six holes of the first audit
    Mutation("torch-sv-cutoff-x10", "mlc_kernels/ops/gram_torch.py", "big = kept & (sv >= cutoff)",
             "big = kept & (sv >= 10 * cutoff)", ("tests/test_numerics.py", "tests/test_converged.py")),
    Mutation("native-half-grad-doubled", "csrc/mlc_native.cpp", ".copy_(at::bmm(b32", ".copy_(2 * at::bmm(b32", ("tests/test_numerics.py", "tests/test_api.py")),
    Mutation("fused-autocast-weight-grad-sign", "mlc_kernels/fused_linear.py",
             "                        grad_reps.mul_(scale)\n",
             "                        grad_reps.mul_(-scale)\n",
             ("tests/test_fused_linear.py",)),
    Mutation("hf-truncation-off", "mlc_kernels/hf.py", "    if truncate:\n        if k < len(layers):",
             "    if False:\n        if k < len(layers):", ("tests/test_hf.py", "tests/test_composition.py")),
    Mutation("trainer-weight-dropped", "mlc_kernels/mlc_term.py", "loss = align + weight * self._mlc_loss",
             "loss = align + self._mlc_loss", ("tests/test_trainers.py", "tests/test_composition.py")),
    Mutation("transfer-refusal-inverted", "mlc_kernels/transfer/evaluation.py",
             "[refusal] * len(prompts)) > response_logprobs(", "[refusal] * len(prompts)) < response_logprobs(",
             ("tests/test_transfer.py",)),
    # more of the same kinds
    Mutation("torch-proj-dropped", "mlc_kernels/ops/gram_torch.py", "core = mmat - torch.diag_embed(proj)",
             "core = mmat", ("tests/test_numerics.py",)),
    # equivalent mutant, kept as a record: masked rows have eigenvalue -1 and G is PSD on the present rows, so
    # they always sort after the min(c, d) kept slots; the threshold is a second guard, never the deciding one
    Mutation("torch-masked-eigenvalue-kept", "mlc_kernels/ops/gram_torch.py",
             "(lam > MASKED_EIGENVALUE_THRESHOLD)", "(lam > -2.0)", ("tests/test_numerics.py", "tests/test_api.py")),
    Mutation("torch-nan-hidden", "mlc_kernels/ops/gram_torch.py", "loss = torch.where(finite, loss, float(\"nan\"))",
             "loss = torch.where(finite, loss, 0.0)", ("tests/test_numerics.py", "tests/test_api.py")),
    Mutation("loss-mean-denominator", "mlc_kernels/checks.py", "return (present.sum(dim=1) >= 2).sum().clamp_min(1)",
             "return (present.sum(dim=1) >= 1).sum().clamp_min(1)", ("tests/test_api.py",)),
    Mutation("triton-grad-sign", "mlc_kernels/ops/triton/kernels.py", "bmat = (mmat - tl.where(eye, proj[:, None], 0.0))",
             "bmat = (tl.where(eye, proj[:, None], 0.0) - mmat)", ("tests/test_triton_objectives.py",), INTERPRET),
    Mutation("triton-anchor-ignored", "mlc_kernels/ops/triton/kernels.py", "bmat = tl.where(anchor & (rows[:, None] == base), 0.0, bmat)",
             "bmat = bmat", ("tests/test_triton_objectives.py",), INTERPRET),
    Mutation("triton-deflation-off", "mlc_kernels/ops/triton/launch.py", "float(common.DEFLATION_RATIO), deflated_cutoff",
             "0.0, deflated_cutoff", ("tests/test_converged.py",), INTERPRET),
    Mutation("torch-deflation-off", "mlc_kernels/ops/common.py", "DEFLATION_RATIO = 1e-2", "DEFLATION_RATIO = 0.0",
             ("tests/test_converged.py",)),
    Mutation("guard-center-mean-of-all-rows", "mlc_kernels/guards.py", "count = present.sum().clamp_min(1).to(x.dtype)",
             "count = torch.tensor(float(present.numel()), dtype=x.dtype)", ("tests/test_guards.py",)),
    Mutation("packed-positions-not-restarted", "mlc_kernels/hf.py", "positions[r, col : col + n] = torch.arange(n, device=input_ids.device)",
             "positions[r, col : col + n] = torch.arange(col, col + n, device=input_ids.device)", ("tests/test_hf.py",)),
    Mutation("gradcache-rng-replay-dropped", "mlc_kernels/hf.py", "with torch.enable_grad(), _replay_rng(states[index], input_ids.device):",
             "with torch.enable_grad():",
             ("tests/test_hf.py",)),
    Mutation("head-bias-ignored", "mlc_kernels/head.py", "F.linear(hidden, self.weight, self.bias)",
             "F.linear(hidden, self.weight)", ("tests/test_api.py", "tests/test_fused_linear.py")),
    Mutation("trainer-scale-ignores-processes", "mlc_kernels/mlc_term.py",
             "return self.accelerator.num_processes * self._trainer_loss_division",
             "return self._trainer_loss_division", ("tests/test_distributed.py",)),
    # the registry, the native custom op, meta tensors and torch.compile
    Mutation("registry-names-hardcoded", "mlc_kernels/loss.py", "IMPLEMENTATIONS: tuple[str, ...] = IMPLEMENTATION_NAMES",
             'IMPLEMENTATIONS: tuple[str, ...] = ("auto", "reference", "torch", "native")', ("tests/test_registry.py",)),
    Mutation("registry-triton-on-cpu", "mlc_kernels/ops/__init__.py", 'devices=("cuda", "meta"),',
             'devices=("cuda", "cpu", "meta"),', ("tests/test_registry.py",)),
    Mutation("native-fake-loss-dtype", "mlc_kernels/ops/native.py",
             "loss_dtype = torch.float64 if reps.dtype == torch.float64 else torch.float32", "loss_dtype = torch.float32",
             ("tests/test_registry.py",)),
    Mutation("native-build-traced", "mlc_kernels/ops/native.py", "@torch.compiler.assume_constant_result\ndef build_problem",
             "def build_problem", ("tests/test_registry.py",)),
    Mutation("native-meta-builds", "mlc_kernels/ops/__init__.py",
             'if reps.device.type == "meta":  # the fake kernel: nothing to build\n        return', "pass",
             ("tests/test_registry.py",)),
    Mutation("meta-autocast", "mlc_kernels/ops/common.py",
             'if device.type == "meta":\n        return contextlib.nullcontext()', "", ("tests/test_registry.py",)),
    Mutation("build-hash-ignores-torch", "mlc_kernels/ops/native.py", 'json.dumps({"torch": torch_version,',
             'json.dumps({"torch": "",', ("tests/test_registry.py",)),
    Mutation("dense-reference-keeps-padding", "mlc_kernels/ops/reference.py",
             "valid = torch.arange(s.shape[1], device=reps.device) < rank[:, None]",
             "valid = torch.arange(s.shape[1], device=reps.device) >= 0", ("tests/test_registry.py",)),
    # round 2 of the transfer study (issue 11) and the benchmark runner (issue 12)
    Mutation("trainer-lead-steps-ignored", "mlc_kernels/mlc_term.py", "align = align * 0.0", "align = align * 1.0",
             ("tests/test_composition.py",)),
    Mutation("transfer-lead-steps-not-added", "mlc_kernels/transfer/align.py",
             "steps += align.mlc_lead_steps if with_mlc else 0", "steps += 0", ("tests/test_transfer.py",)),
    Mutation("bench-rounds-not-pooled", "mlc_kernels/bench/utils.py",
             "samples[cell][mode] = samples[cell].get(mode, []) + values", "samples[cell][mode] = values",
             ("tests/test_bench_runner.py",)),
    Mutation("bench-prog-ignored", "mlc_kernels/bench/runner.py", "argparse.ArgumentParser(prog=prog,",
             'argparse.ArgumentParser(prog="mlc-bench",', ("tests/test_bench_runner.py",)),
    Mutation("compare-runs-normalise-ignored", "benchmarks/compare_runs.py",
             "scale_a, scale_b = (ca, cb) if normalise else (1.0, 1.0)", "scale_a, scale_b = (1.0, 1.0)",
             ("tests/test_bench_runner.py",)),
    # the authors' objective (relative_sv_softmax) and the non-deflated cut-off
    Mutation("torch-nondeflated-sv-cutoff-x10", "mlc_kernels/ops/gram_torch.py",
             "cutoff = torch.where(deflated, deflated_cutoff(m, acc), singular_value_cutoff(d, m, acc))[:, None]",
             "cutoff = torch.where(deflated, deflated_cutoff(m, acc), 10 * singular_value_cutoff(d, m, acc))[:, None]",
             ("tests/test_relative_objective.py",)),
    Mutation("reference-relative-stop-gradient-dropped", "mlc_kernels/ops/reference.py",
             "s = s / (s[:, :1].detach() + RELATIVE_SV_EPS)", "s = s / (s[:, :1] + RELATIVE_SV_EPS)",
             ("tests/test_relative_objective.py",)),
    Mutation("dense-reference-relative-stop-gradient-dropped", "mlc_kernels/ops/reference.py",
             "                s = s / (s[:, :1].detach() + RELATIVE_SV_EPS)", "                s = s / (s[:, :1] + RELATIVE_SV_EPS)",
             ("tests/test_registry.py", "tests/test_relative_objective.py")),
    Mutation("torch-relative-scale-dropped", "mlc_kernels/ops/gram_torch.py",
             "temp = tau * (sv[:, :1] + RELATIVE_SV_EPS) if code == 6 else tau", "temp = tau",
             ("tests/test_relative_objective.py",)),
    Mutation("native-relative-grad-unscaled", "csrc/mlc_native.cpp",
             "const double g = (ex[r] / denom - (r == 0 ? 1.0 : 0.0)) * scale;",
             "const double g = (ex[r] / denom - (r == 0 ? 1.0 : 0.0)) * inv_tau;", ("tests/test_relative_objective.py",)),
    Mutation("triton-relative-grad-unscaled", "mlc_kernels/ops/triton/kernels.py",
             "g = (ex / denom - top.to(tl.float32)) * scale", "g = (ex / denom - top.to(tl.float32)) * inv_tau",
             ("tests/test_triton_objectives.py",), INTERPRET),
    Mutation("triton-relative-not-deflated", "mlc_kernels/ops/triton/launch.py", "DEFLATED_OBJECTIVES = (0, 5, 6)",
             "DEFLATED_OBJECTIVES = (0, 5)", ("tests/test_relative_objective.py",), INTERPRET),
    # the authors' trainer setup (issue 18): schedule, state, weight under the DDP gradient cache, collapse rule
    Mutation("trainer-aux-every-ignored", "mlc_kernels/mlc_term.py",
             "self.state.global_step % self.mlc_args.aux_every == 0", "True", ("tests/test_authors_recipe.py",)),
    Mutation("hf-final-layer-pre-norm", "mlc_kernels/hf.py",
             "return (norm if final and norm is not None else layers[k - 1]), k",
             "return layers[k - 1], k", ("tests/test_authors_recipe.py",)),
    Mutation("trainer-ddp-grad-cache-weight-dropped", "mlc_kernels/mlc_term.py",
             "self.accelerator.backward(weight * early /", "self.accelerator.backward(early /",
             ("tests/test_distributed.py",)),
    Mutation("collapse-warning-absolute", "mlc_kernels/mlc_term.py",
             "below = spread < a.collapse_warn_ratio * start", "below = spread < 0.1",
             ("tests/test_guards.py",)),
    # the mlc command (mlc_kernels/cli/)
    Mutation("cli-usage-error-exit-1", "mlc_kernels/cli/main.py", "raise SystemExit(2) from None",
             "raise SystemExit(1) from None", ("tests/test_cli_errors.py",)),
    Mutation("cli-output-file-accepted", "mlc_kernels/cli/options.py", "if out.exists() and not out.is_dir():",
             "if False:", ("tests/test_cli_errors.py",)),
    Mutation("cli-eval-nan-kept", "mlc_kernels/cli/eval.py",
             "if isinstance(value, float) and not math.isfinite(value):\n        return None",
             "if isinstance(value, float) and not math.isfinite(value):\n        return value", ("tests/test_cli.py",)),
    # the native reduced op (kernel, reduction and autograd formula in C++), torch 2.11's meta path, the sum shortcut
    Mutation("native-reduced-mean-scale-dropped", "csrc/mlc_native.cpp", "sv_cutoff, 1.0 / count, losses,",
             "sv_cutoff, 1.0, losses,", ("tests/test_native_reduced.py",)),
    Mutation("native-reduced-count-every-prompt", "csrc/mlc_native.cpp",
             "count += std::count(p + i * m, p + (i + 1) * m, true) >= 2;", "count += 1;", ("tests/test_native_reduced.py",)),
    Mutation("native-reduced-double-backward-allowed", "csrc/mlc_native.cpp", "TORCH_CHECK(!at::GradMode::is_enabled(),",
             "TORCH_CHECK(true || !at::GradMode::is_enabled(),", ("tests/test_native_reduced.py",)),
    Mutation("native-reduced-upstream-ignored", "csrc/mlc_native.cpp", "if (upstream.defined()) {", "if (false) {",
             ("tests/test_native_reduced.py",)),
    Mutation("triton-meta-branch-dropped", "mlc_kernels/ops/triton/op.py",
             '    if reps.device.type == "meta":\n        return _forward_meta(', '    if False:\n        return _forward_meta(',
             ("tests/test_registry.py",)),
    Mutation("loss-sum-drops-uniformity", "mlc_kernels/loss.py", 'if reduction == "sum" and not uniform:',
             'if reduction == "sum":', ("tests/test_guards.py",)),
)


def _copy_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()  # fmt: skip
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def run(mutation: Mutation, timeout: int) -> tuple[str, float]:
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="mlc-mutant-") as tmp:
        work = Path(tmp)
        _copy_tree(work)
        target = work / mutation.path
        text = target.read_text()
        if mutation.old not in text:
            return "stale", 0.0
        target.write_text(text.replace(mutation.old, mutation.new, 1))
        env = {**os.environ, "PYTHONPATH": str(work), "TORCH_EXTENSIONS_DIR": str(work / ".torch_ext"),
               **dict(mutation.env)}  # fmt: skip
        tests = [t for t in mutation.tests if (work / t).exists()]
        try:
            out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                                 cwd=work, env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip
        except subprocess.TimeoutExpired:
            return "timeout", time.time() - start
        status = "SURVIVED" if out.returncode == 0 else ("caught" if out.returncode == 1 else f"error{out.returncode}")
        return status, time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="run the mutations whose name contains this")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per mutant")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if args.only in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name:36s} {m.path}")
        return
    survivors = []
    for m in chosen:
        status, seconds = run(m, args.timeout)
        print(f"{status:9s} {m.name:36s} {seconds:6.0f} s", flush=True)
        if status != "caught":
            survivors.append(m.name)
    print(f"{len(chosen) - len(survivors)} caught, {len(survivors)} not caught: {', '.join(survivors) or '-'}")
    sys.exit(1 if survivors else 0)


if __name__ == "__main__":
    main()
