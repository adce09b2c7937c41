"""The MLC authors' training step, reproduced: their state (hidden_states[L] after the final norm), their loss
(written here from the formula of their ``_compute_aux_loss``, independently of the package), their schedule
(``global_step % aux_every == 0``) and their recipe, on a mini model (random init, no network)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from trl_fixtures import tiny_model, tiny_tokenizer  # noqa: E402

from mlc_kernels.hf import last_prompt_hidden  # noqa: E402
from mlc_kernels.trainers import MLC_KEYS, MLCArguments  # noqa: E402

LANGS = ("en", "zh", "sw")


def _records(n: int) -> datasets.Dataset:
    """DPO records with every variant present (the authors' collator assumes all of them)."""
    rows = [{
        "prompt": [{"role": "user", "content": f"w{i} w{i + 1} w{i + 2}"}],
        "variants": {"zh": f"w{i + 20} w{i + 21}", "sw": f"w{i + 40} w{i + 41} w{i + 42} w{i + 43}"},
        "chosen": [{"role": "assistant", "content": "w4 w5"}],
        "rejected": [{"role": "assistant", "content": f"w{i + 6} w{i + 9}"}],
    } for i in range(n)]  # fmt: skip
    return datasets.Dataset.from_list(rows)


def authors_aux_loss(model, head, ids, att, tau: float, weight: float) -> torch.Tensor:
    """The authors' auxiliary loss, transcribed from their formula: the variant rows right-padded through the full
    model with ``output_hidden_states=True``, ``hidden_states[L]`` at ``attention_mask.sum(-1) - 1``, the linear
    extractor, rows divided by ``norm + 1e-12``, fp32 SVD, ``logits = (s / stopgrad(s_1 + 1e-12)) / tau``,
    cross-entropy to index 0, mean over prompts, times ``weight``. ``ids``/``att``: ``(B, L, T)`` left-padded."""
    b, m, t = ids.shape
    flat_ids, flat_att = ids.reshape(b * m, t), att.reshape(b * m, t)
    right_ids = torch.zeros_like(flat_ids)
    right_att = torch.zeros_like(flat_att)
    for r in range(b * m):  # left padding -> right padding, as the authors' collator pads
        tokens = flat_ids[r][flat_att[r].bool()]
        right_ids[r, : len(tokens)] = tokens
        right_att[r, : len(tokens)] = 1
    out = model(input_ids=right_ids, attention_mask=right_att, output_hidden_states=True, use_cache=False)
    n_layers = model.config.num_hidden_layers
    hs = out.hidden_states[n_layers].reshape(b, m, t, -1)
    last = (right_att.reshape(b, m, t).sum(-1) - 1).clamp(min=0)
    last_h = hs.gather(2, last[..., None, None].expand(b, m, 1, hs.shape[-1])).squeeze(2)
    z = last_h @ head.weight.T + head.bias
    zc = z / (z.norm(dim=-1, keepdim=True) + 1e-12)
    s = torch.linalg.svd(zc.float(), full_matrices=False).S
    logits = (s / (s[:, :1].detach() + 1e-12)) / tau
    return weight * F.cross_entropy(logits, torch.zeros(b, dtype=torch.long))


class _Recorder(transformers.TrainerCallback):
    """The gradients of every parameter right before each optimizer step."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor | None]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()})


def _trainer(tmp_path, mlc: MLCArguments, steps: int, n_records: int = 8, **overrides):
    from mlc_kernels.recipes import recipe
    from mlc_kernels.trainers import DPOMLCTrainer

    tk = tiny_tokenizer()
    model = tiny_model(len(tk))
    options = recipe("paper")
    options.pop("max_samples")
    # on this CPU: fp32 (the recipe's bf16 is a GPU setting), one process (no ZeRO-2), no clipping (the gradients
    # are compared as accumulated), a learning rate that moves the weights
    options.update(bf16=False, deepspeed=None, max_steps=steps, max_grad_norm=0.0, learning_rate=1e-2,
                   output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no", seed=0,
                   gradient_checkpointing=False)  # fmt: skip
    options.update(overrides)
    trainer = DPOMLCTrainer(model=model, args=trl.DPOConfig(**options), train_dataset=_records(n_records),
                            processing_class=tk, ref_model=copy.deepcopy(model), mlc_args=mlc)  # fmt: skip
    return trainer, model


def _record_micro_batches(trainer) -> list:
    """Wraps ``trainer.compute_loss``: each micro-batch's inputs (copied) and the loss it returned."""
    seen = []
    inner = trainer.compute_loss

    def wrapped(model, inputs, *args, **kwargs):
        copied = {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in inputs.items()}
        loss = inner(model, inputs, *args, **kwargs)
        seen.append((copied, (loss[0] if isinstance(loss, tuple) else loss).detach().clone()))
        return loss

    trainer.compute_loss = wrapped
    return seen


@pytest.mark.parametrize("weight, tau", [(0.8, 0.2), (0.3, 0.5), (0.0, 0.2)])
def test_one_optimizer_step_equals_the_authors_step(tmp_path, weight, tau):
    # one optimizer step of the recipe (batch 1, 4 accumulation steps): every gradient (model and extractor) and
    # each micro-batch's loss equal TRL's DPO loss + weight * the authors' aux loss, each divided by the 4 steps
    mlc = MLCArguments(languages=LANGS, weight=weight, tau=tau, impl="torch")
    assert (mlc.layer, mlc.aux_every, mlc.rep_size, mlc.objective) == ("final", 2, 512, "relative_sv_softmax")
    trainer, model = _trainer(tmp_path, mlc, steps=1)
    # the starting weights, loaded back into the trained model afterwards (a deep copy of a model would not do:
    # transformers records a copy's hidden_states without their autograd graph)
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    recorder = _Recorder()
    trainer.add_callback(recorder)
    seen = _record_micro_batches(trainer)
    trainer.train()
    assert len(seen) == 4 and len(recorder.grads) == 1
    start = model
    start.load_state_dict(snapshot)
    start.train()
    for _, param in start.named_parameters():
        param.grad = None
    for inputs, loss in seen:
        dpo_inputs = {k: v for k, v in inputs.items() if k not in MLC_KEYS}
        dpo = trl.DPOTrainer.compute_loss(trainer, start, dpo_inputs)
        aux = authors_aux_loss(start, start.mlc_head, inputs["mlc_input_ids"], inputs["mlc_attention_mask"], tau,
                               weight)  # fmt: skip
        torch.testing.assert_close(loss, (dpo + aux).detach(), rtol=1e-5, atol=1e-6)
        ((dpo + aux) / 4).backward()
    got = recorder.grads[0]
    names = [n for n, _ in start.named_parameters()]
    assert any(n.startswith("mlc_head.") for n in names) and len(got) == len(names)
    for name, param in start.named_parameters():
        assert got[name] is not None, name
        torch.testing.assert_close(got[name], param.grad, rtol=1e-4, atol=1e-7, msg=name)
    assert bool(got["mlc_head.weight"].abs().sum() > 0) == (weight > 0)


def test_aux_every_adds_the_term_on_every_kth_optimizer_step_and_survives_resume(tmp_path):
    # global_step % aux_every == 0: with aux_every 2 and 2 accumulation steps the term is in optimizer steps 0 and
    # 2 (all their micro-batches), not in step 1; resuming from the checkpoint after step 1 keeps that rhythm
    mlc = MLCArguments(languages=LANGS, aux_every=2, impl="torch")
    trainer, model = _trainer(tmp_path / "run", mlc, steps=3, gradient_accumulation_steps=2,
                              save_strategy="steps", save_steps=1)  # fmt: skip
    recorder = _Recorder()
    trainer.add_callback(recorder)
    seen = _record_micro_batches(trainer)
    trainer.train()
    assert len(recorder.grads) == 3 and len(seen) == 6
    with_term = [g["mlc_head.weight"] is not None for g in recorder.grads]
    assert with_term == [True, False, True]  # one process: no gradient at all for the extractor on step 1
    logged = [e["step"] for e in trainer.state.log_history if "mlc/loss" in e]
    assert logged == [1, 3]  # logs after optimizer steps 1 and 3 hold the metrics of global steps 0 and 2

    # on a step without the term, the loss is the alignment loss alone
    micro = seen[2][0]
    dpo = trl.DPOTrainer.compute_loss(trainer, model, {k: v for k, v in micro.items() if k not in MLC_KEYS})
    assert torch.isfinite(dpo)

    resumed, _ = _trainer(tmp_path / "run", mlc, steps=3, gradient_accumulation_steps=2)
    recorder2 = _Recorder()
    resumed.add_callback(recorder2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    assert [g["mlc_head.weight"] is not None for g in recorder2.grads] == [False, True]


def test_aux_every_one_adds_the_term_on_every_step(tmp_path):
    mlc = MLCArguments(languages=LANGS, aux_every=1, impl="torch")
    trainer, _ = _trainer(tmp_path, mlc, steps=2, gradient_accumulation_steps=1)
    recorder = _Recorder()
    trainer.add_callback(recorder)
    trainer.train()
    assert [g["mlc_head.weight"] is not None for g in recorder.grads] == [True, True]


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_final_layer_is_hidden_states_L_after_the_final_norm(family):
    torch.manual_seed(0)
    if family == "qwen2":
        config = transformers.Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        model = transformers.Qwen2ForCausalLM(config).eval()
    else:
        config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    att = torch.ones_like(ids)
    att[0, 5:] = 0  # right padding
    att[1, :2] = 0  # left padding
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states
        last = torch.tensor([4, 6, 6])
        rows = torch.arange(3)
        final = last_prompt_hidden(model, ids, att, "final")
        # the left-padded row's positions differ from the unpadded run's only through the mask: compare the rows
        torch.testing.assert_close(final[[0, 2]], hs[3][rows, last][[0, 2]], rtol=0, atol=1e-6)
        pre_norm = last_prompt_hidden(model, ids, att, 3)
        assert (pre_norm - final).abs().max() > 1e-2  # layer 3 is the output before the final norm
        torch.testing.assert_close(last_prompt_hidden(model, ids, att, 2)[[0, 2]], hs[2][rows, last][[0, 2]],
                                   rtol=0, atol=1e-6)  # fmt: skip


def test_layer_option_accepts_final_middle_and_numbers():
    model = tiny_model(65)
    assert MLCArguments().check(model) == "final"
    assert MLCArguments(layer="middle").check(model) == 2
    assert MLCArguments(layer=None).check(model) == 2
    assert MLCArguments(layer="3").check(model) == 3  # from the command line
    assert MLCArguments(layer="-1").check(model) == 4
    with pytest.raises(ValueError, match="layer must be 'final', 'middle' or a non-zero int"):
        MLCArguments(layer="last")
    with pytest.raises(ValueError, match="aux_every must be an int >= 1"):
        MLCArguments(aux_every=0)


README = __import__("pathlib").Path(__file__).resolve().parents[1] / "README.md"


def _knob_table() -> list[list[str]]:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Reproducing the paper", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows[1:]]


def test_readme_knob_table_matches_the_code():
    import ast
    import dataclasses
    import re

    from mlc_kernels.recipes import recipe

    defaults = MLCArguments()
    fields = {f.name for f in dataclasses.fields(MLCArguments)}
    paper = recipe("paper")
    checked = set()
    for row in _knob_table():
        for name, literal in re.findall(r"`(\w+)=([^`]+)`", row[2]):
            value = ast.literal_eval(literal)
            actual = getattr(defaults, name) if name in fields else paper[name]
            assert actual == value, f"README says {name}={literal}, the code has {actual!r}"
            checked.add(name)
    assert {"objective", "tau", "weight", "aux_every", "rep_size", "head_bias", "layer"} <= checked
    assert set(paper) - {"deepspeed", "logging_steps"} <= checked  # every option of the recipe is in the table


def test_shipped_paper_config_parses_to_the_recipe(tmp_path, monkeypatch):
    from pathlib import Path

    from mlc_kernels.cli.train_args import parse_train_arguments
    from mlc_kernels.recipes import ZERO2_CONFIG, recipe

    config = Path(__file__).resolve().parents[1] / "integrations" / "paper" / "qwen2.5-7b-dpo-mlc.yaml"
    script, mlc, training, model = parse_train_arguments(["--config", str(config), "--bf16", "false"])
    paper = recipe("paper")
    assert script.recipe == "paper" and script.max_samples == paper["max_samples"]
    assert model.model_name_or_path == "Qwen/Qwen2.5-7B-Instruct"
    assert mlc.languages == ("en", "zh", "ru", "ja", "ar", "bn", "sw", "ur", "ps", "ku")
    for name in ("learning_rate", "lr_scheduler_type", "warmup_steps", "num_train_epochs", "max_steps", "beta",
                 "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "loss_type"):  # fmt: skip
        assert getattr(training, name) == paper[name], name
    assert Path(training.deepspeed) == ZERO2_CONFIG
    import json

    zero = json.loads(ZERO2_CONFIG.read_text())
    assert zero["zero_optimization"]["stage"] == 2 and zero["bf16"]["enabled"] == "auto"
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    # an explicit value wins over the recipe, and --deepspeed none drops ZeRO-2
    _, _, training, _ = parse_train_arguments(["--recipe", "paper", "--model", "m", "--learning_rate", "1e-5",
                                               "--deepspeed", "none", "--bf16", "false"])  # fmt: skip
    assert training.learning_rate == 1e-5 and not training.deepspeed and training.num_train_epochs == 3.0


def test_unknown_recipe_is_one_line(tmp_path):
    from mlc_kernels.cli.train_args import parse_train_arguments
    from mlc_kernels.errors import UsageError

    with pytest.raises(UsageError, match="--recipe must be one of paper, got 'papers'"):
        parse_train_arguments(["--recipe", "papers", "--model", "m"])


def test_collapse_warning_is_silent_on_plain_dpo_of_the_world_model(caplog):
    # the shipped world-v2 model's raw states are anisotropic: under plain DPO (MLC weight 0) the mean |cosine|
    # between prompts starts above 0.9 (the former absolute rule's threshold); the relative rule stays silent
    import logging
    from dataclasses import replace

    from mlc_kernels.transfer.align import AlignConfig, align_model
    from mlc_kernels.transfer.pretrain import load_shipped
    from mlc_kernels.transfer.world import World, world_config

    model, tokenizer, recipe = load_shipped()
    world = World(world_config("v2", 0))
    align = replace(AlignConfig(), dpo_steps=12, batch_size=8, train_prompts=96, mlc_layer=recipe["mlc_layer"])
    with caplog.at_level(logging.WARNING, logger="mlc_kernels.trainers"):
        _, logs = align_model(model, tokenizer, world, "dpo", align, seed=0)
    between = [e["mlc/between_prompt_cosine"] for e in logs if "mlc/between_prompt_cosine" in e]
    spread = [e["mlc/between_prompt_spread"] for e in logs if "mlc/between_prompt_spread" in e]
    assert len(between) >= 4 and between[0] > 0.9 and min(spread) > 0.1 * spread[0]
    assert not [r for r in caplog.records if "collapse" in r.getMessage()]
