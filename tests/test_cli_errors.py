"""``mlc`` user errors: exit status 2, no traceback, one line ``mlc <command>: error: ...`` naming the input,
and nothing written to the output folder (issue 12)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("trl")

from cli_helpers import README_RECORDS, save_tiny_model, user_error, write_jsonl  # noqa: E402

from mlc_kernels.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("cli_errors") / "model")


@pytest.fixture
def train(model_dir, tmp_path, capsys):
    """``train(extra, match)``: ``mlc train`` on the tiny model with ``extra`` options must fail as a user error
    matching ``match`` without creating its output folder."""
    out = tmp_path / "out"

    def run(extra: list[str], match: str, model: str | None = None) -> str:
        argv = ["train", "--model", model or str(model_dir), "--output-dir", str(out), "--max-steps", "1",
                "--algorithm", "sft", "--mlc-layer", "2", *extra]  # fmt: skip
        return user_error(main, argv, capsys, match, untouched=out)

    return run


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--mlc-weight", "inf"], r"--mlc_weight must be a finite number, got inf"),
        (["--mlc-weight", "nan"], r"--mlc_weight must be a finite number, got nan"),
        (["--mlc-tau", "nan"], r"--mlc_tau must be a finite number, got nan"),
        (["--mlc-tau", "0"], r"--mlc_tau must be a number > 0"),
        (["--mlc-weight", "-0.5"], r"--mlc_weight must be a number >= 0"),
        (["--mlc-layer", "9"], r"layer must be in 1\.\.4"),
        (["--mlc_objective", "svd"], r"invalid choice: 'svd'"),
        (["--algorithm", "ppo"], r"--algorithm: invalid choice: 'ppo'"),
        (["--languages", "en,zh,xx"], r"no record has a variant in xx \(1 of 3 languages\)"),
        (["--languages", "en"], r"MLC needs at least 2 languages"),
        (["--gradient-accumulation-steps", "abc"], r"invalid int value: 'abc'"),
        (["--resume-from-checkpoint", "/nonexistent/checkpoint-3"], r"must be a checkpoint folder or 'last'"),
        (["--deepspeed", "/nonexistent/ds.json"], r"--deepspeed must be a DeepSpeed JSON config file, /nonexis"),
    ],
)
def test_bad_train_options(train, extra, match):
    train(extra, match)


def test_bad_datasets(train, tmp_path):
    records = [dict(r) for r in README_RECORDS]
    syntax = write_jsonl(tmp_path / "syntax.jsonl", records, {3: '{"prompt": "x", "variants": {'})
    train(["--dataset", str(syntax), "--languages", "en,zh,ru"], rf"{syntax}:3: not valid JSON \(Expecting")
    sft_records = [{**records[0], "completion": "a"}, {"prompt": "hi", "completion": "a"}]
    no_variants = write_jsonl(tmp_path / "nov.jsonl", sft_records)
    train(["--dataset", str(no_variants), "--languages", "en,zh,ru"], rf"{no_variants}:2: missing field 'variants'")
    empty = [*records[:2], {**records[2], "variants": {"zh": "", "ru": "Как?"}}]
    empty_file = write_jsonl(tmp_path / "empty.jsonl", [{**r, "completion": "ok"} for r in empty])
    train(["--dataset", str(empty_file), "--languages", "en,zh,ru"],
          rf"{empty_file}:3: variants\.zh is an empty string")  # fmt: skip
    # the ten default languages, data in three: refused, naming the seven and the languages to pass
    three = write_jsonl(tmp_path / "three.jsonl", [{**r, "completion": "ok"} for r in records])
    train(["--dataset", str(three)], r"no record has a variant in ja, ar, bn, sw, ur, ps, ku \(7 of 10 languages\); "
                                     r"pass --languages en,zh,ru")  # fmt: skip
    train(["--dataset", str(tmp_path / "missing.jsonl")], r"missing\.jsonl is not a file")


def test_unknown_language_codes_are_reported_with_counts(tmp_path):
    from mlc_kernels.records import check_languages

    records = [{"prompt": "p", "variants": {"zh": "a", "de": "b", "fr": "c"}}, {"prompt": "q", "variants": {"de": "d"}}]
    report = check_languages(records, ["f:1", "f:2"], ("en", "zh"), "en")
    assert "not in --languages, ignored: de (2 records), fr (1 records)" in report
    assert "zh                1     50%" in report  # the coverage table: 1 of 2 records has zh


def test_missing_model_paths_fail_at_once(train, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    train([], r"--model /nonexistent/model: no such folder", model="/nonexistent/model")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for relative in ("./missing_model", "runs/missing_model"):
        start = time.perf_counter()
        train([], rf"--model {relative}: no such folder", model=relative)
        assert time.perf_counter() - start < 10  # no network attempt (the hub client retried for 51 s)
    file_model = tmp_path / "model.bin"
    file_model.write_text("x")
    train([], r"is a file; give a saved model folder", model=str(file_model))


def test_output_folder_that_is_a_file(model_dir, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("keep me")
    user_error(main, ["train", "--model", str(model_dir), "--output-dir", str(target)], capsys,
               rf"--output_dir {target} is an existing file")  # fmt: skip
    user_error(main, ["eval", "--model", str(model_dir), "--out", str(target)], capsys,
               rf"--out {target} is an existing file")  # fmt: skip
    assert target.read_text() == "keep me"


def test_tokenizer_without_chat_template(model_dir, train, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(model_dir, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    train([], r"the tokenizer has no chat template", model=str(plain))


def test_load_in_4bit_without_bitsandbytes(train, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a)
    )
    train(["--load_in_4bit"], r"--load_in_4bit needs the bitsandbytes package")


def test_eval_errors(model_dir, tmp_path, capsys):
    from mlc_kernels.head import MLCHead

    out = tmp_path / "eval_out"
    base = ["eval", "--model", str(model_dir), "--out", str(out)]
    user_error(main, [*base, "--mlc-layer", "999"], capsys, r"layer must be in 1\.\.4", untouched=out)
    user_error(main, [*base, "--mlc-tau", "nan"], capsys, r"--mlc_tau must be a finite number", untouched=out)
    wrong = MLCHead(32, 8).save_pretrained(tmp_path / "wrong")
    user_error(main, [*base, "--extractor", str(wrong)], capsys,
               r"its hidden_size is 32 but the model's is 64", untouched=out)  # fmt: skip
    good = tmp_path / "good"
    MLCHead(64, 8).save_pretrained(good)
    weights, config = good / "mlc_head.safetensors", good / "mlc_head_config.json"
    damaged = weights.read_bytes()
    weights.write_bytes(damaged[: len(damaged) // 2])
    user_error(main, [*base, "--extractor", str(good)], capsys, rf"{weights} is damaged", untouched=out)
    weights.write_bytes(damaged)
    text = config.read_text()
    config.write_text(text[: len(text) // 2])
    user_error(main, [*base, "--extractor", str(good)], capsys, rf"{config} is not valid JSON", untouched=out)
    config.write_text(text.replace('"hidden_size": 64', '"hidden_size": "64"'))
    user_error(main, [*base, "--extractor", str(good)], capsys,
               rf"{config}: hidden_size must be a positive integer, got '64'", untouched=out)  # fmt: skip
    user_error(main, [*base, "--prompts", str(tmp_path / "none.jsonl")], capsys, r"is not a file", untouched=out)


def test_non_finite_training_stops_without_a_checkpoint(model_dir, tmp_path, capsys):
    """A learning rate of 1e38 turns the weights non-finite after step 1 (an infinite one is refused before
    loading): training stops with one line and neither a checkpoint-N folder nor the final model is written from
    those weights."""
    out = tmp_path / "run"
    argv = ["train", "--model", str(model_dir), "--output-dir", str(out), "--max-steps", "3", "--batch-size", "2",
            "--algorithm", "sft", "--mlc-layer", "2", "--mlc-rep-size", "8", "--languages", "en,zh,ru",
            "--learning_rate", "1e38", "--save-steps", "1"]  # fmt: skip
    line = user_error(main, argv, capsys, r"training stopped: .* \(non-finite\); no checkpoint was written")
    written = sorted(p.name for p in out.rglob("*")) if out.exists() else []
    assert not any(name.startswith("checkpoint-") or name.endswith(".safetensors") for name in written), written
    assert "step 1" in line or "step 2" in line


@pytest.mark.parametrize("extra,match", [(["--steps", "0"], r"--steps must be >= 1, got 0"),
                                         (["--workers", "0"], r"--workers must be >= 1, got 0")])  # fmt: skip
def test_bad_demo_options(extra, match, tmp_path, capsys):
    out = tmp_path / "demo"
    user_error(main, ["demo", "--out", str(out), *extra], capsys, match, untouched=out)


def test_bench_help_and_debug_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("usage: mlc bench")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    argv = [sys.executable, "-m", "mlc_kernels.cli", "eval", "--model", str(tmp_path / "nope"), "--out", str(tmp_path)]
    plain = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines()[-1] == f"mlc eval: error: --model {tmp_path / 'nope'}: no such folder; " \
        "give the path of a saved model folder (or a hub id)"
    debug = subprocess.run([*argv, "--debug"], capture_output=True, text=True, env=env, timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "UsageError" in debug.stderr
