"""Packed against padded variant passes on the ten-language sample set (``python -m benchmarks.packed_passes``).

The sample set's variants differ in length (low-resource languages tokenise longer), so a padded
``(N * m, T)`` batch spends much of its compute on padding. The packed path runs only the real tokens, in one
row per micro-batch with position ids that restart per sequence. Reported per device: tokens processed by each
path, their ratio, and the time of a forward+backward of the truncated variant passes (median and IQR of
``torch.utils.benchmark.Timer.blocked_autorange``). Target: packed time / padded time <= token ratio + 10%.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from mlc_kernels.bench.hf_capture import config_for
from mlc_kernels.bench.utils import write_csv

PROMPTS = 8  # prompts per micro-batch, all ten languages each


@dataclass
class PackedRow:
    device: str
    N: int
    m: int
    layer: int
    path: str
    tokens: int
    time_ms: float
    iqr_ms: float
    tokens_vs_padded: float | None = None
    time_vs_padded: float | None = None


def sample_batch(tokenizer, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first ``n`` training prompts of the sample set in all ten languages, chat-templated, left-padded:
    ``(input_ids, attention_mask)`` ``(n, 10, T)`` and the variant mask ``(n, 10)``."""
    from mlc_kernels.sample_data import LANGUAGES, load_sample

    records = load_sample("train")[:n]
    texts, present = [], []
    for r in records:
        for lang in LANGUAGES:
            text = r["prompt"] if lang == "en" else r["variants"].get(lang)
            present.append(bool(text))
            messages = [{"role": "user", "content": text or "-"}]
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    shape = (len(records), len(LANGUAGES), -1)
    mask = torch.tensor(present).view(len(records), len(LANGUAGES))
    return enc["input_ids"].view(shape), enc["attention_mask"].view(shape), mask


def measure(
    device: torch.device, n: int = PROMPTS, layer: int | None = None, min_run_time: float = 2.0
) -> list[PackedRow]:
    import transformers
    from torch.utils.benchmark import Timer

    from mlc_kernels import MLCHead, mlc_loss
    from mlc_kernels.fixtures import demo_tokenizer
    from mlc_kernels.hf import variant_representations
    from mlc_kernels.sample_data import load_sample

    records = load_sample("train") + load_sample("heldout")
    tokenizer = demo_tokenizer(
        [r["prompt"] for r in records] + [t for r in records for t in r["variants"].values() if t]
    )
    config, dtype = config_for(device)
    config = dict(config, vocab_size=len(tokenizer))
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config)).to(device=device, dtype=dtype).train()
    model.config._attn_implementation = "sdpa"
    head = MLCHead(config["hidden_size"], 128).to(device=device, dtype=dtype)
    ids, att, mask = (t.to(device) for t in sample_batch(tokenizer, n))
    k = layer or config["num_hidden_layers"] // 2

    def step(packed: bool) -> None:
        model.zero_grad(set_to_none=True)
        reps, present = variant_representations(model, ids, att, k, mask, packed=packed)
        mlc_loss(head(reps), present).backward()

    rows = []
    padded_tokens = int(mask.sum()) * ids.shape[-1]
    real_tokens = int(att[mask].sum())
    for packed, tokens in ((False, padded_tokens), (True, real_tokens)):
        step(packed)  # warm-up
        timer = Timer("step(packed)", globals={"step": step, "packed": packed})
        result = timer.blocked_autorange(min_run_time=min_run_time)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows.append(PackedRow(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", N=n,
                              m=ids.shape[1], layer=k, path="packed" if packed else "padded", tokens=tokens,
                              time_ms=result.median * 1e3, iqr_ms=result.iqr * 1e3))  # fmt: skip
    padded, packed_row = rows
    packed_row.tokens_vs_padded = packed_row.tokens / padded.tokens
    packed_row.time_vs_padded = packed_row.time_ms / padded.time_ms
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", type=int, default=PROMPTS)
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds per timed path")
    parser.add_argument("--out", type=Path, default=None, help="folder for packed_passes.csv")
    args = parser.parse_args(argv)
    rows = measure(torch.device(args.device), args.prompts, min_run_time=args.min_run_time)
    for r in rows:
        extra = f"  tokens x{r.tokens_vs_padded:.2f}  time x{r.time_vs_padded:.2f}" if r.time_vs_padded else ""
        print(f"{r.device} {r.path:7s} tokens {r.tokens:6d}  {r.time_ms:9.2f} ms (IQR {r.iqr_ms:.2f}){extra}")
    if args.out:
        write_csv(rows, args.out / "packed_passes.csv")


if __name__ == "__main__":
    main()
