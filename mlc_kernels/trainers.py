"""TRL trainers with the MLC term, ``L = L_align + mlc_weight * L_MLC`` (docs/design.md, section 4): the public names.

The MLC term's options and pieces (:class:`MLCArguments`, the collator, the trainer mixin) come from
:mod:`mlc_kernels.mlc_term`, which does not import TRL; ``DPOMLCTrainer``, ``SFTMLCTrainer``, ``ORPOMLCTrainer``
and ``CPOMLCTrainer`` from :mod:`mlc_kernels.trl_trainers`, imported on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .mlc_term import (  # noqa: F401  (re-exported)
    MIDDLE_LAYER,
    MLC_KEYS,
    VARIANT_COLUMN,
    MLCArguments,
    MLCCollator,
    MLCTrainerMixin,
    NonFiniteTrainingError,
    add_variant_ids,
    attach_nonfinite_stop,
    check_distributed_setup,
    launched_with,
    prompt_text,
    raise_if_nonfinite,
    record_variant_states,
)

_TRAINERS = {  # name -> (module, TRL trainer, TRL config)
    "DPOMLCTrainer": ("trl", "DPOTrainer", "DPOConfig"),
    "SFTMLCTrainer": ("trl", "SFTTrainer", "SFTConfig"),
    "ORPOMLCTrainer": ("trl.experimental.orpo", "ORPOTrainer", "ORPOConfig"),
    "CPOMLCTrainer": ("trl.experimental.cpo", "CPOTrainer", "CPOConfig"),  # SimPO: CPOConfig(loss_type="simpo")
}
ALGORITHM_TRAINERS = {"dpo": "DPOMLCTrainer", "sft": "SFTMLCTrainer", "orpo": "ORPOMLCTrainer", "cpo": "CPOMLCTrainer",
                      "simpo": "CPOMLCTrainer"}  # fmt: skip


def trl_classes(algorithm: str):
    """``(trainer class with MLC, TRL config class)`` of ``algorithm`` (dpo, sft, orpo, cpo, simpo)."""
    if algorithm not in ALGORITHM_TRAINERS:
        raise ValueError(f"algorithm must be one of {tuple(ALGORITHM_TRAINERS)}, got {algorithm!r}")
    from . import trl_trainers

    return trl_trainers.TRAINERS[algorithm], trl_trainers.CONFIGS[algorithm]


if TYPE_CHECKING:  # the classes live in trl_trainers (it imports TRL); re-exported lazily below
    from .trl_trainers import CPOMLCTrainer, DPOMLCTrainer, ORPOMLCTrainer, SFTMLCTrainer  # noqa: F401


def __getattr__(name: str):
    """``DPOMLCTrainer``, ``SFTMLCTrainer``, ``ORPOMLCTrainer``, ``CPOMLCTrainer`` from
    :mod:`mlc_kernels.trl_trainers`, imported on first access (so this module does not import TRL)."""
    if name in _TRAINERS:
        from . import trl_trainers

        return getattr(trl_trainers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
