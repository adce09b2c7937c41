"""World v2's pre-registered protocol, as data: the model, the alignment settings, the conditions (arms) of
rounds 1 and 2 with their weights, the weight rule, and the quick and full presets.

The rules were fixed before the comparisons they govern; their record (gate, pre-registration, results) is the
experiment's card, ``experiments/transfer/WORLD_CARD.md`` in the repository.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .align import AlignConfig
from .pretrain import ModelConfig
from .world import WorldConfig, world_config

MODEL = ModelConfig(layers=4, steps=2000, batch_size=24)
"""World v2's model: hidden 64, 4 decoder layers, 2000 pretraining steps of 24 documents (seed = world seed)."""

ALIGN = replace(AlignConfig(), mlc_layer=3)
"""v1's alignment settings (:class:`.align.AlignConfig`'s defaults); ``mlc_layer`` 3: the gate rule's choice on
world seeds 0 and 1 (the card; 0 would let the run's own gate decide)."""


WEIGHT_GRID = (0.03, 0.3)


@dataclass(frozen=True)
class Condition:
    """One pre-registered arm: the MLC ``objective``, ``guard`` (``"+"``-joined, ``""`` = none) and
    ``extractor`` (:data:`.align.EXTRACTORS`); ``lead_steps`` MLC-only steps before the alignment steps;
    ``grid``: the weights its weight rule tries; ``name`` is what the table and the last line call it (round 1:
    :data:`ROUND1`, round 2: :data:`ROUND2`)."""

    name: str
    objective: str = "sv_softmax"
    guard: str = ""
    extractor: str = "linear"
    lead_steps: int = 0
    grid: tuple[float, ...] = WEIGHT_GRID


DPO = "dpo"
ROUND1 = (
    Condition("sv_softmax"),  # the paper's loss, no guard
    Condition("anchor_cos+center", objective="anchor_cos", guard="center", extractor="centred"),
    Condition("center", guard="center"),
    Condition("anchor", guard="anchor", extractor="linear_nobias"),
    Condition("signed_sv_softmax+center", objective="signed_sv_softmax", guard="center", extractor="centred"),
    Condition("whiten", guard="whiten"),
    Condition("center+uniform", guard="center+uniform"),
)
"""Round 1, pre-registered (the card), in the order they are run when CPU time is short."""
ROUND2 = (
    Condition("anchor_cos+center@r2", objective="anchor_cos", guard="center", extractor="centred",
              grid=(0.3, 1.0, 3.0)),
    Condition("lead60+anchor_cos+center@r2", objective="anchor_cos", guard="center", extractor="centred",
              lead_steps=60, grid=(0.3, 1.0, 3.0)),
)  # fmt: skip
"""Round 2, pre-registered after round 1's study (the card): round 1's best arm with a weight grid that
reaches past 0.3, and the same arm with 60 MLC-only steps before DPO (consistency first)."""
CONDITIONS = ROUND1 + ROUND2
QUICK_CONDITIONS = ("sv_softmax", "anchor_cos+center", *(c.name for c in ROUND2))
"""What ``--quick`` runs (round 2's pre-registration): the paper's loss, round 1's best arm and round 2; the
other round-1 arms run in the full mode."""

WEIGHTS: dict[str, float] = {
    "sv_softmax": 0.3,
    "anchor_cos+center": 0.3,
    "center": 0.03,
    "anchor": 0.3,
    "signed_sv_softmax+center": 0.3,
    "whiten": 0.03,
    "center+uniform": 0.03,
    "anchor_cos+center@r2": 3.0,
    "lead60+anchor_cos+center@r2": 3.0,
}
"""The MLC weight of each condition, picked on base-language results only by :func:`pick_weight` (filled in by
the weight selection run recorded in the card; a condition missing here uses ``DEFAULT_WEIGHT``)."""
DEFAULT_WEIGHT = 0.1


@dataclass(frozen=True)
class V2Config:
    """One v2 run: the world seeds (each pretrains its own model), alignment seeds, conditions, eval size."""

    world_seeds: tuple[int, ...] = (0,)
    seeds: tuple[int, ...] = (0, 1, 2)
    model: ModelConfig = MODEL
    align: AlignConfig = ALIGN
    conditions: tuple[Condition, ...] = CONDITIONS
    weights: tuple[tuple[str, float], ...] = ()
    gate_train_prompts: int = 512
    gate_test_prompts: int = 256

    def weight(self, name: str) -> float:
        """The MLC weight of the condition ``name``: this run's, else :data:`WEIGHTS`, else ``DEFAULT_WEIGHT``."""
        return dict(self.weights).get(name, WEIGHTS.get(name, DEFAULT_WEIGHT))

    def world(self, seed: int) -> WorldConfig:
        """The world of world seed ``seed``."""
        return world_config("v2", seed)


QUICK = V2Config(conditions=tuple(c for c in CONDITIONS if c.name in QUICK_CONDITIONS))
FULL = V2Config(world_seeds=(0, 1), align=replace(ALIGN, eval_per_kind=256))


def pick_weight(base_results: dict[float, dict], dpo_base: dict) -> float:
    """The weight rule: the largest weight whose base-language safety and helpfulness are both >= DPO's minus 5
    points; none: the smallest weight of the grid. ``base_results``: weight -> base-language behaviour."""
    ok = [w for w, r in base_results.items()
          if r["safety"] >= dpo_base["safety"] - 5 and r["helpfulness"] >= dpo_base["helpfulness"] - 5]  # fmt: skip
    return max(ok) if ok else min(base_results)


def arm(config: V2Config, name: str, layer: int) -> tuple[AlignConfig, str]:
    """The alignment settings and trainer condition of the arm ``name``: DPO alone, or DPO+MLC under the
    pre-registered condition of that name at its weight, at MLC ``layer``."""
    if name == DPO:
        return replace(config.align, mlc_layer=layer), "dpo"
    cond = next(c for c in config.conditions if c.name == name)
    return condition_align(config.align, cond, config.weight(name), layer), "dpo+mlc"


def condition_align(align: AlignConfig, condition: Condition, weight: float, layer: int) -> AlignConfig:
    """``align`` with the condition's MLC settings at ``weight`` and ``layer``."""
    return replace(align, mlc_weight=weight, mlc_objective=condition.objective, mlc_guard=condition.guard,
                   mlc_extractor=condition.extractor, mlc_layer=layer, mlc_lead_steps=condition.lead_steps)  # fmt: skip
