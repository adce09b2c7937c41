"""Outcome tests that the pieces compose as documented: the truncated variant pass runs nothing after layer k,
and a trainer's loss and gradients equal ``align + weight * mlc`` computed independently on the same batch."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")

from trl_fixtures import LANGS, records, tiny_model, tiny_tokenizer  # noqa: E402

from mlc_kernels import mlc_loss  # noqa: E402
from mlc_kernels.hf import decoder_layers, last_prompt_hidden, variant_representations  # noqa: E402
from mlc_kernels.trainers import MLC_KEYS, MLCArguments, MLCTrainerMixin, trl_classes  # noqa: E402


def _count_calls(model):
    """Forward-call counters on every decoder layer, the final norm and the LM head."""
    layers, norm = decoder_layers(model)
    counts = {f"layer{i + 1}": 0 for i in range(len(layers))} | {"norm": 0, "lm_head": 0}
    modules = {f"layer{i + 1}": layer for i, layer in enumerate(layers)}
    modules["norm"] = norm
    modules["lm_head"] = model.get_output_embeddings()

    def hook(name):
        def fn(module, args, output):
            counts[name] += 1

        return fn

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    return counts, handles


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_truncated_pass_runs_no_layer_after_k_and_no_lm_head(layer):
    model = tiny_model(65).eval()
    ids = torch.randint(5, 60, (3, 6), generator=torch.Generator().manual_seed(0))
    att = torch.ones_like(ids)
    counts, handles = _count_calls(model)
    try:
        truncated = last_prompt_hidden(model, ids, att, layer, truncate=True)
        after_truncated = dict(counts)
        full = last_prompt_hidden(model, ids, att, layer, truncate=False)
    finally:
        for h in handles:
            h.remove()
    assert after_truncated["lm_head"] == 0
    for i in range(1, 5):
        assert after_truncated[f"layer{i}"] == (1 if i <= layer else 0), (i, after_truncated)
    # the untruncated pass runs everything once: the counters are live (the test can fail)
    assert all(counts[f"layer{i}"] == (2 if i <= layer else 1) for i in range(1, 5))
    assert counts["lm_head"] == 1
    torch.testing.assert_close(truncated, full)


def _batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer._prepare_inputs(batch)


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_trainer_loss_and_gradients_are_align_plus_weight_times_mlc(kind, tmp_path):
    """weight = 0.3: a dropped or doubled ``weight *`` changes the loss and every extractor gradient."""
    weight = 0.3
    tk = tiny_tokenizer()
    model = tiny_model(len(tk))
    trainer_cls, config_cls = trl_classes(kind)
    args = config_cls(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
                      use_cpu=True, save_strategy="no")  # fmt: skip
    mlc = MLCArguments(languages=LANGS, weight=weight, layer=2, rep_size=8, impl="torch", log_metrics=False)
    extra = {"ref_model": copy.deepcopy(model)} if kind == "dpo" else {}
    trainer = trainer_cls(model=model, args=args, train_dataset=records("sft" if kind == "sft" else "dpo"),
                          processing_class=tk, mlc_args=mlc, **extra)  # fmt: skip
    model.train()
    batch = _batch(trainer)
    params = [p for p in model.parameters() if p.requires_grad]

    total = trainer.compute_loss(model, dict(batch))
    total_grads = torch.autograd.grad(total, params, allow_unused=True)

    # independently: the base trainer's alignment loss, and mlc_loss on the extractor's output of layer 2
    plain = {k: v for k, v in batch.items() if k not in MLC_KEYS}
    align = super(MLCTrainerMixin, trainer).compute_loss(model, plain)
    reps, mask = variant_representations(model, batch["mlc_input_ids"], batch["mlc_attention_mask"], 2,
                                         batch["mlc_mask"])  # fmt: skip
    mlc_term = mlc_loss(model.mlc_head(reps), mask, impl="reference")
    expected = align + weight * mlc_term
    expected_grads = torch.autograd.grad(expected, params, allow_unused=True)

    assert float(mlc_term.detach()) > 1e-3 and float(align.detach()) > 1e-3  # both terms matter
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)
    head_ids = {id(p) for p in model.mlc_head.parameters()}
    checked = 0
    for p, got, want in zip(params, total_grads, expected_grads, strict=True):
        if want is None:
            assert got is None or not got.any()
            continue
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        checked += id(p) in head_ids
    assert checked == 2  # extractor weight and bias


def test_packed_variant_passes_in_the_trainer_give_the_padded_loss(tmp_path):
    """MLCArguments.packed: the trainer's loss and extractor gradient equal the padded passes' (and the option is
    refused with grad_cache, which it does not reach)."""
    tk = tiny_tokenizer()
    trainer_cls, config_cls = trl_classes("sft")
    losses, grads = [], []
    for packed in (False, True):
        model = tiny_model(len(tk))
        args = config_cls(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
                          use_cpu=True, save_strategy="no")  # fmt: skip
        mlc = MLCArguments(languages=LANGS, weight=1.0, layer=2, rep_size=8, impl="torch", packed=packed)
        trainer = trainer_cls(model=model, args=args, train_dataset=records("sft"), processing_class=tk, mlc_args=mlc)
        model.train()
        batch = _batch(trainer)
        loss = trainer.compute_loss(model, dict(batch))
        (grad,) = torch.autograd.grad(loss, [model.mlc_head.weight])
        losses.append(loss.detach())
        grads.append(grad)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="packed"):
        MLCArguments(languages=LANGS, packed=True, grad_cache=True)


def test_lead_steps_train_the_mlc_term_alone_then_both(tmp_path):
    """MLCArguments.lead_steps = 2: steps 0 and 1 give weight * mlc (the alignment loss weighted 0, its parameters
    still in the graph with zero gradient); from step 2 on, align + weight * mlc."""
    weight = 0.3
    tk = tiny_tokenizer()
    model = tiny_model(len(tk))
    trainer_cls, config_cls = trl_classes("sft")
    args = config_cls(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
                      use_cpu=True, save_strategy="no")  # fmt: skip
    # aux_every=1: the MLC term on every step (steps 0, 1 and 2 below), not the authors' every 2nd
    mlc = MLCArguments(languages=LANGS, weight=weight, layer=2, rep_size=8, impl="torch", log_metrics=False,
                       lead_steps=2, aux_every=1)  # fmt: skip
    trainer = trainer_cls(model=model, args=args, train_dataset=records("sft"), processing_class=tk, mlc_args=mlc)
    model.train()
    batch = _batch(trainer)
    plain = {k: v for k, v in batch.items() if k not in MLC_KEYS}
    align = super(MLCTrainerMixin, trainer).compute_loss(model, plain).detach()
    reps, mask = variant_representations(model, batch["mlc_input_ids"], batch["mlc_attention_mask"], 2,
                                         batch["mlc_mask"])  # fmt: skip
    mlc_term = mlc_loss(model.mlc_head(reps), mask, impl="reference").detach()
    assert float(align) > 1e-3
    last_layer = next(decoder_layers(model)[0][-1].parameters())  # after layer 2: only the alignment loss reaches it
    for step, expected in ((0, weight * mlc_term), (1, weight * mlc_term), (2, align + weight * mlc_term)):
        trainer.state.global_step = step
        loss = trainer.compute_loss(model, dict(batch))
        torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
        (grad,) = torch.autograd.grad(loss, [last_layer])
        assert (grad.abs().sum() > 0) == (step >= 2)
    with pytest.raises(ValueError, match="lead_steps"):
        MLCArguments(languages=LANGS, lead_steps=-1)
