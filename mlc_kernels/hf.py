"""Representations from Hugging Face decoder-only models: the hidden state of the last prompt token at
decoder layer k, with the forward stopped right after that layer (docs/design.md, section 4).

- :func:`last_prompt_hidden`: ``(B, hidden)`` for a padded batch (left or right padding);
  :func:`last_prompt_hidden_packed` for a packed batch (flash-attention 2, position ids).
- :func:`variant_representations`: the ``(N, m, hidden)`` tensor of N prompts' m variants, and its mask.
- :func:`grad_cached_mlc_backward`: the representation-gradient cache (GradCache, Gao et al. 2021): variant
  passes without autograd, the MLC loss and its gradient w.r.t. the representations, then chunk-by-chunk
  recomputation with autograd, so activation memory is bounded by the chunk instead of N x m.

Truncation runs the model's own forward over a shortened stack: the decoder layer list is swapped for its
first k layers and the LM head for an identity for the duration of the call, a forward hook on layer k records
its output, and the forward completes normally (the final norm runs on the captured states; the "logits" are
the normed last position, via ``logits_to_keep=1``, and are discarded). Layers after k never run and backward
reaches only layers <= k. Because the forward completes, every hook an engine put on the model (FSDP's
unshard/reshard and pre-backward hooks, DeepSpeed ZeRO-3's parameter fetches) runs its full cycle; nothing is
left half-done. The layer list, the LM head and the hook are restored in ``finally``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under PEFT / DDP / FSDP / compile wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        for attr in ("_orig_mod", "module"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module) and not isinstance(model, nn.ModuleList):
                model = inner
                break
        else:
            get_base = getattr(model, "get_base_model", None)
            if callable(get_base) and get_base() is not model:
                model = get_base()
            else:
                break
    return model


def decoder_layers(model: nn.Module) -> tuple[nn.ModuleList, nn.Module | None]:
    """The stack of decoder layers of ``model`` and the module run right after it (final norm), if found.

    Looks where transformers keeps them (``model.model.layers``: Llama, Qwen2/3, Mistral, Gemma, Phi3;
    ``transformer.h``: GPT-2 style; ``model.decoder.layers``: OPT), through PEFT and other wrappers.
    """
    base = _unwrap(model)
    decoder = base.get_decoder() if callable(getattr(base, "get_decoder", None)) else base
    candidates = [
        (decoder, "layers"),
        (base, "layers"),
        (getattr(base, "transformer", None), "h"),
        (getattr(decoder, "decoder", None), "layers"),
    ]
    for owner, name in candidates:
        layers = getattr(owner, name, None) if owner is not None else None
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            norm = None
            for norm_name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
                candidate = getattr(owner, norm_name, None)
                if isinstance(candidate, nn.Module):
                    norm = candidate
                    break
            return layers, norm
    raise TypeError(
        f"{type(model).__name__}: cannot find a stack of decoder layers (looked for model.layers, "
        "model.model.layers, transformer.h, model.decoder.layers); MLC capture supports decoder-only "
        "transformers models"
    )


FINAL_LAYER = "final"
"""The ``layer`` value for transformers' ``hidden_states[L]``: the last decoder layer's output after the model's
final norm (what ``output_hidden_states=True`` returns last; the state the MLC authors' code reads)."""

Layer = int | str
"""A decoder layer counted from 1 (negative: from the end), or :data:`FINAL_LAYER`."""


def resolve_layer(model: nn.Module, layer: Layer) -> Layer:
    """1-based index of decoder layer ``layer`` (negative counts from the end), or :data:`FINAL_LAYER` as is;
    raises naming the range."""
    n_layers = len(decoder_layers(model)[0])
    if layer == FINAL_LAYER:
        return FINAL_LAYER
    if isinstance(layer, bool) or not isinstance(layer, int) or layer == 0 or not -n_layers <= layer <= n_layers:
        raise ValueError(
            f"layer must be in 1..{n_layers} or -{n_layers}..-1 or {FINAL_LAYER!r} for {type(_unwrap(model)).__name__} "
            f"({n_layers} decoder layers), got {layer!r}"
        )
    return layer if layer > 0 else n_layers + 1 + layer


def layer_depth(model: nn.Module, layer: Layer) -> int:
    """How many decoder layers a pass up to ``layer`` runs (all of them for :data:`FINAL_LAYER`)."""
    k = resolve_layer(model, layer)
    return len(decoder_layers(model)[0]) if k == FINAL_LAYER else k


def last_token_index(attention_mask: torch.Tensor, *, check_rows: bool = True) -> torch.Tensor:
    """Index of the last non-padding token of each row of ``attention_mask`` ``(B, T)``, left or right padding.

    ``check_rows``: refuse a row without a token (reads a flag back from the device: one sync); pass False when
    the caller checked the rows on the host (:func:`variant_representations` with ``lengths``)."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, T), got {tuple(attention_mask.shape)}")
    present = attention_mask.bool()
    if check_rows and not bool(present.any(dim=1).all()):
        raise ValueError("attention_mask has a row with no token")
    t = present.shape[1]
    return (t - 1) - present.flip(dims=[1]).int().argmax(dim=1)


def _owner(model: nn.Module, target: nn.Module) -> tuple[nn.Module, str]:
    """The module holding ``target`` as a child, and the child's attribute name."""
    for module in _unwrap(model).modules():
        for name, child in module.named_children():
            if child is target:
                return module, name
    raise TypeError(f"{type(model).__name__}: {type(target).__name__} has no owner module")  # unreachable for HF


def capture_module(model: nn.Module, layer: Layer) -> tuple[nn.Module, int]:
    """The module whose output is the state after decoder layer ``layer`` (the final norm for
    :data:`FINAL_LAYER`), and how many decoder layers run before it."""
    layers, norm = decoder_layers(model)
    resolved = resolve_layer(model, layer)
    final = resolved == FINAL_LAYER
    k = len(layers) if final else resolved
    return (norm if final and norm is not None else layers[k - 1]), k


@contextlib.contextmanager
def _truncated_stack(model: nn.Module, layer: Layer, truncate: bool) -> Iterator[dict]:
    """Captures the hidden states after decoder layer ``layer`` (after the final norm for :data:`FINAL_LAYER`);
    with ``truncate``, while the context is open, the model's layer list holds only the first ``layer`` layers
    and its LM head is an identity (its output is discarded; with a 150k vocabulary even one position per
    sequence costs more than a small model's layers)."""
    layers, _ = decoder_layers(model)
    capture_at, k = capture_module(model, layer)
    captured: dict = {}

    def post_hook(module, args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output

    swaps = []  # (owner, attribute, original module)
    if truncate:
        if k < len(layers):
            swaps.append((*_owner(model, layers), nn.ModuleList(layers[:k])))
        get_head = getattr(_unwrap(model), "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        if isinstance(head, nn.Module):
            swaps.append((*_owner(model, head), nn.Identity()))
    handle = capture_at.register_forward_hook(post_hook)
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in swaps]
    try:
        for owner, name, replacement in swaps:
            setattr(owner, name, replacement)
        yield captured
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
        handle.remove()


def _hidden_after_layer(model: nn.Module, layer: Layer, truncate: bool, **inputs) -> torch.Tensor:
    """All hidden states ``(B, T, hidden)`` after decoder layer ``layer``; with ``truncate`` no later layer runs."""
    if "logits_to_keep" in inspect.signature(_unwrap(model).forward).parameters:
        inputs["logits_to_keep"] = 1  # the (identity) LM head sees one position
    with _truncated_stack(model, layer, truncate) as captured:
        model(use_cache=False, **inputs)
    return captured["hidden"]


def last_prompt_hidden(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layer: Layer,
    *,
    truncate: bool = True,
    check_rows: bool = True,
    **model_kwargs,
) -> torch.Tensor:
    """Hidden state ``(B, hidden_size)`` of the last non-padding token after decoder layer ``layer``.

    ``layer`` counts decoder layers from 1 (negative: from the end). For ``layer < L`` the result equals
    ``output_hidden_states[layer]`` at that token; for ``layer = L`` it is the last layer's output *before*
    the final norm; ``layer="final"`` (:data:`FINAL_LAYER`) is transformers' ``hidden_states[L]``, after the
    final norm. With ``truncate`` no layer after ``layer`` runs (the final norm still runs; the LM head is
    skipped). ``check_rows``: as :func:`last_token_index`.
    Extra keyword arguments go to the model (e.g. ``position_ids``).
    """
    index = last_token_index(attention_mask, check_rows=check_rows)
    hidden = _hidden_after_layer(model, layer, truncate, input_ids=input_ids, attention_mask=attention_mask,
                                 **model_kwargs)  # fmt: skip
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index.to(hidden.device)]


def packed_last_index(position_ids: torch.Tensor) -> torch.Tensor:
    """Index of the last token of each sequence in a packed row: ``position_ids`` ``(1, total)`` restart
    at 0 where a sequence starts (the layout of transformers' ``DataCollatorWithFlattening``)."""
    if position_ids.dim() != 2 or position_ids.shape[0] != 1:
        raise ValueError(f"position_ids of a packed batch must be (1, total), got {tuple(position_ids.shape)}")
    starts = (position_ids[0] == 0).nonzero().flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        raise ValueError("position_ids of a packed batch must start at 0 for every sequence")
    total = position_ids.shape[1]
    return torch.cat([starts[1:] - 1, starts.new_tensor([total - 1])])


PACKED_ATTENTION = ("flash_attention_2", "flash_attention_3", "sdpa", "eager", "flex_attention")
"""Attention implementations that keep packed sequences apart: flash-attn's varlen kernels read the
sequence starts from the position ids; for ``sdpa``, ``eager`` and ``flex_attention`` transformers builds a
block-diagonal causal mask from them (when no attention mask is passed)."""


def last_prompt_hidden_packed(
    model: nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    layer: Layer,
    *,
    truncate: bool = True,
    last_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`last_prompt_hidden` for packed rows without padding: ``input_ids`` and ``position_ids``
    ``(R, L)``, sequences delimited by position 0. ``last_index`` ``(B, 2)``: (row, column) of each wanted
    sequence's last token (from :func:`pack_sequences`); without it, ``R`` must be 1 and every sequence's
    last token is returned. Returns ``(B, hidden_size)``.

    The attention implementation must keep the sequences apart (:data:`PACKED_ATTENTION`); no attention mask
    is passed, so that transformers derives the block-diagonal mask from the position ids."""
    impl = getattr(getattr(_unwrap(model), "config", None), "_attn_implementation", None)
    if impl not in PACKED_ATTENTION:
        raise ValueError(
            f"last_prompt_hidden_packed needs an attention implementation that separates packed sequences "
            f"({', '.join(PACKED_ATTENTION)}), got {impl!r}"
        )
    if last_index is None:
        index = packed_last_index(position_ids)
        last_index = torch.stack([torch.zeros_like(index), index], dim=1)
    hidden = _hidden_after_layer(model, layer, truncate, input_ids=input_ids, position_ids=position_ids)
    last_index = last_index.to(hidden.device)
    return hidden[last_index[:, 0], last_index[:, 1]]


def pack_sequences(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, row_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack the non-padding tokens of ``(B, T)`` rows (left or right padding) into ``(R, L)`` rows without
    padding: first-fit decreasing into rows of ``row_length`` tokens (default: twice the longest sequence, so
    that rows fill well while attention, linear in the row length per token, stays a small share; ``row_length
    >= total``: one row). Position ids
    restart at 0 per sequence; a row's unused tail holds a filler sequence (token 0), its own block, whose
    outputs are never read. Returns ``(input_ids, position_ids, last_index (B, 2))``, the last giving the
    (row, column) of each sequence's last token."""
    lengths = attention_mask.sum(dim=1).tolist()
    if min(lengths, default=1) == 0:
        raise ValueError("pack_sequences: every row needs at least one non-padding token")
    capacity = max(row_length or 2 * max(lengths), max(lengths))
    rows: list[list[int]] = []  # sequence indices per packed row
    room: list[int] = []
    for seq in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((r for r, free in enumerate(room) if free >= lengths[seq]), None)
        if slot is None:
            rows.append([])
            room.append(capacity)
            slot = len(rows) - 1
        rows[slot].append(seq)
        room[slot] -= lengths[seq]
    width = capacity if len(rows) > 1 else capacity - room[0]
    keep = attention_mask.bool()
    ids = input_ids.new_zeros(len(rows), width)
    positions = torch.zeros(len(rows), width, dtype=torch.long, device=input_ids.device)
    last = torch.zeros(len(lengths), 2, dtype=torch.long)
    for r, members in enumerate(rows):
        col = 0
        for seq in members:
            n = lengths[seq]
            ids[r, col : col + n] = input_ids[seq][keep[seq]]
            positions[r, col : col + n] = torch.arange(n, device=input_ids.device)
            last[seq] = torch.tensor([r, col + n - 1])
            col += n
        positions[r, col:] = torch.arange(width - col, device=input_ids.device)  # the filler sequence
    return ids, positions, last


def variant_representations(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layer: Layer,
    variant_mask: torch.Tensor | None = None,
    *,
    truncate: bool = True,
    micro_batch: int | None = None,
    packed: bool = False,
    lengths: Sequence[Sequence[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Representations of all variants: ``input_ids``/``attention_mask`` ``(N, m, T)``, ``variant_mask``
    ``(N, m)`` bool (False: missing translation, not run). Returns ``(reps (N, m, hidden), mask (N, m))``;
    missing variants hold zeros. ``micro_batch`` bounds how many variants run through the model at once.

    ``packed``: each micro-batch's variants run packed into rows without padding (:func:`pack_sequences`,
    :func:`last_prompt_hidden_packed`; one row under flash-attn): the model processes about the real tokens
    only, which pays off when the variants' lengths differ (low-resource languages tokenise 2-3x longer).

    ``lengths``: the variants' token counts ``N x m`` as host-side ints (0: missing), as the collator knows them
    (``MLCCollator``'s ``mlc_lengths``); they must agree with ``variant_mask`` (present where > 0). With them the
    padded path reads nothing back from the device (the present variants are counted and checked on the host and
    gathered with ``nonzero_static``); without them it reads the mask and checks the rows (two syncs per call)."""
    if input_ids.dim() != 3 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be (N, m, T), got {tuple(input_ids.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )
    n, m, t = input_ids.shape
    mask = variant_mask if variant_mask is not None else torch.ones(n, m, dtype=torch.bool, device=input_ids.device)
    if tuple(mask.shape) != (n, m):
        raise ValueError(f"variant_mask must be (N, m) = {(n, m)}, got {tuple(mask.shape)}")
    count = _present_count(lengths, n, m)
    if count is None:
        flat = mask.reshape(-1).nonzero().flatten()
        count = len(flat)
    else:
        flat = torch.nonzero_static(mask.reshape(-1), size=count).flatten()
    checked = lengths is not None and not packed
    ids, att = input_ids.reshape(-1, t)[flat], attention_mask.reshape(-1, t)[flat]
    step = micro_batch or max(count, 1)

    def run(chunk_ids: torch.Tensor, chunk_att: torch.Tensor) -> torch.Tensor:
        if packed:
            impl = getattr(getattr(_unwrap(model), "config", None), "_attn_implementation", "")
            one_row = str(impl).startswith("flash")  # flash-attn's varlen path reads one packed row
            ids_p, pos_p, last = pack_sequences(chunk_ids, chunk_att, chunk_ids.numel() if one_row else None)
            return last_prompt_hidden_packed(model, ids_p, pos_p, layer, truncate=truncate, last_index=last)
        return last_prompt_hidden(model, chunk_ids, chunk_att, layer, truncate=truncate, check_rows=not checked)

    parts = [run(ids[s : s + step], att[s : s + step]) for s in range(0, count, step)]
    hidden = torch.cat(parts) if parts else None
    size = hidden.shape[-1] if hidden is not None else _unwrap(model).config.hidden_size
    dtype = hidden.dtype if hidden is not None else next(model.parameters()).dtype
    reps = torch.zeros(n * m, size, dtype=dtype, device=input_ids.device)
    if hidden is not None:
        reps = reps.index_put((flat,), hidden)
    return reps.view(n, m, size), mask


def _present_count(lengths: Sequence[Sequence[int]] | None, n: int, m: int) -> int | None:
    """How many variants are present according to the host-side ``lengths`` (None without them); refuses
    lengths of the wrong layout."""
    if lengths is None:
        return None
    if len(lengths) != n or any(len(row) != m for row in lengths):
        raise ValueError(f"lengths must be N x m = {n} x {m} token counts (host ints), got {len(lengths)} rows")
    return sum(1 for row in lengths for length in row if length > 0)


def _rows(lengths: Sequence[Sequence[int]] | None, start: int, stop: int) -> Sequence[Sequence[int]] | None:
    return lengths[start:stop] if lengths is not None else None


def _host_lengths(mask: torch.Tensor, lengths: Sequence[Sequence[int]] | None) -> list[list[int]]:
    """``lengths`` as lists, or (without them) 1/0 per variant read from ``mask`` (one sync)."""
    if lengths is not None:
        return [list(row) for row in lengths]
    return [[int(p) for p in row] for row in mask.tolist()]


AUTO_CHUNK_SHARE = 0.25
"""``chunk_prompts="auto"`` without a budget: the chunk's activations are about this share of the batch's."""


def activation_bytes_per_prompt(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: Layer
) -> int:
    """Estimated activation memory (bytes) that autograd keeps for one prompt's truncated variant passes:
    per token and decoder layer about ``(34 h + 5 a t) / 2`` elements (the accounting of Korthikanti et al.
    2022 for a transformer layer, in 16-bit units), for the prompt's m variants of t tokens up to layer k."""
    config = _unwrap(model).config
    hidden = int(config.hidden_size)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    element = next(model.parameters()).element_size()
    n, m, t = input_ids.shape
    k = layer_depth(model, layer)
    per_token_layer = (34 * hidden + 5 * heads * t) / 2 * element
    return int(m * t * k * per_token_layer)


def auto_chunk_prompts(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layer: Layer,
    memory_budget: int | None = None,
) -> int:
    """The largest chunk of prompts whose estimated activations (:func:`activation_bytes_per_prompt`) fit in
    ``memory_budget`` bytes; without a budget, a quarter of the batch's (so about 0.25x the activation memory
    of the plain truncated passes, for one extra no-grad pass and four recompute chunks). At least 1."""
    n = input_ids.shape[0]
    per_prompt = max(activation_bytes_per_prompt(model, input_ids, attention_mask, layer), 1)
    budget = memory_budget if memory_budget is not None else AUTO_CHUNK_SHARE * per_prompt * n
    return int(max(1, min(n, budget // per_prompt)))


def _chunk(model, input_ids, attention_mask, layer, chunk_prompts: int | str, memory_budget: int | None) -> int:
    if chunk_prompts == "auto":
        return auto_chunk_prompts(model, input_ids, attention_mask, layer, memory_budget)
    if isinstance(chunk_prompts, bool) or not isinstance(chunk_prompts, int) or chunk_prompts < 1:
        raise ValueError(f"chunk_prompts must be an int >= 1 or 'auto', got {chunk_prompts!r}")
    return chunk_prompts


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replay_rng(state: tuple, device: torch.device):
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def _no_grad_variant_passes(model, input_ids, attention_mask, layer, mask, chunk, lengths) -> tuple[torch.Tensor, list]:
    """The representations of all variants without autograd, chunk by chunk, and each chunk's RNG state;
    ``lengths``: the host-side token counts (see :func:`variant_representations`)."""
    states, parts = [], []
    with torch.no_grad():
        for start in range(0, input_ids.shape[0], chunk):
            stop = start + chunk
            states.append(_rng_state(input_ids.device))
            parts.append(variant_representations(model, input_ids[start:stop], attention_mask[start:stop], layer,
                                                 mask[start:stop], lengths=_rows(lengths, start, stop))[0])  # fmt: skip
    return torch.cat(parts), states


def _backprop_variant_chunks(model, input_ids, attention_mask, layer, mask, chunk, states, grad_reps, lengths,
                             present) -> None:  # fmt: skip
    """Recompute each chunk of variant passes with autograd under its recorded RNG state and backpropagate
    ``grad_reps`` (dloss/dreps, ``(N, m, hidden)``) into the model. A chunk without a present variant (per the
    host-side ``lengths``) is skipped; the missing variants' rows take no part (their representations are
    constants), so the whole chunk's gradient is passed without masking. ``present``: host-side ``N x m`` counts
    (> 0: present), the given ``lengths`` or the mask read back once."""
    for index, start in enumerate(range(0, input_ids.shape[0], chunk)):
        stop = start + chunk
        if not any(length > 0 for row in present[start:stop] for length in row):
            continue
        with torch.enable_grad(), _replay_rng(states[index], input_ids.device):
            chunk_reps, _ = variant_representations(model, input_ids[start:stop], attention_mask[start:stop], layer,
                                                    mask[start:stop], lengths=_rows(lengths, start, stop))  # fmt: skip
            torch.autograd.backward(chunk_reps, grad_reps[start:stop])


def grad_cached_mlc_backward(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layer: Layer,
    variant_mask: torch.Tensor | None = None,
    *,
    chunk_prompts: int | str = "auto",
    memory_budget: int | None = None,
    lengths: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """MLC loss with the representation-gradient cache; accumulates gradients into ``model`` (and into
    whatever ``loss_fn`` closes over, e.g. an ``MLCHead``) and returns the loss, detached.

    1. the truncated variant passes run without autograd, chunk by chunk, recording the RNG state;
    2. ``loss_fn(reps, mask)`` (a scalar, weight included) is backpropagated to the detached
       ``(N, m, hidden)`` representations (and to the loss's own parameters);
    3. each chunk of ``chunk_prompts`` prompts is recomputed with autograd under its recorded RNG state
       (so dropout matches) and its representations' gradient is backpropagated into the model.

    Peak activation memory is that of one chunk's truncated passes. Gradients add up across calls,
    as under gradient accumulation. ``chunk_prompts="auto"``: :func:`auto_chunk_prompts` (``memory_budget``
    in bytes). ``lengths``: host-side token counts as in :func:`variant_representations` (without them the mask
    is read back once per call).
    """
    n, m, _ = input_ids.shape
    device = input_ids.device
    mask = variant_mask if variant_mask is not None else torch.ones(n, m, dtype=torch.bool, device=device)
    _present_count(lengths, n, m)  # the layout check
    present = _host_lengths(mask, lengths)
    chunk_prompts = _chunk(model, input_ids, attention_mask, layer, chunk_prompts, memory_budget)
    reps, states = _no_grad_variant_passes(model, input_ids, attention_mask, layer, mask, chunk_prompts, lengths)
    reps = reps.detach().requires_grad_()
    loss = loss_fn(reps, mask)
    loss.backward()
    # the replays run under fork_rng: the RNG continues as after the first pass
    _backprop_variant_chunks(model, input_ids, attention_mask, layer, mask, chunk_prompts, states, reps.grad,
                             lengths, present)  # fmt: skip
    return loss.detach()


class _GradCachedLoss(torch.autograd.Function):
    """Forward: the MLC loss of representations computed without autograd, and its gradients w.r.t. the
    representations and the loss's parameters. Backward: recompute each chunk of variant passes with
    autograd (replaying its RNG state) and backpropagate ``grad_output * dloss/dreps`` into the model."""

    @staticmethod
    def forward(ctx, runner: dict, *params: torch.Tensor) -> torch.Tensor:
        reps = runner["reps"].detach().requires_grad_()
        with torch.enable_grad():
            loss = runner["loss_fn"](reps, runner["mask"])
            grads = torch.autograd.grad(loss, [reps, *params], allow_unused=True)
        ctx.runner, ctx.grads = runner, grads
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        r, (grad_reps, *grad_params) = ctx.runner, ctx.grads
        _backprop_variant_chunks(r["model"], r["ids"], r["att"], r["layer"], r["mask"], r["chunk"], r["states"],
                                 grad_output * grad_reps, r["lengths"], r["present"])  # fmt: skip
        return (None, *[g * grad_output if g is not None else None for g in grad_params])


def grad_cached_mlc_loss(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    params: list[torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layer: Layer,
    variant_mask: torch.Tensor | None = None,
    *,
    chunk_prompts: int | str = "auto",
    memory_budget: int | None = None,
    lengths: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """The gradient-cached MLC loss as a differentiable scalar: use it like any loss term (``total =
    align + w * grad_cached_mlc_loss(...)``; one ``backward``). ``params`` are the parameters of
    ``loss_fn`` itself (e.g. the ``MLCHead``'s); the model's gradients arrive during backward, when each
    chunk of variant passes is recomputed with autograd. Memory and ``lengths`` as in
    :func:`grad_cached_mlc_backward`."""
    n, m, _ = input_ids.shape
    mask = variant_mask if variant_mask is not None else torch.ones(n, m, dtype=torch.bool, device=input_ids.device)
    _present_count(lengths, n, m)  # the layout check
    present = _host_lengths(mask, lengths)
    chunk_prompts = _chunk(model, input_ids, attention_mask, layer, chunk_prompts, memory_budget)
    reps, states = _no_grad_variant_passes(model, input_ids, attention_mask, layer, mask, chunk_prompts, lengths)
    runner = {
        "model": model, "loss_fn": loss_fn, "reps": reps, "mask": mask, "ids": input_ids,
        "att": attention_mask, "layer": layer, "chunk": chunk_prompts, "states": states, "lengths": lengths,
        "present": present,
    }  # fmt: skip
    return _GradCachedLoss.apply(runner, *params)
