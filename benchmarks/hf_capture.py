"""Variant passes of one training step on a mini Qwen2-style model with a realistic vocabulary:
the naive way (full forward with ``output_hidden_states=True``), truncated at layer k, and truncated
with the representation-gradient cache. Time and peak memory above the parameters, their gradients and
the inputs (``mlc-bench --suite hf-capture``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlc_kernels import MLCHead, mlc_loss

HF_SHAPE = (8, 10, 32)  # N prompts, m variants, T tokens
HF_SHAPE_GPU = (8, 10, 64)
HF_CONFIG = dict(  # mini Qwen2-style: realistic vocabulary, small body
    vocab_size=151936, hidden_size=256, intermediate_size=704, num_hidden_layers=8, num_attention_heads=4,
    num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128,
)  # fmt: skip
HF_CONFIG_GPU = dict(  # larger body for a GPU, run in bf16
    HF_CONFIG, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
    num_key_value_heads=4,
)  # fmt: skip


def config_for(device: torch.device) -> tuple[dict, torch.dtype]:
    """The model configuration and dtype of the benchmark on ``device`` (larger, bf16 on CUDA)."""
    return (HF_CONFIG_GPU, torch.bfloat16) if device.type == "cuda" else (HF_CONFIG, torch.float32)


@dataclass
class CaptureRow:
    device: str
    N: int
    m: int
    T: int
    layer: int
    variant: str
    median_ms: float
    iqr_ms: float
    min_ms: float
    max_ms: float
    runs: int
    threads: int
    peak_extra_bytes: int | None = None
    time_vs_naive: float | None = None
    memory_vs_naive: float | None = None
    memory_vs_truncated: float | None = None


def build(device: torch.device, seed: int = 0):
    import transformers

    config, dtype = config_for(device)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config)).to(device=device, dtype=dtype)
    # Frozen (tied) embeddings: their dense gradient is written sparsely into zero pages, which would
    # make a resident-memory measurement undercount what is handed back. Activations are unchanged.
    model.get_input_embeddings().weight.requires_grad_(False)
    head = MLCHead(config["hidden_size"], 128).to(device=device, dtype=dtype)
    return model.train(), head


def inputs(n: int, m: int, t: int, device: torch.device, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, HF_CONFIG["vocab_size"], (n, m, t), generator=gen).to(device)
    att = torch.ones(n, m, t, dtype=torch.long, device=device)
    return ids, att


def variant_step(model, head, ids, att, layer: int, variant: str) -> int:
    """One forward+backward of the variant passes and the MLC loss; returns the bytes of the parameter
    gradients (handed back to the optimizer, not counted as extra memory)."""
    from mlc_kernels.hf import grad_cached_mlc_backward, last_token_index, variant_representations

    model.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    n, m, t = ids.shape
    if variant == "naive":
        out = model(input_ids=ids.view(-1, t), attention_mask=att.view(-1, t), output_hidden_states=True)
        hidden = out.hidden_states[layer]
        reps = hidden[torch.arange(n * m, device=ids.device), last_token_index(att.view(-1, t))].view(n, m, -1)
        mlc_loss(head(reps)).backward()
        del out, hidden
    elif variant == "truncated":
        reps, mask = variant_representations(model, ids, att, layer)
        mlc_loss(head(reps), mask).backward()
    else:
        grad_cached_mlc_backward(model, lambda r, mk: mlc_loss(head(r), mk), ids, att, layer, chunk_prompts="auto")
    params = [*model.parameters(), *head.parameters()]
    return sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
