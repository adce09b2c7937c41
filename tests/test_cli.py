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


def test_offline_chain_train_then_eval(tmp_path, capsys):
    """README's chain: what ``mlc demo --out mlc_demo`` writes first (the shipped world model in <out>/model and
    the world's records in <out>/data.jsonl) -> ``mlc train`` on that file in the world's languages -> ``mlc eval``
    with the trained extractor. The run trains on something (the model reads the data: mlc/loss moves, the
    cosines are not all 1) and the numbers in eval.json are those of the saved model and head."""
    import torch
    import transformers

    from mlc_kernels.cli.eval import evaluate
    from mlc_kernels.head import MLCHead
    from mlc_kernels.records import EVAL, load_checked
    from mlc_kernels.trainers import MLCArguments
    from mlc_kernels.transfer.demo import save_demo_start

    demo = tmp_path / "mlc_demo"
    save_demo_start(demo)  # the first thing mlc demo does (the alignment runs after it are test_demo's)
    model_dir, data = demo / "model", demo / "data.jsonl"
    languages = "base,high1,high2,low1,low2"
    out = tmp_path / "run"
    main(["train", "--model", str(model_dir), "--dataset", str(data), "--languages", languages,
          "--output-dir", str(out), "--max-steps", "3", "--batch-size", "4", "--mlc-rep-size", "16",
          "--mlc-layer", "3", "--mlc_aux_every", "1", "--learning_rate", "1e-3", "--save-steps", "3"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "coverage: records with a non-empty variant per language (64 records)" in printed
    logs = [e for e in json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
            if "mlc/loss" in e]  # fmt: skip
    assert len(logs) == 3 and len({round(e["mlc/loss"], 6) for e in logs}) > 1  # the MLC term sees the data
    assert any(e[f"mlc/cos_{lang}"] < 0.999 for e in logs for lang in languages.split(","))
    head_dir = out / "mlc_head"
    trained = MLCHead.from_pretrained(head_dir)
    assert trained.hidden_size == 64 and trained.rep_size == 16
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    tuned = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert not torch.equal(base.model.layers[0].mlp.up_proj.weight, tuned.model.layers[0].mlp.up_proj.weight)
    eval_out = tmp_path / "eval"
    capsys.readouterr()
    main(["eval", "--model", str(out), "--extractor", str(head_dir), "--prompts", str(data), "--languages", languages,
          "--mlc-layer", "3", "--out", str(eval_out)])  # fmt: skip
    captured = capsys.readouterr()
    assert "LOAD REPORT" not in captured.out + captured.err  # the extractor's keys are skipped silently
    assert "cos to consensus low2" in captured.out and "between-prompt cosine" in captured.out
    result = json.loads((eval_out / "eval.json").read_text())
    assert set(result["cosine_to_consensus"]) == set(languages.split(",")) and result["layer"] == 3
    assert all(value < 0.999 for value in result["cosine_to_consensus"].values())  # not the all-unknown 1.0000
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(out)  # the world's word-level tokenizer
    records, _ = load_checked(str(data), EVAL)
    mlc = MLCArguments(languages=tuple(languages.split(",")), base_language="base", layer=3)
    want = evaluate(tuned, tokenizer, records, mlc, trained)
    for lang, value in want["cosine_to_consensus"].items():
        assert result["cosine_to_consensus"][lang] == pytest.approx(value, abs=1e-5)
    assert result["s1_share"] == pytest.approx(want["s1_share"], abs=1e-5)


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
