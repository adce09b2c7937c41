"""Generation throughput of ``mlc safety`` (``python -m benchmarks.safety_generation``): prompts answered per
second by :func:`mlc_kernels.safety.generate.generate_answers` (chat template, sorted by length, left-padded
batches, greedy, stop at EOS, ``torch.inference_mode``) against the baseline measured in the same run: one prompt
at a time through ``model.generate`` (the same greedy settings, no padding).

Configurations (random-init models from transformers configs, nothing downloaded):

- ``cpu`` (default): the package's mini Qwen2 (4 layers, hidden 64) and its BPE tokenizer
  (:func:`mlc_kernels.fixtures.demo_model_and_tokenizer`), fp32.
- ``gpu``: a Qwen2-0.5B-shaped model (24 layers, hidden 896, 14 heads, 2 KV heads, intermediate 4864, vocabulary
  151936), bf16 on CUDA, batch 64 (``--config gpu``; needs a CUDA device).

Prompts: the embedded sample set's prompts in its ten languages (their chat-templated lengths differ, as real
multilingual sets do). A random model rarely emits EOS, so every answer runs to ``--max_new_tokens``: the
figures are the cost of full-length answers (a trained model that refuses stops sooner).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch

QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
                 vocab_size=151936)  # fmt: skip
"""Qwen2-0.5B's shape (its config.json), for the GPU configuration."""


def sample_prompts(count: int) -> list[str]:
    """``count`` prompts of the sample set, cycling through its records and ten languages."""
    from mlc_kernels.sample_data import LANGUAGES, load_sample

    texts = []
    for record in load_sample("train") + load_sample("heldout"):
        texts += [record["prompt"] if lang == "en" else record["variants"].get(lang) for lang in LANGUAGES]
    texts = [t for t in texts if t]
    return [texts[(i * 7) % len(texts)] for i in range(count)]  # spread over records and languages


def build(config: str, device: torch.device):
    """``(model, tokenizer)``: the configuration's random-init model in eval mode on ``device``."""
    import transformers

    from mlc_kernels.fixtures import demo_model_and_tokenizer

    model, tokenizer = demo_model_and_tokenizer()
    if config == "gpu":
        torch.manual_seed(0)
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**QWEN2_05B)).to(torch.bfloat16)
    return model.to(device).eval(), tokenizer


def one_at_a_time(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The baseline: ``model.generate`` per prompt (greedy, stop at EOS), no batching, no padding."""
    from mlc_kernels.safety.generate import prompt_token_ids

    device = next(model.parameters()).device
    answers = []
    with torch.inference_mode():
        for ids in prompt_token_ids(tokenizer, prompts):
            x = torch.tensor([ids], device=device)
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, num_beams=1,
                                 max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
            answers.append(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip())
    return answers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    from mlc_kernels.safety.generate import generate_answers

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--prompts", type=int, default=None, help="prompts per run (default: 64 on cpu, 256 on gpu)")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--batch_sizes", default=None, help="comma list (default: 1,16,64 on cpu, 64 on gpu)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    p.add_argument("--csv", default=None, help="write the rows to this CSV file")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.config == "gpu" else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--config gpu needs a CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    count = args.prompts or (256 if args.config == "gpu" else 64)
    sizes = [int(s) for s in (args.batch_sizes or ("64" if args.config == "gpu" else "1,16,64")).split(",")]
    model, tokenizer = build(args.config, device)
    prompts = sample_prompts(count)
    paths = {"one at a time (model.generate)": lambda: one_at_a_time(model, tokenizer, prompts, args.max_new_tokens)}
    for size in sizes:
        paths[f"generate_answers batch {size}"] = (lambda size=size: generate_answers(
            model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=size))  # fmt: skip
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} torch threads"
    print(f"safety generation: {args.config} config on {name}; {count} prompts, max_new_tokens "
          f"{args.max_new_tokens}, median of {args.repeats} runs after a warm-up")  # fmt: skip
    rows, base = [], None
    for label, fn in paths.items():
        seconds = statistics.median(timed(fn, device, args.repeats))
        rate = count / seconds
        base = base or rate
        rows.append({"config": args.config, "path": label, "prompts": count, "max_new_tokens": args.max_new_tokens,
                     "seconds": round(seconds, 4), "prompts_per_s": round(rate, 2),
                     "vs_one_at_a_time": round(rate / base, 2)})  # fmt: skip
        print(f"  {label:<34} {seconds:8.2f} s  {rate:8.1f} prompts/s  x{rate / base:.2f}")
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
