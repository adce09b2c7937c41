"""Every numeric option of the loss, the guards and the trainers is read: with a non-default value the result equals
the computation with that value and differs from the one with the default (so an option that is ignored, or
replaced by its default, fails here)."""

from __future__ import annotations

import pytest
import torch

from mlc_kernels import mlc_loss
from mlc_kernels.guards import uniformity, whiten


def _reps(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    reps = torch.randn(12, 4, 16, generator=gen, dtype=torch.float64) + 2.0
    return reps, torch.rand(12, 4, generator=gen) > 0.2


def test_uniform_t_is_read():
    reps, mask = _reps()
    got = mlc_loss(reps, mask, impl="torch", guard="center+uniform", uniform_t=0.7)
    default = mlc_loss(reps, mask, impl="torch", guard="center+uniform")
    centred = torch.where(mask[..., None], reps - reps[mask].mean(dim=0), 0.0)
    expected = mlc_loss(centred, mask, impl="torch") + uniformity(centred, mask, t=0.7)
    torch.testing.assert_close(got, expected)
    assert abs(float(got - default)) > 1e-3


def test_whiten_shrinkage_is_read():
    reps, mask = _reps(1)
    got = mlc_loss(reps, mask, impl="torch", guard="whiten", whiten_shrinkage=0.3)
    default = mlc_loss(reps, mask, impl="torch", guard="whiten")
    expected = mlc_loss(whiten(reps, mask, shrinkage=0.3), mask, impl="torch")
    torch.testing.assert_close(got, expected)
    assert abs(float(got - default)) > 1e-4


transformers = pytest.importorskip("transformers")
pytest.importorskip("trl")

from trl_fixtures import LANGS, records, tiny_model, tiny_tokenizer  # noqa: E402

from mlc_kernels.hf import variant_representations  # noqa: E402
from mlc_kernels.trainers import MLC_KEYS, MLCArguments, MLCTrainerMixin, trl_classes  # noqa: E402

TRAINER_OPTIONS = [
    {"tau": 0.5},
    {"weight": 0.3},
    {"objective": "pairwise"},
    {"guard": "center+uniform", "uniform_weight": 0.3},
    {"guard": "center+uniform", "uniform_t": 0.7},
]


@pytest.mark.parametrize("options", TRAINER_OPTIONS, ids=lambda o: "+".join(f"{k}={v}" for k, v in o.items()))
def test_trainer_reads_the_option(options, tmp_path):
    tk = tiny_tokenizer()
    model = tiny_model(len(tk))
    trainer_cls, config_cls = trl_classes("sft")
    args = config_cls(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
                      use_cpu=True, save_strategy="no")  # fmt: skip
    mlc = MLCArguments(languages=LANGS, layer=2, rep_size=8, impl="torch", log_metrics=False, **options)
    trainer = trainer_cls(model=model, args=args, train_dataset=records("sft"), processing_class=tk, mlc_args=mlc)
    model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    total = trainer.compute_loss(model, dict(batch))
    plain = {k: v for k, v in batch.items() if k not in MLC_KEYS}
    align = super(MLCTrainerMixin, trainer).compute_loss(model, plain)
    reps, mask = variant_representations(model, batch["mlc_input_ids"], batch["mlc_attention_mask"], 2,
                                         batch["mlc_mask"])  # fmt: skip
    loss_options = {k: v for k, v in options.items() if k != "weight"}
    weight = options.get("weight", MLCArguments().weight)
    expected = align + weight * mlc_loss(model.mlc_head(reps), mask, impl="reference", **loss_options)
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)
    defaults = {k: getattr(MLCArguments(), k) for k in options if k != "guard"}
    guard = {"guard": options["guard"]} if "guard" in options else {}
    default_weight = defaults.pop("weight", weight)
    ignored = align + default_weight * mlc_loss(model.mlc_head(reps), mask, impl="reference", **guard, **defaults)
    assert abs(float(total - ignored)) > 1e-4, "the option makes no difference here: the test would not see it"


def test_rep_size_and_head_options_are_read(tmp_path):
    tk = tiny_tokenizer()
    model = tiny_model(len(tk))
    trainer_cls, config_cls = trl_classes("sft")
    args = config_cls(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    mlc = MLCArguments(languages=LANGS, layer=2, rep_size=6, head_bias=False, head_orthogonal=True)
    trainer = trainer_cls(model=model, args=args, train_dataset=records("sft"), processing_class=tk, mlc_args=mlc)
    assert trainer.model.mlc_head.weight.shape == (6, model.config.hidden_size)
    assert trainer.model.mlc_head.bias is None and trainer.model.mlc_head.orthogonal
