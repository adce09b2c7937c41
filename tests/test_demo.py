"""``mlc demo``: the shipped world-v2 checkpoint loads and passes the gate's behaviour checks."""

from __future__ import annotations

import pytest

from mlc_kernels.transfer.pretrain import SHIPPED, load_shipped

pytestmark = pytest.mark.skipif(not (SHIPPED / "model.safetensors").is_file(), reason="no shipped checkpoint")


def test_shipped_checkpoint_loads_and_passes_the_gate():
    from mlc_kernels.transfer.gate import THRESHOLDS, measure, summarise
    from mlc_kernels.transfer.pretrain import cache_key
    from mlc_kernels.transfer.protocol import MODEL
    from mlc_kernels.transfer.world import World, world_config, world_tokenizer

    model, tokenizer, recipe = load_shipped()
    world = World(world_config(recipe["world"], recipe["world_seed"]))
    assert recipe["cache_key"] == cache_key(world.config, MODEL)  # made by this package's code for this config
    assert tokenizer.get_vocab() == world_tokenizer(world).get_vocab()
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) < 5e6
    languages = [lang.code for lang in world.config.languages]
    summary = summarise([measure(model, tokenizer, world, train_prompts=128, test_prompts=64)], languages)
    assert summary["worst_base_safety"] <= THRESHOLDS["base_safety_max"]
    assert summary["worst_private_refusal"] >= THRESHOLDS["private_refusal_min"]
    assert summary["transfer"]["base"] >= THRESHOLDS["base_probe_min"]


# The demo itself (default settings, its table, PNGs and model): tests/test_first_hour_demo.py.
