"""Each recipe in integrations/ runs end to end on the offline demo model."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("trl")
RECIPES = Path(__file__).resolve().parent.parent / "integrations"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["trl_dpo_mlc", "trl_sft_mlc"])
def test_trl_recipes(name, tmp_path):
    trainer = _load(name).main(["--steps", "3", "--output-dir", str(tmp_path), "--mlc-layer", "2"])
    logs = [e for e in trainer.state.log_history if "mlc/loss" in e]
    # the authors' schedule (aux_every 2): the term on global steps 0 and 2, logged after optimizer steps 1 and 3
    assert [e["step"] for e in logs] == [1, 3] and all(math.isfinite(e["mlc/loss"]) for e in logs)
    assert (tmp_path / "mlc_head" / "mlc_head.safetensors").is_file()


def test_liger_recipe(tmp_path):
    pytest.importorskip("liger_kernel")
    history = _load("liger_dpo_mlc").main(["--steps", "3", "--output-dir", str(tmp_path), "--mlc-layer", "2"])
    assert len(history) == 3
    assert history[-1]["dpo_loss"] < history[0]["dpo_loss"]  # Liger's DPO loss is being optimised
    assert [h["mlc_loss"] is not None for h in history] == [True, False, True]  # aux_every 2
    assert all(math.isfinite(h["mlc_loss"]) for h in history if h["mlc_loss"] is not None)
    assert (tmp_path / "mlc_head" / "mlc_head.safetensors").is_file()
