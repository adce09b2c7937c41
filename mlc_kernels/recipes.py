"""Training recipes for ``mlc train --recipe NAME``: named sets of TRL/Trainer options applied as defaults (the
command line and ``--config`` still win). The MLC options' own defaults (``MLCArguments``) are the authors'.

``paper``: the DPO recipe of the MLC authors' released code (their ``examples/MLC/qwen2.5-7b.yaml`` and
``gemma2-9b.yaml``, LLaMA-Factory): sigmoid DPO with beta 0.1, lr 6e-7 on a cosine schedule with 10% warm-up,
3 epochs, batch 1 per device with 4 accumulation steps, bf16, DeepSpeed ZeRO-2, at most 3000 training records,
sequences cut at 1024 tokens.
"""

from __future__ import annotations

from pathlib import Path

ZERO2_CONFIG = Path(__file__).parent / "data" / "ds_zero2.json"
"""DeepSpeed ZeRO-2 config of the ``paper`` recipe (every batch and precision field ``"auto"``: the Trainer's)."""

RECIPES: dict[str, dict] = {
    "paper": {
        "loss_type": ["sigmoid"],
        "beta": 0.1,
        "learning_rate": 6e-7,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.1,  # transformers 5: a float below 1 is the warm-up ratio
        "num_train_epochs": 3.0,
        "max_steps": -1,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 4,
        "bf16": True,
        "deepspeed": str(ZERO2_CONFIG),
        "max_length": 1024,
        "max_samples": 3000,
        "logging_steps": 1,
    },
}
"""Recipe name -> option -> value (TRL config fields, and ``max_samples`` of ``mlc train``)."""


def recipe(name: str) -> dict:
    """The options of recipe ``name``; raises ``ValueError`` naming the known ones."""
    if name not in RECIPES:
        raise ValueError(f"--recipe must be one of {', '.join(RECIPES)}, got {name!r}")
    return dict(RECIPES[name])
