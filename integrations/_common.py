"""Shared by the recipes: the model and tokenizer (a local path / hub id, or the offline demo model)."""

from __future__ import annotations

import argparse

from mlc_kernels.fixtures import demo_model_and_tokenizer


def model_and_tokenizer(model_path: str | None):
    if model_path:
        import transformers

        return (transformers.AutoModelForCausalLM.from_pretrained(model_path),
                transformers.AutoTokenizer.from_pretrained(model_path))  # fmt: skip
    return demo_model_and_tokenizer()


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=None, help="local path or hub id (default: offline demo model)")
    p.add_argument("--output-dir", default="runs/recipe")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--mlc-weight", type=float, default=0.1)
    p.add_argument("--mlc-layer", type=int, default=None)
    return p
