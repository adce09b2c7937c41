"""The ``mlc`` command: train (TRL parser, YAML config, LoRA, resume), eval, demo, and the offline chain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("trl")

from cli_helpers import README_RECORDS, save_tiny_model, user_error, write_jsonl  # noqa: E402

from mlc_kernels.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("cli") / "model")


def test_offline_chain_train_then_eval(tiny_checkpoint, tmp_path, capsys):
    """A saved model folder (what ``mlc demo`` writes to <out>/model) -> ``mlc train`` on README's JSONL example
    -> ``mlc eval`` with the trained extractor: the numbers in eval.json are those of the saved model and head."""
    import torch
    import transformers

    from mlc_kernels.cli.eval import evaluate
    from mlc_kernels.head import MLCHead
    from mlc_kernels.trainers import MLCArguments

    data = write_jsonl(tmp_path / "data.jsonl", README_RECORDS)
    out = tmp_path / "run"
    main(["train", "--model", str(tiny_checkpoint), "--dataset", str(data), "--languages", "en,zh,ru",
          "--output-dir", str(out), "--max-steps", "2", "--batch-size", "2", "--mlc-rep-size", "16",
          "--mlc-layer", "2", "--learning_rate", "1e-3"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "coverage: records with a non-empty variant per language (4 records)" in printed
    state = json.loads((out / "trainer_state.json").read_text()) if (out / "trainer_state.json").exists() else None
    head_dir = out / "mlc_head"
    trained = MLCHead.from_pretrained(head_dir)
    assert trained.hidden_size == 64 and trained.rep_size == 16
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    tuned = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert not torch.equal(base.model.layers[0].mlp.up_proj.weight, tuned.model.layers[0].mlp.up_proj.weight)
    eval_out = tmp_path / "eval"
    main(["eval", "--model", str(out), "--extractor", str(head_dir), "--prompts", str(data), "--languages", "en,zh,ru",
          "--mlc-layer", "2", "--out", str(eval_out)])  # fmt: skip
    captured = capsys.readouterr()
    assert "LOAD REPORT" not in captured.out + captured.err  # the extractor's keys are skipped silently
    assert "cos to consensus zh" in captured.out and "between-prompt cosine" in captured.out
    result = json.loads((eval_out / "eval.json").read_text())
    assert set(result["cosine_to_consensus"]) == {"en", "zh", "ru"} and result["layer"] == 2
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    mlc = MLCArguments(languages=("en", "zh", "ru"), layer=2)
    want = evaluate(tuned, tokenizer, README_RECORDS, mlc, trained)
    for lang, value in want["cosine_to_consensus"].items():
        assert result["cosine_to_consensus"][lang] == pytest.approx(value, abs=1e-5)
    assert result["s1_share"] == pytest.approx(want["s1_share"], abs=1e-5)
    assert state is None or state["global_step"] == 2


def test_eval_json_is_valid_with_missing_languages(tiny_checkpoint, tmp_path):
    """A language without data in the evaluated prompts: null in eval.json (not NaN, which is not JSON)."""
    data = write_jsonl(tmp_path / "data.jsonl", README_RECORDS)
    main(["eval", "--model", str(tiny_checkpoint), "--prompts", str(data), "--languages", "en,zh,ja",
          "--mlc-layer", "2", "--out", str(tmp_path)])  # fmt: skip
    text = (tmp_path / "eval.json").read_text()
    assert "NaN" not in text
    assert json.loads(text)["cosine_to_consensus"]["ja"] is None


def test_train_yaml_config_and_trl_options(tiny_checkpoint, tmp_path, capsys):
    """--config FILE.yaml sets mlc, TRL and ModelConfig options like ``trl dpo --config``; the command line wins;
    --help lists the algorithm's TRL options with their defaults."""
    config = tmp_path / "run.yaml"
    out = tmp_path / "run"
    config.write_text(
        f"model_name_or_path: {tiny_checkpoint}\noutput_dir: {out}\nalgorithm: sft\nmax_steps: 5\n"
        "per_device_train_batch_size: 2\nmlc_layer: 2\nmlc_rep_size: 8\nlanguages: en,zh,ru\nweight_decay: 0.25\n"
    )
    main(["train", "--config", str(config), "--max_steps", "1"])
    args = json.loads((out / "trainer_state.json").read_text()) if (out / "trainer_state.json").exists() else None
    import torch

    training_args = torch.load(out / "training_args.bin", weights_only=False)
    assert training_args.weight_decay == 0.25 and training_args.max_steps == 1
    assert args is None or args["global_step"] == 1
    with pytest.raises(SystemExit) as exc:
        main(["train", "--algorithm", "orpo", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "usage: mlc train" in text and "--use_peft" in text and "--mlc_weight" in text
    assert "(default: 0.1)" in text and "ORPOConfig" in text


def test_lora_training(tiny_checkpoint, tmp_path, capsys):
    """--use_peft: LoRA adapters are trained and saved, the extractor is trained in full and saved, and the MLC
    term runs through the PEFT model (its mlc/* metrics are logged)."""
    import torch
    from safetensors.torch import load_file

    from mlc_kernels.head import MLCHead

    out = tmp_path / "lora"
    main(["train", "--model", str(tiny_checkpoint), "--output-dir", str(out), "--max-steps", "2", "--batch-size", "2",
          "--algorithm", "dpo", "--languages", "en,zh,ru", "--mlc-layer", "2", "--mlc-rep-size", "8",
          "--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj", "--learning_rate", "1e-2",
          "--save-steps", "2"])  # fmt: skip
    assert "LoRA adapters and extractor" in capsys.readouterr().out
    adapters = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapters.items() if "lora_B" in k]
    assert lora_b and any(bool(v.abs().sum() > 0) for v in lora_b)  # B starts at zero: trained
    assert not (out / "model.safetensors").exists()
    head = MLCHead.from_pretrained(out / "mlc_head")
    assert head.rep_size == 8 and bool(torch.isfinite(head.weight).all())
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert any("mlc/loss" in log for log in state["log_history"])


def test_extractor_is_trained_in_full_under_lora(tiny_checkpoint, tmp_path):
    """The same seed with learning rate 0 and > 0: the saved extractors differ (it is not frozen by PEFT)."""
    from mlc_kernels.head import MLCHead

    heads = []
    for lr in ("0.0", "1e-2"):
        out = tmp_path / f"lr{lr}"
        main(["train", "--model", str(tiny_checkpoint), "--output-dir", str(out), "--max-steps", "1",
              "--batch-size", "2", "--algorithm", "sft", "--languages", "en,zh,ru", "--mlc-layer", "2",
              "--mlc-rep-size", "8", "--use_peft", "--lora_r", "2", "--learning_rate", lr])  # fmt: skip
        heads.append(MLCHead.from_pretrained(out / "mlc_head").weight)
    assert (heads[0] - heads[1]).abs().max() > 1e-4


def test_liger_kernels_option(tiny_checkpoint, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the CPU refusal is tested without CUDA; see test_liger_kernels_on_gpu")
    user_error(main, ["train", "--model", str(tiny_checkpoint), "--output-dir", str(tmp_path / "o"), "--liger-kernels"],
               capsys, "--liger-kernels needs a CUDA device", untouched=tmp_path / "o")  # fmt: skip


@pytest.mark.gpu
def test_liger_kernels_on_gpu(tiny_checkpoint):
    pytest.importorskip("liger_kernel")
    import torch
    import transformers

    from mlc_kernels.cli.train import apply_liger_kernels
    from mlc_kernels.hf import last_prompt_hidden

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint).cuda()
    ids = torch.randint(4, 100, (2, 8), device="cuda")
    att = torch.ones_like(ids)
    before = last_prompt_hidden(model, ids, att, 2)
    apply_liger_kernels(model)
    torch.testing.assert_close(last_prompt_hidden(model, ids, att, 2), before, rtol=1e-3, atol=1e-3)


def test_deepspeed_config_without_the_package_is_refused(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name, *a)
    )
    config = Path(__file__).parent.parent / "integrations" / "deepspeed" / "zero2.json"  # the shipped config
    out = tmp_path / "o"
    base = ["train", "--model", str(tiny_checkpoint), "--output-dir", str(out)]
    user_error(main, [*base, "--deepspeed", str(config)], capsys,
               r"--deepspeed needs the deepspeed package \(pip install deepspeed\)", untouched=out)  # fmt: skip
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what accelerate launch sets for a DeepSpeed config
    user_error(main, base, capsys, r"accelerate launch with a DeepSpeed config needs the deepspeed package")


def test_train_resumes_from_the_last_checkpoint(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["train", "--model", str(tiny_checkpoint), "--output-dir", str(out), "--batch-size", "2",
              "--algorithm", "sft", "--mlc-rep-size", "8", "--mlc-layer", "2", "--save-steps", "1"]  # fmt: skip
    main([*common, "--max-steps", "2"])
    assert (out / "checkpoint-2" / "mlc_head" / "mlc_head.safetensors").is_file()
    user_error(main, [*common, "--max-steps", "3", "--output-dir", str(tmp_path / "empty"),
                      "--resume-from-checkpoint", "last"], capsys, "no checkpoint-")  # fmt: skip
    main([*common, "--max-steps", "3", "--resume-from-checkpoint", "last"])
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and [log["step"] for log in state["log_history"] if "loss" in log] == [1, 2, 3]
