"""The base-language variant's state taken from the policy forward of the chosen sequence (issue 22 item 5): the
same loss and gradients as its own variant pass, that pass skipped, and the separate pass (with the reason logged
once) where the base prompt's tokens are not the chosen sequence's prompt prefix."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")

from trl_fixtures import LANGS, records, tiny_model, tiny_tokenizer  # noqa: E402

import mlc_kernels.mlc_term as mlc_term  # noqa: E402
from mlc_kernels.trainers import MLCArguments, trl_classes  # noqa: E402


def _step(tmp_path, base_from_policy: bool, layer, **mlc):
    """Loss and gradients (model and extractor) of one DPO+MLC step on one batch, and the rows the variant passes
    ran (base column excluded when the state comes from the policy forward)."""
    tk = tiny_tokenizer()
    model = tiny_model(len(tk)).float()
    trainer_cls, config_cls = trl_classes("dpo")
    config = config_cls(output_dir=str(tmp_path), per_device_train_batch_size=6, report_to=[], use_cpu=True,
                        save_strategy="no")  # fmt: skip
    args = MLCArguments(languages=LANGS, layer=layer, rep_size=8, impl="torch", log_metrics=False,
                        base_from_policy=base_from_policy, **mlc)  # fmt: skip
    trainer = trainer_cls(model=model, ref_model=copy.deepcopy(model), args=config, processing_class=tk,
                          train_dataset=records("dpo", n=6, missing_zh=(1,)), mlc_args=args)  # fmt: skip
    trainer.current_gradient_accumulation_steps = 1
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    masks = []
    real = mlc_term.variant_representations

    def spy(runner, ids, att, layer, mask, **kw):
        masks.append(mask.clone())
        return real(runner, ids, att, layer, mask, **kw)

    mlc_term.variant_representations = spy
    try:
        loss = trainer.compute_loss(model, dict(batch))
    finally:
        mlc_term.variant_representations = real
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, masks, batch


@pytest.mark.parametrize("layer", [2, "final"])
def test_base_state_from_the_policy_forward_matches_its_own_pass(tmp_path, layer, caplog):
    with caplog.at_level(logging.WARNING, logger="mlc_kernels.trainers"):
        reused, reused_grads, reused_masks, batch = _step(tmp_path / "a", True, layer)
    assert "runs its own pass" not in caplog.text
    separate, separate_grads, separate_masks, _ = _step(tmp_path / "b", False, layer)
    base = LANGS.index("en")
    assert batch["mlc_base_reason"] is None
    assert len(reused_masks) == len(separate_masks) == 1
    assert not reused_masks[0][:, base].any() and separate_masks[0][:, base].all()  # the base pass is skipped
    # equal up to fp32 rounding: the variant pass runs the prompt left-padded (RoPE at shifted absolute positions,
    # relative positions equal), the policy forward at positions 0.. of the chosen sequence
    torch.testing.assert_close(reused, separate, rtol=1e-5, atol=1e-6)
    assert reused_grads.keys() == separate_grads.keys() and "mlc_head.weight" in reused_grads
    for name, grad in separate_grads.items():
        torch.testing.assert_close(reused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_mismatched_base_tokens_fall_back_with_a_logged_reason(tmp_path, caplog):
    """Without the generation prompt the base variant ends before the assistant header that ends the chosen
    sequence's prompt: not its prefix's last token, so the separate pass runs, said once."""
    with caplog.at_level(logging.WARNING, logger="mlc_kernels.trainers"):
        loss, grads, masks, batch = _step(tmp_path / "a", True, 2, generation_prompt=False)
    assert batch["mlc_base_reason"].startswith("example 0: the base prompt's token ids differ")
    assert caplog.text.count("runs its own pass") == 1
    assert masks[0][:, LANGS.index("en")].all()
    separate, separate_grads, _, _ = _step(tmp_path / "b", False, 2, generation_prompt=False)
    assert torch.equal(loss, separate)
    for name, grad in separate_grads.items():
        assert torch.equal(grads[name], grad), name
