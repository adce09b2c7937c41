"""Device syncs in the training path, counted (issue 22 item 2): the variant passes, the gradient cache, every guard,
the fused linear path and a whole DPO+MLC step read nothing back from the device beyond what transformers' own
forward reads with the same attention mask (counted in the same test on the same mini model); ``whiten`` keeps one
(the Cholesky status, to refuse a covariance that is not positive definite). Counted with
``mlc_kernels.bench.counting.count_syncs`` on the CPU: the same ops wait for the device on an accelerator."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from trl_fixtures import LANGS, records, tiny_model, tiny_tokenizer  # noqa: E402

from mlc_kernels import MLCHead, fused_linear_mlc_loss, mlc_loss  # noqa: E402
from mlc_kernels.bench.counting import count_syncs  # noqa: E402
from mlc_kernels.guards import valid_guards  # noqa: E402
from mlc_kernels.hf import grad_cached_mlc_loss, variant_representations  # noqa: E402

LAYER = 2


def _variants(n: int = 8, m: int = 3, t: int = 6, seed: int = 0):
    """Left-padded ``(n, m, t)`` variants of random lengths, some missing; their host-side token counts."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 60, (n, m, t), generator=gen)
    lengths = torch.randint(2, t + 1, (n, m), generator=gen)
    lengths[1, 2] = lengths[4, 0] = lengths[5, 1] = 0
    att = (torch.arange(t) >= t - lengths[..., None]).long()
    return ids, att, lengths > 0, lengths.tolist()


def _hf_forward_syncs(model, ids, att, mask) -> int:
    """Syncs of transformers' own forward over the present variants with their attention mask."""
    rows = mask.reshape(-1)
    flat_ids, flat_att = ids.reshape(-1, ids.shape[-1])[rows], att.reshape(-1, att.shape[-1])[rows]
    with torch.no_grad(), count_syncs() as syncs:
        model(input_ids=flat_ids, attention_mask=flat_att)
    return sum(syncs.values())


def test_variant_passes_sync_no_more_than_the_models_forward():
    model = tiny_model(64)
    head = MLCHead(32, 8)
    ids, att, mask, lengths = _variants()
    baseline = _hf_forward_syncs(model, ids, att, mask)
    with count_syncs() as syncs:
        reps, m = variant_representations(model, ids, att, LAYER, mask, lengths=lengths)
        mlc_loss(head(reps), m, impl="native").backward()
    assert sum(syncs.values()) <= baseline, (dict(syncs), baseline)
    # the same representations as without the host-side lengths (the path that reads the mask back)
    torch.testing.assert_close(reps, variant_representations(model, ids, att, LAYER, mask)[0])


def test_gradient_cache_syncs_no_more_than_its_forwards():
    model = tiny_model(64)
    head = MLCHead(32, 8)
    ids, att, mask, lengths = _variants()
    chunk = 2  # 4 chunks: 4 passes without autograd, 4 recomputed
    baseline = sum(
        _hf_forward_syncs(model, ids[s : s + chunk], att[s : s + chunk], mask[s : s + chunk])
        for s in range(0, ids.shape[0], chunk)
    )
    with count_syncs() as syncs:
        loss = grad_cached_mlc_loss(model, lambda r, mm: mlc_loss(head(r), mm, impl="native"), list(head.parameters()),
                                    ids, att, LAYER, mask, chunk_prompts=chunk, lengths=lengths)  # fmt: skip
        loss.backward()
    assert sum(syncs.values()) <= 2 * baseline, (dict(syncs), baseline)
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    reps, m = variant_representations(model, ids, att, LAYER, mask)
    plain = mlc_loss(head(reps), m, impl="native")
    plain.backward()
    torch.testing.assert_close(loss, plain.detach())
    for got, want in zip(grads, [p.grad for p in model.parameters() if p.grad is not None], strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("guard", valid_guards())
def test_every_guard_is_sync_free_but_whitens_one(guard):
    """Every guard of the registry, on the loss and on the fused linear path: none reads back, whiten once."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(8, 4, generator=gen) > 0.2
    mask[3] = False  # a prompt without any variant (the uniformity's masked pairs)
    reps = torch.randn(8, 4, 16, generator=gen, requires_grad=True)
    weight = torch.randn(16, 16, generator=gen, requires_grad=True)
    allowed = 1 if "whiten" in guard else 0
    with count_syncs() as syncs:
        mlc_loss(reps, mask, impl="native", guard=guard).backward()
    assert sum(syncs.values()) <= allowed, dict(syncs)
    with count_syncs() as syncs:
        fused_linear_mlc_loss(reps, weight, None, mask, impl="native", guard=guard).backward()
    assert sum(syncs.values()) <= allowed, dict(syncs)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_path_is_sync_free(reduction):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 4, 24, generator=gen, requires_grad=True)
    head = MLCHead(24, 8)
    mask = torch.rand(40, 4, generator=gen) > 0.2
    with count_syncs() as syncs:
        loss = fused_linear_mlc_loss(hidden, head.weight, head.bias, mask, impl="native", chunk_size=7,
                                     reduction=reduction)  # fmt: skip
        loss.sum().backward()
    assert not syncs, dict(syncs)


@pytest.mark.parametrize("grad_cache", [False, True])
def test_dpo_mlc_step_syncs_no_more_than_dpo_plus_the_variant_forwards(tmp_path, grad_cache):
    """A whole DPO+MLC step (batch counting, loss, backward; metrics off) against TRL's DPO step on the same batch:
    the difference is at most the syncs of transformers' own forward over the variants, per variant pass."""
    from mlc_kernels.trainers import MLC_KEYS, MLCArguments, trl_classes

    trl = pytest.importorskip("trl")
    tk = tiny_tokenizer()
    model = tiny_model(len(tk))
    trainer_cls, config_cls = trl_classes("dpo")
    config = config_cls(output_dir=str(tmp_path), per_device_train_batch_size=6, report_to=[], use_cpu=True,
                        save_strategy="no")  # fmt: skip
    mlc = MLCArguments(languages=LANGS, layer=LAYER, rep_size=8, impl="native", log_metrics=False,
                       grad_cache=grad_cache, chunk_prompts=3)  # fmt: skip
    trainer = trainer_cls(model=model, ref_model=copy.deepcopy(model), args=config, processing_class=tk,
                          train_dataset=records("dpo", n=6, missing_zh=(1,)), mlc_args=mlc)  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # what the training loop sets
    with count_syncs() as dpo:
        trl.DPOTrainer.compute_loss(trainer, model, {k: v for k, v in batch.items() if k not in MLC_KEYS}).backward()
    with count_syncs() as both:
        samples, _ = trainer.get_batch_samples(iter([dict(batch)]), 1, torch.device("cpu"))
        trainer.compute_loss(model, samples[0]).backward()
    chunks = [slice(0, 3), slice(3, 6)] if grad_cache else [slice(0, 6)]
    ids, att, mask = batch["mlc_input_ids"], batch["mlc_attention_mask"], batch["mlc_mask"]
    per_pass = sum(_hf_forward_syncs(model, ids[c], att[c], mask[c]) for c in chunks)
    passes = 2 if grad_cache else 1  # the gradient cache runs each chunk twice (without autograd, then replayed)
    extra = sum(both.values()) - sum(dpo.values())
    assert extra <= passes * per_pass, (dict(both), dict(dpo), per_pass)
