"""TRL's trainers with the MLC term, as plain classes (this module imports TRL).

``DPOMLCTrainer``, ``SFTMLCTrainer``, ``ORPOMLCTrainer`` and ``CPOMLCTrainer`` (SimPO: ``CPOConfig(loss_type=
"simpo")``) take the arguments of their TRL trainer plus ``mlc_args``; they are also importable from
:mod:`mlc_kernels.trainers`. See :class:`mlc_kernels.mlc_term.MLCTrainerMixin` for what the MLC term does.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO and CPO live in trl.experimental in TRL 1.x

from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: E402
from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402

from .mlc_term import (  # noqa: E402
    MLCArguments,
    MLCTrainerMixin,
    add_variant_ids,
    attach_nonfinite_stop,
    check_distributed_setup,
    raise_if_nonfinite,
)

__all__ = ["CPOMLCTrainer", "DPOMLCTrainer", "ORPOMLCTrainer", "SFTMLCTrainer"]


class _MLCTrainer(MLCTrainerMixin):
    """The shared constructor: variant ids added to the datasets, distributed setup checked, the extractor
    registered after the TRL trainer is built; training stops (without a checkpoint) on a non-finite loss or
    gradient norm, and :meth:`train` then raises :class:`~mlc_kernels.trainers.NonFiniteTrainingError`."""

    def __init__(self, *args, mlc_args: MLCArguments, train_dataset=None, eval_dataset=None, **kwargs) -> None:
        trl_name = next(c.__name__ for c in type(self).__mro__ if c.__module__.startswith("trl"))
        tokenizer = kwargs.get("processing_class")
        if tokenizer is None:
            raise ValueError(f"{trl_name} with MLC needs processing_class (the tokenizer)")
        if train_dataset is not None:
            train_dataset = add_variant_ids(train_dataset, tokenizer, mlc_args)
        if eval_dataset is not None:
            eval_dataset = add_variant_ids(eval_dataset, tokenizer, mlc_args)
        check_distributed_setup(kwargs.get("args"), mlc_args)
        super().__init__(*args, train_dataset=train_dataset, eval_dataset=eval_dataset, **kwargs)
        self._mlc_setup(mlc_args)
        attach_nonfinite_stop(self)

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        raise_if_nonfinite(self)
        return output


class DPOMLCTrainer(_MLCTrainer, DPOTrainer):
    """``trl.DPOTrainer`` with the MLC term."""


class SFTMLCTrainer(_MLCTrainer, SFTTrainer):
    """``trl.SFTTrainer`` with the MLC term."""


class ORPOMLCTrainer(_MLCTrainer, ORPOTrainer):
    """``trl.experimental.orpo.ORPOTrainer`` with the MLC term."""


class CPOMLCTrainer(_MLCTrainer, CPOTrainer):
    """``trl.experimental.cpo.CPOTrainer`` with the MLC term (SimPO: ``CPOConfig(loss_type="simpo")``)."""


TRAINERS = {"dpo": DPOMLCTrainer, "sft": SFTMLCTrainer, "orpo": ORPOMLCTrainer, "cpo": CPOMLCTrainer,
            "simpo": CPOMLCTrainer}  # fmt: skip
CONFIGS = {"dpo": DPOConfig, "sft": SFTConfig, "orpo": ORPOConfig, "cpo": CPOConfig, "simpo": CPOConfig}
