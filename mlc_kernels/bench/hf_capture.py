"""The hf-capture suite (``mlc-bench --suite hf-capture``): the variant passes of one training step on a mini
Qwen2-style model with a realistic vocabulary, the naive way (full forward with ``output_hidden_states=True``),
truncated at layer k, and truncated with the representation-gradient cache. Time and peak memory above the
parameters, their gradients and the inputs (CUDA allocator; on CPU a fresh child process, this module run as
``__main__``). Writes ``hf_capture.csv``/``.png``; skipped without transformers.
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any

import torch

from mlc_kernels import MLCHead, mlc_loss
from mlc_kernels.hf import grad_cached_mlc_backward, last_token_index, variant_representations

from .utils import (
    TIMING_COLUMNS,
    Column,
    Options,
    PlotSpec,
    child_peak,
    cuda_peak,
    device_name,
    emit,
    mb,
    peak_extra,
    ratio,
    row,
    time_stmt,
)

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
VARIANTS = ("naive", "truncated", "grad_cache")

COLUMNS: list[Column] = [
    ("variant", "variant", ""),
    ("N", "N", "d"),
    ("m", "m", "d"),
    ("T", "T", "d"),
    ("layer", "k", "d"),
    *TIMING_COLUMNS,
    ("extra_mb", "extra MB", ".1f"),
    ("time_vs_naive", "t/naive", ".2f"),
    ("memory_vs_naive", "mem/naive", ".2f"),
    ("memory_vs_truncated", "mem/truncated", ".2f"),
]
PLOT = PlotSpec(
    label=lambda r: r["variant"], series=lambda r: f"N={r['N']} T={r['T']}", extra=("extra_mb", "extra peak MB")
)


def config_for(device: torch.device) -> tuple[dict, torch.dtype]:
    """The model configuration and dtype of the benchmark on ``device`` (larger, bf16 on CUDA)."""
    return (HF_CONFIG_GPU, torch.bfloat16) if device.type == "cuda" else (HF_CONFIG, torch.float32)


def build(device: torch.device, seed: int = 0):
    """(model, head): the random-init model of :func:`config_for` in train mode and an ``MLCHead`` (rep 128)."""
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
    """Random token ids and a full attention mask, both ``(n, m, t)``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, HF_CONFIG["vocab_size"], (n, m, t), generator=gen).to(device)
    att = torch.ones(n, m, t, dtype=torch.long, device=device)
    return ids, att


def variant_step(model, head, ids, att, layer: int, variant: str) -> int:
    """One forward+backward of the variant passes and the MLC loss; returns the bytes of the parameter
    gradients (handed back to the optimizer, not counted as extra memory)."""
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


def cuda_peak_extra(model, head, ids, att, layer: int, variant: str) -> int:
    """CUDA bytes at the peak of one step above the parameters, the inputs and the gradients handed back."""
    model.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    return cuda_peak(lambda: variant_step(model, head, ids, att, layer, variant))


def _child_setup(n: int, m: int, t: int, layer: int, variant: str) -> tuple:
    dev = torch.device("cpu")
    model, head = build(dev)
    ids, att = inputs(n, m, t, dev)
    variant_step(model, head, ids[:1, :2, :4], att[:1, :2, :4], layer, variant)  # lazy imports
    return model, head, ids, att, layer, variant


def run_hf_capture(shape, opts: Options) -> list[dict[str, Any]]:
    """The variant passes: naive vs truncated (same N), and the gradient cache vs truncated."""
    device = opts.device
    n, m, t = shape
    layer = config_for(device)[0]["num_hidden_layers"] // 2
    model, head = build(device)
    ids, att = inputs(n, m, t, device)
    rows = []
    for variant in VARIANTS:
        timing = time_stmt(
            lambda v=variant: variant_step(model, head, ids, att, layer, v), device, opts.budget_s, opts.threads
        )
        on_cuda = partial(cuda_peak_extra, model, head, ids, att, layer, variant)
        peak = peak_extra(opts, on_cuda, "hf_capture", n=n, m=m, t=t, layer=layer, variant=variant)
        key = dict(device=device_name(device), N=n, m=m, T=t, layer=layer, variant=variant)
        rows.append(row(key, timing, opts.threads, peak_extra_bytes=peak, time_vs_naive=None, memory_vs_naive=None,
                        memory_vs_truncated=None))  # fmt: skip
    naive, truncated, cached = rows
    for r in (truncated, cached):
        r["time_vs_naive"] = r["median_ms"] / naive["median_ms"]
        r["memory_vs_naive"] = ratio(r["peak_extra_bytes"], naive["peak_extra_bytes"])
    cached["memory_vs_truncated"] = ratio(cached["peak_extra_bytes"], truncated["peak_extra_bytes"])
    return rows


def run(args: argparse.Namespace, opts: Options) -> None:
    """The suite under the runner's options (``--hf-shape``); skipped without transformers."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("hf-capture: skipped (pip install transformers)")
        return
    rows = run_hf_capture(args.hf_shape or (HF_SHAPE_GPU if opts.device.type == "cuda" else HF_SHAPE), opts)
    shown = [{**r, "extra_mb": mb(r["peak_extra_bytes"])} for r in rows]
    title = (
        f"Variant passes on a Qwen2-style model (vocab 151936) on {rows[0]['device']}: naive "
        "full forward with output_hidden_states vs truncated at k vs truncated + gradient cache"
    )
    emit("hf_capture", title, shown, COLUMNS, PLOT, args.out)


if __name__ == "__main__":  # the memory child of peak_extra off CUDA
    child_peak(_child_setup, lambda state: variant_step(*state))
