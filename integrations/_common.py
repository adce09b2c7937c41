"""Shared by the recipes: the model and tokenizer (a local path / hub id, or the offline demo model)."""

from __future__ import annotations

import argparse

from mlc_kernels.cli import demo_model, demo_tokenizer
from mlc_kernels.sample_data import load_sample


def model_and_tokenizer(model_path: str | None):
    if model_path:
        import transformers

        return (transformers.AutoModelForCausalLM.from_pretrained(model_path),
                transformers.AutoTokenizer.from_pretrained(model_path))  # fmt: skip
    records = load_sample("train") + load_sample("heldout")
    texts = [r["prompt"] for r in records] + [t for r in records for t in r["variants"].values() if t]
    tokenizer = demo_tokenizer(texts + [r["chosen"] for r in records] + [r["rejected"] for r in records])
    return demo_model(len(tokenizer)), tokenizer


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=None, help="local path or hub id (default: offline demo model)")
    p.add_argument("--output-dir", default="runs/recipe")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--mlc-weight", type=float, default=0.1)
    p.add_argument("--mlc-layer", type=int, default=None)
    return p
