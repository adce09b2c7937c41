"""A new user's first hour with ``mlc train``, ``mlc demo``, ``mlc transfer`` and ``mlc bench`` (issue 20): the
ordinary mistakes are one line and exit status 2, checked before any model loads, with nothing created (finding
4); the silently accepted values are refused (finding 5); the noise is gone (finding 7); ``mlc bench --quick``
(finding 11); ``training.png``'s labels (finding 8)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("trl")

from cli_helpers import save_tiny_model, user_error  # noqa: E402

from mlc_kernels.cli import main  # noqa: E402

TRAIN = ["--max-steps", "1", "--algorithm", "sft", "--mlc-layer", "2", "--languages", "en,zh,ru"]
ZERO2 = '{"zero_optimization": {"stage": 2}, "train_batch_size": "auto", "train_micro_batch_size_point": "auto"}'


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("first_hour") / "model")


def _writable(folder: Path) -> bool:
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return False
    return True


@pytest.fixture
def read_only(tmp_path):
    """A folder where nothing can be created: a chmod 555 folder, or (as root, who ignores modes) /sys."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    if _writable(folder):
        folder.chmod(0o755)
        folder = Path("/sys")
        if not _writable(folder) and not (folder / "mlc_out").exists():
            yield folder
            return
        pytest.skip("no read-only folder on this machine")
    yield folder
    folder.chmod(0o755)


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a model loads, the demo or transfer runs start, or a benchmark suite starts."""
    from mlc_kernels.bench import runner
    from mlc_kernels.cli import options, train
    from mlc_kernels.transfer import demo, v2

    def loaded(*args, **kwargs):
        raise AssertionError("work started before the mistake was caught")

    for module, name in ((options, "load_model"), (train, "load_model"), (options, "load_tokenizer"),
                         (train, "load_tokenizer"), (demo, "run_demo"), (v2, "report")):  # fmt: skip
        monkeypatch.setattr(module, name, loaded)
    monkeypatch.setattr(runner, "SUITES", {name: type("Suite", (), {"run": loaded}) for name in runner.SUITES})


def _without(monkeypatch, package: str) -> None:
    """As if ``package`` were not installed: ``find_spec`` and the distribution's metadata."""
    find_spec, version = importlib.util.find_spec, importlib.metadata.version

    def no_version(name: str) -> str:
        if name == package:
            raise importlib.metadata.PackageNotFoundError(name)
        return version(name)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else find_spec(name, *a))
    monkeypatch.setattr(importlib.metadata, "version", no_version)


MISTAKES = {  # name -> (argv after the command; {out}: the output folder, {model}: the tiny model), error pattern
    "learning-rate nan": (["train", "--model", "{model}", "--output-dir", "{out}", "--learning-rate", "nan"],
                          r"--learning_rate must be a finite number >= 0, got nan"),
    "batch-size 0": (["train", "--model", "{model}", "--output-dir", "{out}", "--batch-size", "0"],
                     r"--per_device_train_batch_size must be >= 1, got 0"),
    "train read-only output": (["train", "--model", "{model}", "--output-dir", "{ro}/out"],
                               r"--output_dir .*/out: cannot create it here \(.*\); give a writable folder"),
    "demo read-only output": (["demo", "--out", "{ro}/out"],
                              r"--out .*/out: cannot create it here \(.*\); give a writable folder"),
    "triton without a GPU": (["train", "--model", "{model}", "--output-dir", "{out}", "--mlc_impl", "triton"],
                             r"--mlc_impl triton needs a CUDA device .*TRITON_INTERPRET=1.*--mlc_impl torch"),
    "ddp_find_unused_parameters": (["train", "--model", "{model}", "--output-dir", "{out}",
                                    "--ddp_find_unused_parameters", "true"],
                                   r"--ddp_find_unused_parameters true cannot be used with MLC"),
    "deepspeed not installed": (["train", "--model", "{model}", "--output-dir", "{out}", "--deepspeed", "{ds}"],
                                r"--deepspeed needs the deepspeed package \(pip install deepspeed\)$"),
    "bench grid": (["bench", "--grid", "64x10", "--out", "{out}"],
                   r"--grid: expected NxMxD with positive integers \(e\.g\. 64x10x1024\), got '64x10'"),
    "bench cuda": (["bench", "--device", "cuda", "--out", "{out}"], r"--device cuda: no CUDA device here"),
    "bench impls": (["bench", "--impls", "foo", "--out", "{out}"],
                    r"--impls: unknown 'foo'; choose from reference, torch, native, triton"),
    "transfer seeds": (["transfer", "--seeds", "abc", "--out", "{out}"],
                       r"--seeds must be a comma list of integers, got 'abc'"),
    "transfer world": (["transfer", "--world", "v9", "--out", "{out}"], r"--world must be v2 or v3, got 'v9'"),
    "transfer layer": (["transfer", "--mlc-layer", "7", "--out", "{out}"], r"--mlc-layer must be in 1\.\.4, got 7"),
}  # fmt: skip
"""Finding 4's mistakes (``mlc eval``'s read-only ``--out`` is tested with eval)."""


@pytest.mark.parametrize("name", list(MISTAKES))
def test_ordinary_mistakes_are_one_line(name, model_dir, tmp_path, capsys, monkeypatch, read_only, no_loading):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without CUDA
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _without(monkeypatch, "deepspeed")
    (tmp_path / "ds.json").write_text(ZERO2)
    out = tmp_path / "out"
    argv, match = MISTAKES[name]
    argv = [a.format(model=model_dir, out=out, ro=read_only, ds=tmp_path / "ds.json") for a in argv]
    if argv[0] == "train":
        argv += TRAIN
    before = sorted(p.name for p in tmp_path.iterdir())
    user_error(main, argv, capsys, match, untouched=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if "{ro}/out" in MISTAKES[name][0]:
        assert not (read_only / "out").exists()


# Finding 5: accepted silently before


@pytest.mark.parametrize("steps", ["0", "-5"])
def test_max_steps_must_be_positive_or_minus_one(steps, model_dir, tmp_path, capsys, no_loading):
    out = tmp_path / "out"
    argv = ["train", "--model", str(model_dir), "--output-dir", str(out), *TRAIN, "--max-steps", steps]
    user_error(main, argv, capsys, rf"--max_steps must be >= 1, or -1 \(train for --num_train_epochs\), got {steps}$",
               untouched=out)  # fmt: skip


def test_bench_budget_must_be_positive(tmp_path, capsys, no_loading):
    out = tmp_path / "out"
    user_error(main, ["bench", "--budget", "-1", "--out", str(out)], capsys,
               r"--budget: expected a number of seconds > 0, got '-1'", untouched=out)  # fmt: skip


def test_head_on_the_wrong_hidden_size_names_it():
    import torch

    from mlc_kernels.head import MLCHead

    head = MLCHead(64, 32)
    for call in (head, head.loss):
        with pytest.raises(ValueError, match=r"MLCHead\(hidden_size=64\): hidden has last dimension 48, expected 64"):
            call(torch.randn(2, 3, 48))
    assert head(torch.randn(2, 3, 64)).shape == (2, 3, 32)


def test_tau_below_the_smallest_sensible_value_is_refused(model_dir, tmp_path, capsys, no_loading):
    import torch

    from mlc_kernels import mlc_loss
    from mlc_kernels.checks import MIN_TAU
    from mlc_kernels.head import MLCHead

    reps = torch.randn(4, 3, 16)
    for call in (lambda tau: mlc_loss(reps, tau=tau, impl="torch"), lambda tau: MLCHead(16, 8).loss(reps, tau=tau)):
        with pytest.raises(ValueError, match=r"tau must be >= 0\.0001, got 1e-30: below it the softmax"):
            call(1e-30)
        assert torch.isfinite(call(MIN_TAU))
    out = tmp_path / "out"
    user_error(main, ["train", "--model", str(model_dir), "--output-dir", str(out), *TRAIN, "--mlc-tau", "1e-30"],
               capsys, r"--mlc_tau must be >= 0\.0001, got 1e-30", untouched=out)  # fmt: skip
    user_error(main, ["transfer", "--mlc-tau", "1e-30", "--out", str(out)], capsys,
               r"--mlc-tau must be >= 0\.0001, got 1e-30", untouched=out)  # fmt: skip


# Finding 7: noise


def _mlc(*argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``mlc argv`` as a user runs it: a fresh process, its own environment (no DeepSpeed or warning settings)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "PYTHONWARNINGS", "MLC_DEBUG")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    return subprocess.run([sys.executable, "-m", "mlc_kernels.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=timeout)  # fmt: skip


def test_training_and_resuming_print_no_noise(model_dir, tmp_path):
    """No DeepSpeed accelerator warning, no FutureWarning, one short line per logging step instead of a dict of 25
    keys, and no "missing keys ['lm_head.weight']" when resuming a model with tied embeddings."""
    out = tmp_path / "run"
    first = _mlc("train", "--model", str(model_dir), "--output-dir", str(out), *TRAIN, "--max-steps", "2",
                 "--batch-size", "2", "--mlc-rep-size", "8", "--save-steps", "1")  # fmt: skip
    resumed = _mlc("train", "--model", str(model_dir), "--output-dir", str(out), *TRAIN, "--max-steps", "3",
                   "--batch-size", "2", "--mlc-rep-size", "8", "--resume-from-checkpoint", "last")  # fmt: skip
    for run in (first, resumed):
        text = run.stdout + run.stderr
        assert run.returncode == 0, text[-3000:]
        assert "Setting accelerator to CPU" not in text
        assert "FutureWarning" not in text
        assert "{'loss'" not in text and "'mlc/loss'" not in text
        assert "missing keys" not in text
    assert re.search(r"step 1/2: loss [\d.]+, MLC loss [\d.]+", first.stdout + first.stderr)
    assert re.search(r"step 3/3: loss [\d.]+", resumed.stdout + resumed.stderr)


def test_a_bad_choice_is_one_line_without_the_usage(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    user_error(main, ["train", "--model", str(model_dir), "--output-dir", str(out), *TRAIN, "--mlc_objective", "foo"],
               capsys, r"argument --mlc_objective\S*: invalid choice: 'foo'", untouched=out)  # fmt: skip
    main_line = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert main_line == []  # user_error read it: nothing else was printed
    with pytest.raises(SystemExit):
        main(["train", "--mlc_objective", "foo"])
    assert len([line for line in capsys.readouterr().err.splitlines() if line.strip()]) == 1


def test_train_help_puts_mlc_options_first_and_shows_defaults_once(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert exc.value.code == 0
    assert text.splitlines()[0].startswith("usage: mlc train --model MODEL") and not text.splitlines()[1].strip()
    sections = ["mlc train: the data and the algorithm:", "the MLC term (--mlc_*):", "TRL's ModelConfig:",
                "TRL's DPOConfig:"]  # fmt: skip
    where = [text.index(section) for section in sections]
    assert where == sorted(where), where
    assert "(default: None)" not in text
    flat = " ".join(text.split())
    assert flat.count("(default: the first of --languages)") == 1
    assert "(default: the first of --languages) (default" not in flat


def test_a_hub_id_offline_fails_fast(monkeypatch, tmp_path, capsys):
    """Offline, a hub id that is not cached is refused at once (the hub client retried for 53 s)."""
    import socket

    def offline(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", offline)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    out = tmp_path / "out"
    start = time.perf_counter()
    user_error(main, ["train", "--model", "nobody/no-such-model-1234", "--output-dir", str(out), *TRAIN], capsys,
               r"--model nobody/no-such-model-1234: no such folder, and the hub cannot be reached .*Network is "
               r"unreachable", untouched=out)  # fmt: skip
    assert time.perf_counter() - start < 10


# Finding 8: training.png


def test_training_figure_is_labelled_without_offset_notation():
    from mlc_kernels.cli.train import training_figure

    history = [{"step": s, "mlc/loss": 0.01 / s, "mlc/align_loss": 0.7 - 0.01 * s, "mlc/cos_en": 1 - 1e-7 * s,
                "mlc/cos_zh": 1 - 2e-7 * s} for s in range(1, 6)]  # fmt: skip
    fig = training_figure(history, ["en", "zh"])
    fig.canvas.draw()
    left, right = fig.axes
    assert fig._suptitle is not None and fig._suptitle.get_text()
    for ax in (left, right):
        assert ax.get_title() and ax.get_xlabel() == "optimizer step" and ax.get_ylabel()
        assert ax.yaxis.get_offset_text().get_text() == "", ax.yaxis.get_offset_text().get_text()
    assert "nats" in left.get_ylabel() and "cosine" in right.get_ylabel()


# Finding 11: mlc bench for a user


def test_bench_quick_runs_the_headline_cells_briefly(tmp_path, capsys, monkeypatch):
    from mlc_kernels.bench import loss, runner

    seen = {}
    monkeypatch.setitem(runner.SUITES, "loss", type("Suite", (), {"run": lambda args, opts: seen.update(
        args=args, opts=opts)}))  # fmt: skip
    main(["bench", "--quick", "--out", str(tmp_path / "out"), "--threads", "1"])
    args, opts = seen["args"], seen["opts"]
    assert args.grid is None and args.impls is None  # the default grid and impls: README's table
    assert (opts.rounds, opts.budget_s, opts.memory) == (1, 0.05, False)
    assert "suites loss;" in capsys.readouterr().out
    main(["bench", "--quick", "--rounds", "2", "--out", str(tmp_path / "out")])
    assert seen["opts"].rounds == 2  # given explicitly: wins
    assert loss.CPU_GRID and loss.GPU_GRID


def test_bench_help_shows_defaults_and_output_names(capsys, tmp_path):
    from mlc_kernels.bench.runner import OUTPUT_NAMES, SUITES

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default 0.3)", "(default 5)", "(default: bench_out)", "--quick"):
        assert default in text, default
    assert "(default: None)" not in text
    assert set(OUTPUT_NAMES) == set(SUITES)
    for suite, name in OUTPUT_NAMES.items():
        assert f"{name}.csv ({suite})" in text or f"{name}.csv" in text
    main(["bench", "--grid", "2x3x8", "--impls", "torch", "--budget", "0.01", "--no-memory", "--quiet", "--threads",
          "1", "--out", str(tmp_path)])  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{OUTPUT_NAMES['loss']}.csv", f"{OUTPUT_NAMES['loss']}.png"]
