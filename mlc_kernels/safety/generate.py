"""Greedy answers to chat-templated prompts, batched: :func:`generate_answers`.

Each prompt is one user turn through the tokenizer's chat template with the generation prompt; the prompts are
sorted by token length (longest first, so an out-of-memory error comes at the first batch and padding stays
small), left-padded, and decoded greedily (``do_sample=False``, one beam) under ``torch.inference_mode`` until
every row has produced an end-of-sequence token or ``max_new_tokens`` tokens. Answers are decoded without the
special tokens and returned in the prompts' order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import UsageError

DEFAULT_MAX_NEW_TOKENS = 64
"""The judge needs the opening of the answer (does it refuse?), not the whole answer."""

DEFAULT_BATCH_SIZE = 16


def _is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def prompt_token_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt as one user turn followed by the assistant header (the chat template)."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts]  # fmt: skip
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def stop_ids(model, tokenizer) -> list[int]:
    """The end-of-sequence ids: the model's generation config's (an int or a list) and the tokenizer's."""
    ids: list[int] = []
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        ids += [value] if isinstance(value, int) else list(value or [])
    return list(dict.fromkeys(ids))


def greedy_batch(model, ids: list[list[int]], pad: int, stops: list[int], config) -> list[list[int]]:
    """The new token ids of one left-padded batch (``config``: the greedy ``GenerationConfig``), each cut before
    its first stop id."""
    width = max(len(row) for row in ids)
    device = next(model.parameters()).device
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    attention = torch.zeros(len(ids), width, dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention[i, width - len(row) :] = 1
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=config)
    new = []
    for row in out[:, width:].tolist():
        cut = next((j for j, tok in enumerate(row) if tok in stops), len(row))
        new.append(row[:cut])
    return new


def generate_answers(model, tokenizer, prompts: list[str], *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                     batch_size: int = DEFAULT_BATCH_SIZE, progress: Callable[[int], None] | None = None,
                     on_batch: Callable[[list[int], list[str]], None] | None = None) -> list[str]:  # fmt: skip
    """Greedy answers (special tokens stripped, whitespace trimmed) to ``prompts``, in their order.

    ``batch_size``: prompts per ``generate`` call; halved (and kept halved) on an out-of-memory error, the batch
    retried, no prompt dropped; at batch 1 the error is raised. ``progress(n)`` is called with the number of
    prompts each finished batch answered; ``on_batch(indices, answers)`` with the batch's positions in ``prompts``
    and their answers (to write them as they come)."""
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = prompt_token_ids(tokenizer, prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an end-of-sequence token to pad with")
    stops = stop_ids(model, tokenizer)
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=stops or None,
                              pad_token_id=pad)  # fmt: skip
    order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))
    answers: list[str | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    start, size = 0, batch_size
    try:
        with torch.inference_mode():
            while start < len(order):
                chunk = order[start : start + size]
                try:
                    new = greedy_batch(model, [ids[i] for i in chunk], pad, stops, config)
                except (torch.OutOfMemoryError, RuntimeError) as err:
                    if not _is_out_of_memory(err) or size == 1:
                        raise
                    size = max(1, size // 2)
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    continue
                texts = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
                for i, text in zip(chunk, texts, strict=True):
                    answers[i] = text
                start += len(chunk)
                if on_batch is not None:
                    on_batch(chunk, texts)
                if progress is not None:
                    progress(len(chunk))
    finally:
        model.train(was_training)
    return [a if a is not None else "" for a in answers]


def load_generator(name: str, option: str = "--model"):
    """``(model, tokenizer)`` of a model folder, a hub id or a LoRA run folder of ``mlc train --use_peft`` (its
    adapters applied with peft, not merged); every failure a :class:`UsageError` naming ``option``. The tokenizer
    is loaded first and checked (:func:`check_generator`) by the caller before this loads the model."""
    model_name, local, run, tokenizer = resolve_generator(name, option)
    return load_resolved(model_name, local, run, option), tokenizer


def resolve_generator(name: str, option: str = "--model"):
    """``(model name, local, LoRA run folder or None, tokenizer)``: everything but the model's weights (cheap:
    checked before any model loads)."""
    from pathlib import Path

    from ..cli.eval import _adapter_base
    from ..cli.options import load_tokenizer, resolve_model_path

    run = Path(name).expanduser()
    base = _adapter_base(run)
    where = f"{option} {run}: adapter_config.json's base_model_name_or_path" if base is not None else option
    model_name, local = resolve_model_path(base if base is not None else name, where)
    own_tokenizer = base is not None and (run / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(str(run), True, option) if own_tokenizer else load_tokenizer(model_name, local, option)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise UsageError(f"{option} {name}: the tokenizer has neither a pad nor an end-of-sequence token; batched "
                         "generation pads with one of them")  # fmt: skip
    return model_name, local, (run if base is not None else None), tokenizer


def check_readable(rows, tokenizer, model: str, option: str = "--model") -> None:
    """Refuse (one line naming the model, the row's file:line and language) the first prompt of ``rows``
    (:class:`~mlc_kernels.safety.inputs.PromptRow`) whose chat-templated tokenisation adds no content token or is
    mostly the unknown token: the answer would be to nothing (``mlc train``/``mlc eval``'s rule)."""
    from ..mlc_term import TokenisationError, _encoder, _reader

    encode = _encoder(tokenizer, True)
    problem = _reader(tokenizer, encode)
    for row in rows:
        reason = problem(encode(row.prompt))
        if reason is not None:
            shown = row.prompt if len(row.prompt) <= 40 else row.prompt[:37] + "..."
            raise TokenisationError(
                f"{option} {model}: {row.where}: the prompt in {row.language} {shown!r}: the tokenizer does not read "
                f"it ({reason}); use a model whose tokenizer covers {row.language}, or --languages it reads"
            )


def load_resolved(model_name: str, local: bool, run, option: str = "--model"):
    """The model of :func:`resolve_generator`'s answer (with the run's adapters when ``run`` is a LoRA run)."""
    from ..cli.eval import _with_adapters
    from ..cli.options import load_model

    model = load_model(model_name, local, option, ignore_extractor=True)
    if run is not None:
        model = _with_adapters(model, run)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval()
