"""The train-step suite (``mlc-bench --suite train-step``, minutes on CPU): a whole DPO training step with and
without the MLC term, time and peak memory relative to DPO alone. Writes ``train_step.csv``/``.png``.

Mini Qwen2-style model of realistic proportions (hidden 512, 8 layers, vocabulary 151,936), 8 prompts of
about 32 tokens with 64-token responses, m=10 variants, k=4. Variants: DPO alone; DPO+MLC with the plain
truncated variant passes; DPO+MLC with the gradient cache. A step is TRL's ``compute_loss``, ``backward``
and an AdamW step (a reference model forward included, as DPO needs it). Peak memory (CPU only) is measured in a
fresh child process, this module run as ``__main__``, above parameters, gradients, optimizer states and inputs.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch

from mlc_kernels.sample_data import LANGUAGES
from mlc_kernels.trainers import MLCArguments, MLCCollator, trl_classes

from .utils import (
    TIMING_COLUMNS,
    Column,
    Options,
    PlotSpec,
    child_peak,
    device_name,
    emit,
    mb,
    peak_in_child,
    ratio,
    row,
    time_stmt,
)

STEP_CONFIG = dict(
    vocab_size=151936, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=256,
)  # fmt: skip
VARIANTS = ("dpo", "dpo+mlc", "dpo+mlc+grad_cache")

COLUMNS: list[Column] = [
    ("variant", "variant", ""),
    *TIMING_COLUMNS,
    ("extra_mb", "extra MB", ".1f"),
    ("time_vs_dpo", "t/dpo", ".2f"),
    ("memory_vs_dpo", "mem/dpo", ".2f"),
]
PLOT = PlotSpec(label=lambda r: r["variant"], series=lambda r: "step", extra=("extra_mb", "extra peak MB"))


def build(variant: str, n_prompts: int = 8, prompt_len: int = 32, response_len: int = 64, m: int = 10, seed: int = 0):
    """(trainer, model, optimizer, batch) for one variant; inputs are pre-tokenised random ids."""
    import transformers
    import trl

    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**STEP_CONFIG))
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed + 1)
    vocab = STEP_CONFIG["vocab_size"]
    prompt = torch.randint(4, vocab, (n_prompts, prompt_len), generator=gen)
    chosen = torch.randint(4, vocab, (n_prompts, response_len), generator=gen)
    rejected = torch.randint(4, vocab, (n_prompts, response_len), generator=gen)
    ids = torch.cat([torch.cat([prompt, chosen], 1), torch.cat([prompt, rejected], 1)])
    completion = torch.zeros_like(ids)
    completion[:, prompt_len:] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_byte_tokenizer(), pad_token="<pad>", eos_token="<eos>"
    )
    common = dict(output_dir="/tmp/mlc_train_step", report_to=[], use_cpu=not torch.cuda.is_available(),
                  per_device_train_batch_size=n_prompts)  # fmt: skip
    dummy = _dummy_dataset()
    if variant == "dpo":
        trainer = trl.DPOTrainer(model=model, ref_model=ref, args=trl.DPOConfig(**common), train_dataset=dummy,
                                 processing_class=tokenizer)  # fmt: skip
    else:
        trainer_cls, config_cls = trl_classes("dpo")
        mlc = MLCArguments(languages=LANGUAGES[:m], weight=0.1, layer=4, rep_size=256, impl="auto",
                           grad_cache=variant.endswith("grad_cache"), chunk_prompts=1)  # fmt: skip
        trainer = trainer_cls(model=model, ref_model=ref, args=config_cls(**common), train_dataset=dummy,
                              processing_class=tokenizer, mlc_args=mlc)  # fmt: skip
        variants = torch.randint(4, vocab, (n_prompts, m, prompt_len), generator=gen)
        mlc_batch = MLCCollator(lambda ex: {}, 0)([{"mlc_variant_ids": v.tolist()} for v in variants])
        batch.update(mlc_batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return trainer, model.train(), optimizer, batch


def step(trainer, model, optimizer, batch) -> None:
    """One training step: loss, backward, optimizer step."""
    inputs = dict(batch)
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)


def _byte_tokenizer():
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>"))


def _dummy_dataset():
    import datasets

    return datasets.Dataset.from_list(
        [{"prompt": "a", "chosen": "b", "rejected": "c", "variants": {"zh": "d"}} for _ in range(2)]
    )


def _child_setup(variant: str) -> tuple:
    state = build(variant)
    step(*state)  # allocates gradients and optimizer states before the baseline
    return state


def run_train_step(opts: Options) -> list[dict[str, Any]]:
    """Every variant's step time (and peak memory on CPU); ratios to DPO alone."""
    device = opts.device
    rows: list[dict[str, Any]] = []
    for variant in VARIANTS:
        trainer, model, optimizer, batch = build(variant)
        t = time_stmt(
            lambda tr=trainer, mo=model, o=optimizer, b=batch: step(tr, mo, o, b),
            device,
            opts.budget_s,
            opts.threads,
            min_blocks=3,  # a step takes seconds on CPU
        )
        del trainer, model, optimizer, batch
        peak = None
        if opts.memory and device.type == "cpu":
            peak = peak_in_child("train_step", opts, variant=variant)
        rows.append(row(dict(device=device_name(device), variant=variant), t, opts.threads, peak_extra_bytes=peak))
    base = rows[0]
    for r in rows:
        r["time_vs_dpo"] = round(r["median_ms"] / base["median_ms"], 3)
        memory = ratio(r["peak_extra_bytes"], base["peak_extra_bytes"])
        r["memory_vs_dpo"] = round(memory, 3) if memory is not None else None
    return rows


def run(args: argparse.Namespace, opts: Options) -> None:
    """The suite under the runner's options (none of its own)."""
    rows = run_train_step(opts)
    shown = [{**r, "extra_mb": mb(r["peak_extra_bytes"])} for r in rows]
    title = (
        "A whole DPO step (hidden 512, 8 layers, vocab 151936; 8 prompts, 32+64 tokens) with and "
        "without MLC (m=10, k=4); extra = peak above parameters, gradients, optimizer states and inputs"
    )
    emit("train_step", title, shown, COLUMNS, PLOT, args.out)


if __name__ == "__main__":  # the CPU memory child of run_train_step (peak_in_child)
    child_peak(_child_setup, lambda state: step(*state) or 0)
