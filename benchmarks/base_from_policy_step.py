"""A whole DPO training step with and without MLC, the base-language variant in its own pass vs taken from the policy
forward of the chosen sequence (``MLCArguments.base_from_policy``, issue 22 item 5): time per step and the ratio
DPO+MLC / DPO of each, in one interleaved run.

Mini Qwen2-style model (hidden 512, 8 layers) with a small vocabulary (512 by default: the LM head is cheap, so the
variant passes are a visible share of the step), 8 prompts of 32 tokens with 64-token responses, m=10 variants of
32 tokens (the base one is the prompt itself, so its tokens are the chosen sequence's prompt prefix), layer k=4,
TRL's DPO ``compute_loss`` + backward + AdamW step: ``python -m benchmarks.base_from_policy_step [--vocab V]
[--rounds R] [--threads T] [--out DIR]`` (writes ``base_from_policy_step.txt`` there).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from mlc_kernels.bench.train_step import STEP_CONFIG, _byte_tokenizer, _dummy_dataset, step
from mlc_kernels.bench.utils import device_name
from mlc_kernels.sample_data import LANGUAGES
from mlc_kernels.trainers import MLCArguments, MLCCollator, trl_classes

VARIANTS = ("dpo", "dpo+mlc (base in its own pass)", "dpo+mlc (base from the policy forward)")


def build(
    variant: str, vocab: int, n: int = 8, prompt_len: int = 32, response_len: int = 64, m: int = 10, device: str = "cpu"
):
    """(trainer, model, optimizer, batch) of one variant, seed 0 (the same model and batch for every variant)."""
    import transformers
    import trl

    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**STEP_CONFIG, "vocab_size": vocab}))
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(4, vocab, (n, prompt_len), generator=gen)
    chosen, rejected = (torch.randint(4, vocab, (n, response_len), generator=gen) for _ in range(2))
    ids = torch.cat([torch.cat([prompt, chosen], 1), torch.cat([prompt, rejected], 1)])
    completion = torch.zeros_like(ids)
    completion[:, prompt_len:] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion}
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=_byte_tokenizer(), pad_token="<pad>",
                                                     eos_token="<eos>")  # fmt: skip
    common = dict(output_dir="/tmp/mlc_base_step", report_to=[], use_cpu=device == "cpu", per_device_train_batch_size=n)
    if variant == "dpo":
        trainer = trl.DPOTrainer(model=model, ref_model=ref, args=trl.DPOConfig(**common),
                                 train_dataset=_dummy_dataset(), processing_class=tokenizer)  # fmt: skip
    else:
        trainer_cls, config_cls = trl_classes("dpo")
        reuse = variant.endswith("policy forward)")
        mlc = MLCArguments(languages=LANGUAGES[:m], weight=0.1, layer=4, rep_size=256, impl="auto",
                           base_from_policy=reuse, log_metrics=False)  # fmt: skip
        trainer = trainer_cls(model=model, ref_model=ref, args=config_cls(**common), train_dataset=_dummy_dataset(),
                              processing_class=tokenizer, mlc_args=mlc)  # fmt: skip
        others = torch.randint(4, vocab, (n, m - 1, prompt_len), generator=gen)
        variants = [[prompt[i].tolist(), *others[i].tolist()] for i in range(n)]
        collate = MLCCollator(lambda ex: dict(batch), 0, base_index=0 if reuse else None)
        batch = collate([{"mlc_variant_ids": v} for v in variants])
        if reuse and batch["mlc_base_reason"] is not None:
            raise RuntimeError(f"the base variant does not match: {batch['mlc_base_reason']}")
    trainer.current_gradient_accumulation_steps = 1
    model.to(device)
    ref.to(device)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return trainer, model.train(), optimizer, batch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (one step of each variant)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    if args.vocab < 8 or args.rounds < 1 or args.threads < 1:
        parser.error("--vocab must be >= 8, --rounds and --threads >= 1")
    torch.set_num_threads(args.threads)
    states = {v: build(v, args.vocab, device=args.device) for v in VARIANTS}
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for state in states.values():  # warm-up: gradients and optimizer states allocated
        step(*state)
    for _ in range(args.rounds):
        for v, state in states.items():
            sync()
            start = time.perf_counter()
            step(*state)
            sync()
            times[v].append(time.perf_counter() - start)
    med = {v: statistics.median(t) * 1e3 for v, t in times.items()}
    lines = [f"{device_name(torch.device(args.device))}, {args.threads} threads, vocab {args.vocab}, {args.rounds} "
             f"interleaved rounds (median step ms, ratio to DPO)"]  # fmt: skip
    lines += [f"{v}: {med[v]:.1f} ms, {med[v] / med['dpo']:.3f}x" for v in VARIANTS]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "base_from_policy_step.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
