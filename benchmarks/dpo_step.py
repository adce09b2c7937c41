"""A whole training step, DPO alone vs DPO + MLC (plain variant passes and gradient cache), without TRL.

Qwen2-0.5B-shaped random-init model (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864,
vocabulary 151,936) in bf16 with a frozen reference copy; 8 prompts, chosen and rejected responses
(sequences of ``prompt_len + response_len`` tokens), m=10 variants of ``variant_len`` tokens
represented after layer k=12 through an ``MLCHead`` (the fused linear MLC loss). The DPO loss is
computed by hand from the policy's and the reference's summed completion log-probabilities.
A step: loss, backward, AdamW step. Writes ``dpo_step.csv`` and ``dpo_step.txt`` (time and peak
memory ratios to DPO alone) to ``--out``; ``--smoke`` runs a tiny fp32 model on the CPU.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from mlc_kernels.bench.utils import cuda_peak, time_call, write_csv

QWEN2_05B = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=512,
)  # fmt: skip
SMOKE = dict(QWEN2_05B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
VARIANTS = ("dpo", "dpo+mlc", "dpo+mlc+grad_cache")


def build(config: dict, dtype: torch.dtype, device: torch.device, n: int, m: int, prompt_len: int,
          response_len: int, variant_len: int, seed: int = 0):  # fmt: skip
    """(policy, reference, head, batch): random-init models and random token ids on ``device``."""
    import transformers

    from mlc_kernels import MLCHead

    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config)).to(dtype)
        head = MLCHead(config["hidden_size"], 256, dtype=dtype)
    model.config.use_cache = False
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    vocab = config["vocab_size"]
    gen = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randint(4, vocab, (n, prompt_len), generator=gen)
    chosen, rejected = (torch.randint(4, vocab, (n, response_len), generator=gen) for _ in range(2))
    ids = torch.cat([torch.cat([prompt, chosen], 1), torch.cat([prompt, rejected], 1)])
    completion = torch.zeros_like(ids, dtype=torch.bool)
    completion[:, prompt_len:] = True
    variants = torch.randint(4, vocab, (n, m, variant_len), generator=gen)
    batch = {"ids": ids.to(device), "completion": completion.to(device), "variants": variants.to(device),
             "variant_att": torch.ones_like(variants).to(device)}  # fmt: skip
    return model.train(), ref, head, batch


def sequence_logps(model, ids: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    """Summed log-probabilities of the completion tokens of each sequence ``(B,)`` fp32."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    token = -F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    return (token.view(ids.shape[0], -1) * completion[:, 1:]).sum(-1)


def dpo_loss(model, ref, batch: dict, beta: float = 0.1) -> torch.Tensor:
    """``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``, mean over prompts."""
    n = batch["ids"].shape[0] // 2
    policy = sequence_logps(model, batch["ids"], batch["completion"])
    with torch.no_grad():
        reference = sequence_logps(ref, batch["ids"], batch["completion"])
    margin = (policy[:n] - reference[:n]) - (policy[n:] - reference[n:])
    return -F.logsigmoid(beta * margin).mean()


def step(variant: str, model, ref, head, optimizer, batch: dict, layer: int, weight: float = 0.1) -> None:
    """One training step of ``variant``: loss, backward, optimizer step."""
    from mlc_kernels.hf import grad_cached_mlc_loss, variant_representations

    loss = dpo_loss(model, ref, batch)
    if variant == "dpo+mlc":
        reps, mask = variant_representations(model, batch["variants"], batch["variant_att"], layer)
        loss = loss + weight * head.loss(reps, mask)
    elif variant == "dpo+mlc+grad_cache":
        mlc = grad_cached_mlc_loss(model, lambda r, mk: head.loss(r, mk), list(head.parameters()), batch["variants"],
                                   batch["variant_att"], layer, chunk_prompts="auto")  # fmt: skip
        loss = loss + weight * mlc
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--smoke", action="store_true", help="a tiny fp32 model on the CPU")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        config, dtype, layer = SMOKE, torch.float32, 1
        shape = dict(n=2, m=3, prompt_len=8, response_len=8, variant_len=8)
    else:
        config, dtype, layer = QWEN2_05B, torch.bfloat16, 12
        shape = dict(n=8, m=10, prompt_len=64, response_len=64, variant_len=64)
    model, ref, head, batch = build(config, dtype, device, **shape)
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-6)
    for variant in VARIANTS:  # optimizer states, kernel compilation, allocator: before any timing
        step(variant, model, ref, head, optimizer, batch, layer)
    rows = []
    for variant in VARIANTS:
        run = lambda _, v=variant: step(v, model, ref, head, optimizer, batch, layer)  # noqa: E731
        ms = time_call(run, lambda: None, device, 2.0, min_reps=3, max_reps=5).median_ms  # warm-up included
        peak = None
        if device.type == "cuda":
            peak = cuda_peak(lambda r=run: r(None) or 0)
        rows.append({"variant": variant, "step_ms": round(ms, 2), "peak_extra_bytes": peak, **shape, "layer": layer,
                     "dtype": str(dtype).removeprefix("torch.")})  # fmt: skip
        print(rows[-1], flush=True)
    base = rows[0]
    lines = []
    for r in rows:
        r["time_vs_dpo"] = round(r["step_ms"] / base["step_ms"], 3)
        r["memory_vs_dpo"] = round(r["peak_extra_bytes"] / base["peak_extra_bytes"], 3) if peak else None
        lines.append(f"train step {r['variant']}: {r['step_ms']} ms, time x{r['time_vs_dpo']} of DPO, "
                     f"peak extra memory x{r['memory_vs_dpo']} of DPO")  # fmt: skip
    write_csv(rows, args.out / "dpo_step.csv")
    (args.out / "dpo_step.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
