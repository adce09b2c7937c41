"""The ``mlc`` command: demo, train (with checkpoint and extractor), eval, and config errors before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("trl")

from mlc_kernels.cli import demo_model_and_tokenizer, main  # noqa: E402


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    model, tokenizer = demo_model_and_tokenizer()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_train_then_eval_with_the_extractor(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    main(["train", "--model", str(tiny_checkpoint), "--output-dir", str(out), "--max-steps", "2", "--batch-size", "4",
          "--algorithm", "sft", "--mlc-rep-size", "16", "--mlc-layer", "2"])  # fmt: skip
    assert (out / "mlc_head" / "mlc_head.safetensors").is_file() and (out / "training.png").is_file()
    main(
        ["eval", "--model", str(out), "--extractor", str(out / "mlc_head"), "--out", str(tmp_path), "--mlc-layer", "2"]
    )
    result = json.loads((tmp_path / "eval.json").read_text())
    assert set(result["cosine_to_consensus"]) == {"en", "zh", "ru", "ja", "ar", "bn", "sw", "ur", "ps", "ku"}
    assert "cosine to consensus per language" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--mlc-layer", "9"], "layer must be in 1..4"),
        (["--algorithm", "ppo"], "--algorithm must be one of"),
        (["--mlc-weight", "-0.5"], "weight must be a number >= 0"),
        (["--languages", "en"], "no translated variants"),
        (["--gradient-accumulation-steps", "0"], "--gradient-accumulation-steps must be >= 1"),
        (["--resume-from-checkpoint", "/nonexistent/checkpoint-3"], "must be a checkpoint folder or 'last'"),
        (["--deepspeed", "/nonexistent/ds.json"], "--deepspeed must be a DeepSpeed JSON config file"),
    ],
)
def test_bad_configs_fail_before_training(tiny_checkpoint, tmp_path, extra, match):
    with pytest.raises(SystemExit, match=match):
        main(["train", "--model", str(tiny_checkpoint), "--output-dir", str(tmp_path), "--max-steps", "1", *extra])


def test_dataset_without_variants_is_refused(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(ValueError, match="record 0: missing field 'variants'"):
        main(["train", "--model", str(tiny_checkpoint), "--dataset", str(bad), "--output-dir", str(tmp_path)])


def test_liger_kernels_option(tiny_checkpoint, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the CPU refusal is tested without CUDA; see test_liger_kernels_on_gpu")
    with pytest.raises(SystemExit, match="--liger-kernels needs a CUDA device"):
        main(["train", "--model", str(tiny_checkpoint), "--output-dir", str(tmp_path), "--liger-kernels"])


@pytest.mark.gpu
def test_liger_kernels_on_gpu(tiny_checkpoint):
    pytest.importorskip("liger_kernel")
    import torch
    import transformers

    from mlc_kernels.cli import apply_liger_kernels
    from mlc_kernels.hf import last_prompt_hidden

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint).cuda()
    ids = torch.randint(4, 100, (2, 8), device="cuda")
    att = torch.ones_like(ids)
    before = last_prompt_hidden(model, ids, att, 2)
    apply_liger_kernels(model)
    torch.testing.assert_close(last_prompt_hidden(model, ids, att, 2), before, rtol=1e-3, atol=1e-3)


def test_deepspeed_config_without_the_package_is_refused(tiny_checkpoint, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name, *a)
    )
    config = Path(__file__).parent.parent / "integrations" / "deepspeed" / "zero2.json"  # the shipped config
    with pytest.raises(SystemExit, match=r"--deepspeed needs the deepspeed package \(pip install deepspeed\)"):
        main(["train", "--model", str(tiny_checkpoint), "--output-dir", str(tmp_path), "--deepspeed", str(config)])
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what accelerate launch sets for a DeepSpeed config
    with pytest.raises(SystemExit, match=r"accelerate launch with a DeepSpeed config needs the deepspeed package"):
        main(["train", "--model", str(tiny_checkpoint), "--output-dir", str(tmp_path)])


def test_train_resumes_from_the_last_checkpoint(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["train", "--model", str(tiny_checkpoint), "--output-dir", str(out), "--batch-size", "2",
              "--algorithm", "sft", "--mlc-rep-size", "8", "--mlc-layer", "2", "--save-steps", "1"]  # fmt: skip
    main([*common, "--max-steps", "2"])
    assert (out / "checkpoint-2" / "mlc_head" / "mlc_head.safetensors").is_file()
    with pytest.raises(SystemExit, match="no checkpoint-"):
        main([*common, "--max-steps", "3", "--output-dir", str(tmp_path / "empty"), "--resume-from-checkpoint", "last"])
    main([*common, "--max-steps", "3", "--resume-from-checkpoint", "last"])
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and [log["step"] for log in state["log_history"] if "loss" in log] == [1, 2, 3]
