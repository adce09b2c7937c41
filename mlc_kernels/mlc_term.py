"""The MLC term for TRL trainers, ``L = L_align + mlc_weight * L_cons`` (docs/design.md, sec. 4). No TRL import here:
the trainer classes are in :mod:`mlc_kernels.trl_trainers`, the public names in :mod:`mlc_kernels.trainers`.

The variant prompts of each record (the base-language prompt and its translations) are tokenised with the
chat template into a column ``mlc_variant_ids``; a collator wrapping TRL's own keeps all variants of a
prompt in the same micro-batch and pads them; the trainer runs the variant passes truncated at layer k
(:func:`mlc_kernels.hf.variant_representations`), the extractor ``MLCHead`` (registered on the model as
``mlc_head``, so optimizers, checkpoints, DDP and FSDP see it) and the fused linear MLC loss. TRL's own
alignment loss, with its chunked LM head, is left as it is. The MLC loss and consistency metrics go to
the trainer's logs.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checks import check_tau, eligible_count
from .errors import UsageError
from .guards import DEFAULT_UNIFORM_T, DEFAULT_UNIFORM_WEIGHT, GUARDS, check_guard_options, parse_guard
from .head import MLCHead
from .hf import FINAL_LAYER, resolve_layer, variant_representations
from .loss import IMPLEMENTATIONS
from .metrics import consistency_metrics
from .ops.common import OBJECTIVES

logger = logging.getLogger("mlc_kernels.trainers")  # the name users filter on (the public module)

MLC_KEYS = ("mlc_input_ids", "mlc_attention_mask", "mlc_mask", "mlc_lengths", "mlc_base_position", "mlc_base_reason")
VARIANT_COLUMN = "mlc_variant_ids"
MIDDLE_LAYER = "middle"


def _help(text: str, **extra) -> dict:
    """Field metadata for ``HfArgumentParser``/``TrlParser`` (``help``, and ``choices`` where given)."""
    return {"help": text, **extra}


@dataclass
class MLCArguments:
    """Options of the MLC term. The defaults are the MLC authors' (their released LLaMA-Factory code and recipes):
    the relative singular-value softmax at tau 0.2, weight 0.8, the term on every 2nd optimizer step, a 512-wide
    extractor with bias, the state ``hidden_states[L]`` after the final norm (README, "Reproducing the paper").

    ``layer``: ``"final"`` (transformers' ``hidden_states[L]``, after the final norm), a decoder layer counted
    from 1 (negative: from the end; the layer's own output, before any norm), or ``"middle"``/None (the middle
    layer). Every field is validated on construction (finite numbers, ranges, known choices); the layer is
    checked against the model by :meth:`check`. ``base_language`` is variant 0 of every prompt (the base row of
    the signed objectives and of the ``anchor`` guard): ``languages`` is reordered to put it first, the others
    keeping their order."""

    languages: tuple[str, ...] = field(
        default=("en",), metadata=_help("language codes of the variants; the base language must be one of them")
    )
    base_language: str = field(default="en", metadata=_help("the language of the records' own prompt field"))
    weight: float = field(default=0.8, metadata=_help("weight of the MLC term in L = L_align + weight * L_MLC (>= 0)"))
    tau: float = field(default=0.2, metadata=_help("temperature of the softmax over singular values (> 0)"))
    layer: int | str | None = field(
        default=FINAL_LAYER,
        metadata=_help(
            "where the state is read: 'final' (hidden_states[L], after the final norm), a decoder layer k counted "
            "from 1 (negative: from the end), or 'middle'"
        ),
    )
    objective: str = field(
        default="relative_sv_softmax", metadata=_help("consistency objective", choices=list(OBJECTIVES))
    )
    aux_every: int = field(
        default=2,
        metadata=_help(
            "add the MLC term on the optimizer steps whose global_step is a multiple of aux_every (1: every step); the "
            "variant passes are skipped on the others"
        ),
    )
    rep_size: int = field(default=512, metadata=_help("output size of the trainable extractor r = W h + b"))
    impl: str = field(default="auto", metadata=_help("MLC loss implementation", choices=list(IMPLEMENTATIONS)))
    generation_prompt: bool = field(
        default=True, metadata=_help("end each variant with the chat template's assistant header (its last token)")
    )
    grad_cache: bool = field(
        default=False, metadata=_help("gradient-cached MLC term: variant passes recomputed chunk by chunk in backward")
    )
    chunk_prompts: int = field(
        default=0, metadata=_help("prompts per recomputed chunk with grad_cache (0: auto, a quarter of the batch)")
    )
    log_metrics: bool = field(default=True, metadata=_help("log mlc/* consistency metrics"))
    base_from_policy: bool = field(
        default=True,
        metadata=_help(
            "take the base-language variant's state from the policy forward of the chosen sequence (its prompt "
            "prefix; causal attention) instead of a separate variant pass, where the tokens match (else the "
            "separate pass, with the reason logged once); DPO-style batches, not with grad_cache or packed"
        ),
    )
    packed: bool = field(
        default=False,
        metadata=_help(
            "run the variant passes packed without padding (pays where attention runs varlen: flash-attn; with "
            "sdpa on a GPU the block-diagonal mask costs the fused attention kernel); not with grad_cache"
        ),
    )
    guard: str | None = field(
        default=None,
        metadata=_help(
            "collapse guard: None, or components joined by '+' from "
            f"{', '.join(GUARDS)} (e.g. 'center+uniform+anchor'); see mlc_kernels.guards"
        ),
    )
    uniform_weight: float = field(
        default=DEFAULT_UNIFORM_WEIGHT, metadata=_help("weight of the uniformity term of the 'uniform' guard")
    )
    uniform_t: float = field(
        default=DEFAULT_UNIFORM_T, metadata=_help("temperature t of the uniformity term (Wang & Isola: 2)")
    )
    head_bias: bool = field(default=True, metadata=_help("give the extractor a bias (False goes with 'anchor')"))
    head_orthogonal: bool = field(
        default=False, metadata=_help("keep the extractor's weight (semi-)orthogonal (goes with 'anchor')")
    )
    lead_steps: int = field(
        default=0,
        metadata=_help(
            "consistency before alignment: for the first N optimizer steps only the MLC term trains (the alignment "
            "loss is computed and logged, with weight 0); the alignment loss joins after them"
        ),
    )
    collapse_warn_ratio: float = field(
        default=0.1,
        metadata=_help(
            "warn (once) when the between-prompt spread of the consensus directions (mlc/between_prompt_spread) "
            "stays below this share of its value at the first logged training step"
        ),
    )
    collapse_warn_patience: int = field(
        default=3, metadata=_help("consecutive logged training steps below collapse_warn_ratio before warning")
    )

    def __post_init__(self) -> None:
        if isinstance(self.languages, str):
            self.languages = tuple(lang.strip() for lang in self.languages.split(","))
        elif isinstance(self.languages, list):
            self.languages = tuple(self.languages)
        if isinstance(self.layer, str) and self.layer.strip().lstrip("-").isdigit():
            self.layer = int(self.layer)  # from the command line
        elif self.layer == MIDDLE_LAYER:
            self.layer = None
        languages = tuple(self.languages)
        if self.base_language in languages and languages[0] != self.base_language:
            languages = (self.base_language, *(lang for lang in languages if lang != self.base_language))
        self.languages = languages
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for a bad option (everything except the layer's range)."""
        for name, low, strict in (("weight", 0.0, False), ("tau", 0.0, True)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"MLCArguments.{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"MLCArguments.{name} must be a finite number, got {value!r}")
            if value < low or (strict and value == low):
                bound = f"{'>' if strict else '>='} {low:g}"
                raise ValueError(f"MLCArguments.{name} must be a number {bound}, got {value!r}")
        check_tau(self.tau, "MLCArguments.tau")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"MLCArguments.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.impl not in IMPLEMENTATIONS:
            raise ValueError(f"MLCArguments.impl must be one of {IMPLEMENTATIONS}, got {self.impl!r}")
        for name, low in (("rep_size", 1), ("chunk_prompts", 0), ("lead_steps", 0), ("aux_every", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"MLCArguments.{name} must be an int >= {low}, got {value!r}")
        layer = self.layer
        if layer not in (None, FINAL_LAYER) and (isinstance(layer, bool) or not isinstance(layer, int) or layer == 0):
            raise ValueError(
                f"MLCArguments.layer must be {FINAL_LAYER!r}, {MIDDLE_LAYER!r} or a non-zero int, got {self.layer!r}"
            )
        if any(not isinstance(lang, str) or not lang.strip() for lang in self.languages):
            raise ValueError(f"MLCArguments.languages must be non-empty codes, got {list(self.languages)}")
        if self.base_language not in self.languages or len(set(self.languages)) != len(self.languages):
            raise ValueError(
                f"MLCArguments.languages must be distinct and include base_language {self.base_language!r}, "
                f"got {list(self.languages)}"
            )
        if self.packed and self.grad_cache:
            raise ValueError("MLCArguments.packed runs the plain variant passes; it cannot be combined with grad_cache")
        if self.languages[0] != self.base_language:  # the fields may have been changed since construction
            raise ValueError(
                f"MLCArguments.languages must start with base_language {self.base_language!r} (variant 0 is the base "
                f"row of the signed objectives and of the anchor guard), got {list(self.languages)}"
            )
        try:
            check_guard_options(parse_guard(self.guard), "sum", self.uniform_weight, self.uniform_t, None)
        except ValueError as err:
            raise ValueError(f"MLCArguments.guard / uniform options: {err}") from None
        ratio = self.collapse_warn_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"MLCArguments.collapse_warn_ratio must be a number in [0, 1], got {ratio!r}")
        value = self.collapse_warn_patience
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"MLCArguments.collapse_warn_patience must be a positive int, got {value!r}")

    def check(self, model: torch.nn.Module) -> int | str:
        """Raise a clear error for a bad option; returns the resolved layer (1-based, or ``"final"``)."""
        self.validate()  # the fields may have been changed since construction
        from .hf import decoder_layers

        n_layers = len(decoder_layers(model)[0])
        return resolve_layer(model, self.layer if self.layer is not None else max(1, n_layers // 2))


def prompt_text(prompt) -> str:
    """The user text of a prompt given as a string or as a conversation (list of messages)."""
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in reversed(prompt) if m.get("role") == "user")


UNKNOWN_SHARE_MAX = 0.5
"""A prompt or variant whose content tokens are more than this share the tokenizer's unknown token is refused."""


class TokenisationError(UsageError, ValueError):
    """The tokenizer does not read a record's prompt or variant (no content token, or mostly unknown tokens)."""


def _encoder(tokenizer, generation_prompt: bool):
    """``text -> token ids``: the chat-templated user turn (with the assistant header if ``generation_prompt``)."""

    def encode(text: str) -> list[int]:
        messages = [{"role": "user", "content": text}]
        if getattr(tokenizer, "chat_template", None):
            templated = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
            return list(tokenizer(templated, add_special_tokens=False)["input_ids"])
        return list(tokenizer(text)["input_ids"])

    return encode


def _reader(tokenizer, encode):
    """``(ids of a templated text) -> why the tokenizer does not read it, or None``: the content tokens are what
    the text adds to the template of an empty prompt (special tokens other than the unknown one left out)."""
    from collections import Counter

    empty = Counter(encode(""))
    unk = getattr(tokenizer, "unk_token_id", None)
    special = set(getattr(tokenizer, "all_special_ids", ())) - {unk}

    def problem(ids: list[int]) -> str | None:
        added = Counter(ids) - empty
        content = sum(n for i, n in added.items() if i not in special)
        if content == 0:
            return "its tokenisation adds no content token to the chat template"
        unknown = added.get(unk, 0) if unk is not None else 0
        if unknown > UNKNOWN_SHARE_MAX * content:
            return f"{unknown} of its {content} tokens are the unknown token {tokenizer.unk_token!r}"
        return None

    return problem


def _refusal(label: str, lang: str, base: bool, text: str, reason: str) -> TokenisationError:
    field = "prompt" if base else f"variants.{lang}"
    shown = text if len(text) <= 40 else text[:37] + "..."
    return TokenisationError(
        f"{label}: {field} (language {lang}) {shown!r}: the tokenizer does not read it ({reason}); use a model whose "
        f"tokenizer covers {lang}, or data in the languages it reads"
    )


def check_tokenisation(records: list[dict], where: list[str], tokenizer, args: MLCArguments) -> None:
    """Refuse (:class:`TokenisationError`, naming ``where[i]`` and the language) the first prompt or variant of
    ``records`` in ``args.languages`` whose chat-templated tokenisation adds no content token, or whose content
    tokens are more than :data:`UNKNOWN_SHARE_MAX` the unknown token: the MLC term would train on nothing."""
    encode = _encoder(tokenizer, args.generation_prompt)
    problem = _reader(tokenizer, encode)
    for record, label in zip(records, where, strict=True):
        variants = record.get("variants") or {}
        for lang in args.languages:
            base = lang == args.base_language
            text = prompt_text(record["prompt"]) if base else variants.get(lang)
            if isinstance(text, str) and text:
                reason = problem(encode(text))
                if reason is not None:
                    raise _refusal(label, lang, base, text, reason)


def add_variant_ids(dataset, tokenizer, args: MLCArguments):
    """Add the column ``mlc_variant_ids``: for each language of ``args.languages`` the chat-templated
    prompt (base prompt for the base language, else ``variants[lang]``) as token ids; ``[]`` if missing.
    With ``args.generation_prompt`` the template's assistant header ends the prompt (its last token is
    where the response starts); without it the last token is the prompt's own.
    Raises naming the record and the field when a record is malformed, and :class:`TokenisationError` when the
    tokenizer does not read a prompt or variant (see :func:`check_tokenisation`)."""
    encode = _encoder(tokenizer, args.generation_prompt)
    problem = _reader(tokenizer, encode)

    def add(record, index):
        if "prompt" not in record:
            raise ValueError(f"record {index}: missing field 'prompt'")
        variants = record.get("variants")
        if not isinstance(variants, dict):
            raise ValueError(
                f"record {index}: field 'variants' must be a mapping language -> prompt, got {type(variants).__name__}"
            )
        ids = []
        for lang in args.languages:
            base = lang == args.base_language
            text = prompt_text(record["prompt"]) if base else variants.get(lang)
            if text is not None and not isinstance(text, str):
                raise ValueError(f"record {index}: field 'variants.{lang}' must be a string, got {type(text).__name__}")
            tokens = encode(text) if text else []
            reason = problem(tokens) if text else None
            if reason is not None:
                raise _refusal(f"record {index}", lang, base, text, reason)
            ids.append(tokens)
        return {VARIANT_COLUMN: ids}

    return dataset.map(add, with_indices=True)


class MLCCollator:
    """Wraps a TRL collator: pops ``mlc_variant_ids`` from the examples, collates the rest with the inner
    collator, and adds ``mlc_input_ids``/``mlc_attention_mask`` ``(N, m, T)`` (left-padded), ``mlc_mask``
    ``(N, m)`` and ``mlc_lengths``, the variants' token counts as host-side ints (``N`` lists of ``m``; 0: missing),
    which the variant passes read instead of reading the mask back from the device. Every example is one prompt
    with all its variants, so a micro-batch never splits them.

    With ``base_index`` (the base language's position in the variants) and a preference batch whose rows
    ``input_ids``/``completion_mask`` ``(2N, L)`` hold the chosen sequences first (TRL's DPO layout), it also adds
    ``mlc_base_position`` ``(N,)``: where the chosen sequence's prompt ends (its last prompt token), and
    ``mlc_base_reason``: None when every base variant's token ids equal its chosen sequence's prompt prefix, else
    why not (then the base variant runs its own pass)."""

    def __init__(self, inner, pad_token_id: int, base_index: int | None = None) -> None:
        self.inner, self.pad_token_id, self.base_index = inner, pad_token_id, base_index

    def __call__(self, examples: list[dict]) -> dict:
        variants = [ex.pop(VARIANT_COLUMN) for ex in examples]
        batch = self.inner(examples)
        n, m = len(variants), len(variants[0])
        t = max(1, max(len(v) for row in variants for v in row))
        ids = torch.full((n, m, t), self.pad_token_id, dtype=torch.long)
        att = torch.zeros(n, m, t, dtype=torch.long)
        mask = torch.zeros(n, m, dtype=torch.bool)
        for i, row in enumerate(variants):
            for j, tokens in enumerate(row):
                if tokens:
                    ids[i, j, t - len(tokens) :] = torch.tensor(tokens)
                    att[i, j, t - len(tokens) :] = 1
                    mask[i, j] = True
        lengths = [[len(tokens) for tokens in row] for row in variants]
        batch.update(mlc_input_ids=ids, mlc_attention_mask=att, mlc_mask=mask, mlc_lengths=lengths)
        if self.base_index is not None:
            position, reason = _base_positions(batch, [row[self.base_index] for row in variants])
            batch.update(mlc_base_position=position, mlc_base_reason=reason)
        return batch


def _base_positions(batch: dict, base: list[list[int]]) -> tuple[torch.Tensor, str | None]:
    """Where each chosen sequence's prompt ends in ``batch`` (host tensors, before they move), and why the base
    variants cannot be read there (None when they can)."""
    n = len(base)
    position = torch.zeros(n, dtype=torch.long)
    ids, completion, att = (batch.get(k) for k in ("input_ids", "completion_mask", "attention_mask"))
    if not all(isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == 2 * n for t in (ids, completion)):
        return position, "the batch has no (2N, L) input_ids/completion_mask with the chosen sequences first"
    for i, tokens in enumerate(base):
        prompt = int((completion[i].cumsum(0) == 0).sum())  # the leading zeros: the prompt
        if not tokens or prompt == 0 or ids[i, :prompt].tolist() != tokens:
            return position, f"example {i}: the base prompt's token ids differ from the chosen sequence's prompt"
        if att is not None and not bool(att[i, :prompt].all()):
            return position, f"example {i}: the chosen sequence's prompt is padded"
        position[i] = prompt - 1
    return position, None


@torch.no_grad()
def record_variant_states(model, tokenizer, records: list[dict], mlc: MLCArguments, layer: int,
                          micro_batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Hidden states after decoder layer ``layer`` at the last prompt token of each record's prompt in every
    language of ``mlc`` (chat-templated as in training), without gradients, on the model's device:
    ``(reps (N, m, hidden), mask (N, m))``."""
    from .sample_data import to_dataset

    dataset = add_variant_ids(to_dataset(records, "dpo", mlc.languages, mlc.base_language), tokenizer, mlc)
    collate = MLCCollator(lambda examples: {}, tokenizer.pad_token_id or 0)
    batch = collate([{VARIANT_COLUMN: v} for v in dataset[VARIANT_COLUMN]])
    device = next(model.parameters()).device
    batch = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    return variant_representations(model, batch["mlc_input_ids"], batch["mlc_attention_mask"], layer,
                                   batch["mlc_mask"], micro_batch=micro_batch,
                                   lengths=batch["mlc_lengths"])  # fmt: skip


def _host_lengths(batch: dict) -> list[list[int]] | None:
    """The batch's host-side ``mlc_lengths`` when they match its ``mlc_mask`` ``(N, m)`` in layout (a batch split
    or sliced along its tensors leaves them behind: then None, and the mask is read from the device)."""
    lengths, mask = batch.get("mlc_lengths"), batch.get("mlc_mask")
    if not isinstance(lengths, (list, tuple)) or mask is None or len(lengths) != mask.shape[0]:
        return None
    if any(not isinstance(row, (list, tuple)) or len(row) != mask.shape[1] for row in lengths):
        return None
    return [list(row) for row in lengths]


class MLCTrainerMixin:
    """Adds the MLC term to a TRL trainer (put it before the trainer class in the bases)."""

    mlc_args: MLCArguments

    def _mlc_setup(self, mlc_args: MLCArguments) -> None:
        self.mlc_args = mlc_args
        self.mlc_layer = mlc_args.check(self.model)
        base = self.model
        config = getattr(base, "config", None)
        hidden = getattr(config, "hidden_size", None)
        if hidden is None:
            raise ValueError(f"{type(base).__name__}: config.hidden_size is needed for the MLC extractor")
        if not hasattr(base, "mlc_head"):
            param = next(base.parameters())
            # initialised on the CPU (CPU generator, seeded by the trainer): the same extractor on any device
            head = MLCHead(hidden, mlc_args.rep_size, bias=mlc_args.head_bias, orthogonal=mlc_args.head_orthogonal,
                           dtype=param.dtype)  # fmt: skip
            base.add_module("mlc_head", head.to(param.device))
        no_split = getattr(base, "_no_split_modules", None)  # FSDP's transformer wrap policy reads it
        if no_split is not None and "MLCHead" not in no_split:
            base._no_split_modules = {*no_split, "MLCHead"} if isinstance(no_split, set) else [*no_split, "MLCHead"]
        self._mlc_step_count: int | None = None
        self._collapse_streak, self._collapse_warned, self._spread_start = 0, False, None
        pad = getattr(self.processing_class, "pad_token_id", None)
        base_index = mlc_args.languages.index(mlc_args.base_language) if mlc_args.base_from_policy else None
        self.data_collator = MLCCollator(self.data_collator, pad if pad is not None else 0, base_index)
        self._mlc_base_logged = False

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and VARIANT_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, VARIANT_COLUMN]

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Also counts the MLC-eligible prompts (>= 2 present variants) of the optimizer step's micro-batches,
        summed over processes: the denominator of ``reduction="mean"`` over the global batch."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        batches = [batch for batch in batch_samples if "mlc_mask" in batch]
        self._mlc_step_count = None
        if batches:
            lengths = [_host_lengths(batch) for batch in batches]
            if all(part is not None for part in lengths) and self.accelerator.num_processes == 1:  # no sync
                self._mlc_step_count = sum(sum(n > 0 for n in row) >= 2 for part in lengths for row in part)
                return batch_samples, num_items_in_batch
            count = sum((batch["mlc_mask"].sum(dim=1) >= 2).sum() for batch in batches).to(self.accelerator.device)
            self._mlc_step_count = int(self.accelerator.reduce(count, reduction="sum"))
        return batch_samples, num_items_in_batch

    def _mlc_scale(self, model, mask: torch.Tensor, num_items_in_batch) -> float:
        """Factor turning this micro-batch's summed MLC loss into its share of the mean over the global batch.

        Gradients are averaged over the W processes (DDP, FSDP, DeepSpeed) and, unless the alignment loss is
        normalised by ``num_items_in_batch``, the trainer divides each micro-batch loss by the G accumulation
        steps; with C eligible prompts in the step over all processes the factor is ``W * G / C``, so the
        update equals one process's mean over the whole batch. Evaluation and a batch seen outside
        ``get_batch_samples`` use the local mean."""
        count = self._mlc_step_count
        if not model.training or count is None:
            return 1.0 / eligible_count(mask).item()
        return self.accelerator.num_processes * self._trainer_loss_division(num_items_in_batch) / max(count, 1)

    def _trainer_loss_division(self, num_items_in_batch) -> int:
        """What the trainer divides each micro-batch loss by: the accumulation steps, or 1 when the loss is
        already normalised by ``num_items_in_batch`` (the same flags ``Trainer.training_step`` reads)."""
        scaled_for_ga = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled_for_ga is None:
            scaled_for_ga = (
                getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None
            ) or getattr(self, "compute_loss_func", None) is not None
        return 1 if scaled_for_ga else self.current_gradient_accumulation_steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mlc_inputs = {k: inputs.pop(k) for k in MLC_KEYS if k in inputs}
        if mlc_inputs and mlc_inputs["mlc_mask"].shape[1] != len(self.mlc_args.languages):
            raise ValueError(
                f"MLC batch on process {self.accelerator.process_index} of {self.accelerator.num_processes} has "
                f"{mlc_inputs['mlc_mask'].shape[1]} variants per prompt, expected {len(self.mlc_args.languages)} "
                f"(languages {list(self.mlc_args.languages)}): a prompt's variants were split across processes or "
                "micro-batches; keep MLCCollator's (N, m, T) layout, which dispatching and splitting batches "
                "along the first dimension preserves"
            )
        weight = self.mlc_args.weight
        active = self._mlc_term_active(model)
        early = None
        if mlc_inputs and active and self.mlc_args.grad_cache and model.training and self.accelerator.num_processes > 1:
            # Gradient cache under DDP: its nested backward passes would fire the reducer's hooks twice, so the
            # MLC backward runs now, before this step's DDP forward, while the hooks are idle; the gradients stay
            # in .grad and join the all-reduce of the alignment loss's backward.
            scale = self._mlc_scale(model, mlc_inputs["mlc_mask"], num_items_in_batch)
            early = self._mlc_loss(model, mlc_inputs, scale)
            self.accelerator.backward(weight * early / self._trainer_loss_division(num_items_in_batch))
        base_capture = self._base_capture(model, mlc_inputs) if mlc_inputs and active and early is None else None
        try:
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)  # fmt: skip
        finally:
            if base_capture is not None:
                base_capture["handle"].remove()
        if base_capture is not None and "hidden" not in base_capture:
            self._log_base_fallback("the policy forward did not run the captured layer with gradients")
            base_capture = None
        if base_capture is not None:
            n = mlc_inputs["mlc_mask"].shape[0]
            hidden = base_capture["hidden"][:n]
            position = mlc_inputs["mlc_base_position"].to(hidden.device)
            mlc_inputs["mlc_base_state"] = hidden[torch.arange(n, device=hidden.device), position]
        if not mlc_inputs:
            return out
        align = out[0] if return_outputs else out
        if self.mlc_args.log_metrics:  # .item() waits for the device: only when logging
            self._mlc_log(model, {"mlc/align_loss": align.detach().item()})
        if model.training and self.state.global_step < self.mlc_args.lead_steps:
            align = align * 0.0  # keeps the graph (every parameter gets a zero gradient, as DDP expects)
        if not active:
            # no MLC term on this step; under DDP the extractor still joins the graph (zero gradient): its reducer
            # expects a gradient for every parameter
            loss = align + (self._extractor_touch(model) if self.accelerator.num_processes > 1 else 0.0)
        elif early is not None:
            # DDP then reduces the gradient the extractor already holds
            loss = align + weight * early.detach() + self._extractor_touch(model)
        else:
            scale = self._mlc_scale(model, mlc_inputs["mlc_mask"], num_items_in_batch)
            loss = align + weight * self._mlc_loss(model, mlc_inputs, scale)
        return (loss, out[1]) if return_outputs else loss

    def _base_capture(self, model, mlc_inputs: dict) -> dict | None:
        """A forward hook on the policy's layer-k module that keeps its first output computed with gradients (the
        policy forward of chosen and rejected sequences; the reference model runs without), or None (with the
        reason logged once) when the base variant needs its own pass."""
        a = self.mlc_args
        if "mlc_base_position" not in mlc_inputs:
            return None  # base_from_policy off, or a batch from another collator
        reason = mlc_inputs.get("mlc_base_reason")
        if reason is None and (a.grad_cache or a.packed):
            reason = "grad_cache and packed run their own variant passes"
        if not model.training:  # evaluation: the separate pass (no gradient to take the state from)
            return None
        if reason is None and _host_lengths(mlc_inputs) is None:
            reason = "the batch's host-side lengths do not match its mask (split batches)"
        if reason is not None:
            self._log_base_fallback(reason)
            return None
        from .hf import capture_module

        captured: dict = {}

        def hook(module, args, output):
            if torch.is_grad_enabled() and "hidden" not in captured:
                captured["hidden"] = output[0] if isinstance(output, tuple) else output

        target, _ = capture_module(self.accelerator.unwrap_model(model), self.mlc_layer)
        captured["handle"] = target.register_forward_hook(hook)
        return captured

    def _log_base_fallback(self, reason: str) -> None:
        """Say once why the base variant runs its own pass."""
        if not self._mlc_base_logged:
            self._mlc_base_logged = True
            logger.warning("mlc: the base-language variant runs its own pass (base_from_policy): %s", reason)

    def _mlc_term_active(self, model) -> bool:
        """Whether this micro-batch gets the MLC term: in training on the optimizer steps whose ``global_step`` (the
        steps completed so far, shared by the micro-batches of one accumulated step, restored on resume) is a
        multiple of ``aux_every`` (the authors' ``global_step % aux_every == 0``); always in evaluation."""
        return not model.training or self.state.global_step % self.mlc_args.aux_every == 0

    def _extractor_touch(self, model) -> torch.Tensor:
        """Zero that puts every extractor parameter in the graph: an empty slice of each, summed."""
        return sum(p.view(-1)[:0].sum() for p in self.accelerator.unwrap_model(model).mlc_head.parameters())

    def _variant_runner(self, model):
        """The module the variant passes go through: the model under DDP/DeepSpeed wrappers (their
        gradient hooks sit on the parameters), the FSDP1 root wrapper itself (it gathers the root's
        parameters), and the model as is under FSDP2 (sharded in place)."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        return model if isinstance(model, FullyShardedDataParallel) else self.accelerator.unwrap_model(model)

    def _mlc_loss(self, model, inputs: dict, scale) -> torch.Tensor:
        """This micro-batch's MLC term: the summed per-prompt loss times ``scale`` (see :meth:`_mlc_scale`)."""
        runner = self._variant_runner(model)
        head = self.accelerator.unwrap_model(model).mlc_head  # the registered child: an FSDP unit if sharded
        a = self.mlc_args
        ids, att, present = inputs["mlc_input_ids"], inputs["mlc_attention_mask"], inputs["mlc_mask"]
        lengths = _host_lengths(inputs)

        options = {"tau": a.tau, "objective": a.objective, "reduction": "sum", "impl": a.impl}
        if a.guard is not None:
            options.update(guard=a.guard, uniform_weight=a.uniform_weight, uniform_t=a.uniform_t)

        def loss_of(reps, mask):
            return head(reps, mask, loss=True, **options) * scale

        if a.grad_cache and model.training:
            from .hf import grad_cached_mlc_loss

            params = [p for p in head.parameters() if p.requires_grad]
            loss = grad_cached_mlc_loss(runner, loss_of, params, ids, att, self.mlc_layer, present,
                                        chunk_prompts=a.chunk_prompts or "auto", lengths=lengths)  # fmt: skip
            if a.log_metrics:  # one more no-grad pass, for the metrics only
                with torch.no_grad():
                    reps, mask = variant_representations(runner, ids, att, self.mlc_layer, present, lengths=lengths)
                self._log_consistency(model, head, reps, mask, loss.detach() / scale)
            return loss
        base = inputs.get("mlc_base_state")
        if base is not None:  # the base variant's state from the policy forward: the other variants' passes only
            j = a.languages.index(a.base_language)
            column = torch.arange(present.shape[1], device=present.device) == j
            others = [[0 if col == j else length for col, length in enumerate(row)] for row in lengths]
            reps, _ = variant_representations(runner, ids, att, self.mlc_layer, present & ~column, lengths=others)
            reps = torch.where(column[None, :, None], base[:, None, :].to(reps.dtype), reps)
            mask = present
        else:
            reps, mask = variant_representations(runner, ids, att, self.mlc_layer, present, packed=a.packed,
                                                 lengths=lengths)  # fmt: skip
        loss = loss_of(reps, mask)
        self._log_consistency(model, head, reps, mask, loss.detach() / scale)
        return loss

    def _log_consistency(self, model, head, reps, mask, summed_loss: torch.Tensor) -> None:
        """This process's micro-batch: mean MLC loss, s1 share, between-prompt and per-language cosines, and the
        collapse diagnostics, of the representations the loss sees (centred/whitened under those guards)."""
        if not self.mlc_args.log_metrics:
            return
        from .guards import guard_representations

        with torch.no_grad():
            seen = guard_representations(head(reps.detach()), mask, parse_guard(self.mlc_args.guard))
            stats = consistency_metrics(seen, mask)
        values = {"mlc/loss": summed_loss.item() / eligible_count(mask).item()}
        valid = stats["valid"]
        if bool(valid.any()):
            values["mlc/s1_share"] = stats["s1_share"][valid].mean().item()
            values["mlc/sign_flip_share"] = float(stats["sign_flip_share"])
            if int(valid.sum()) >= 2:  # the between-prompt diagnostics need two prompts (else undefined: NaN)
                values["mlc/between_prompt_cosine"] = float(stats["between_prompt_cosine"])
                for key in ("signed_between_prompt_cosine", "consensus_effective_rank", "between_prompt_spread"):
                    values[f"mlc/{key}"] = float(stats[key])
                if model.training:
                    self._watch_collapse(values["mlc/between_prompt_spread"])
            for j, lang in enumerate(self.mlc_args.languages):
                cos = stats["cosine_to_consensus"][:, j]
                cos = cos[~torch.isnan(cos)]
                if cos.numel():
                    values[f"mlc/cos_{lang}"] = cos.mean().item()
        self._mlc_log(model, values)

    def _watch_collapse(self, spread: float) -> None:
        """Warn once through ``logging`` when the between-prompt spread stays below ``collapse_warn_ratio`` times
        its value at the first logged training step for ``collapse_warn_patience`` consecutive logged steps (NaN, a
        single prompt, resets the count). Relative, so raw anisotropic states (a small spread from the start, with a
        mean |cosine| between prompts near 1 under plain alignment) do not trigger it."""
        a = self.mlc_args
        start = getattr(self, "_spread_start", None)
        if start is None:
            if spread == spread:  # not NaN
                self._spread_start = spread
            return
        below = spread < a.collapse_warn_ratio * start  # False for NaN
        self._collapse_streak = self._collapse_streak + 1 if below else 0
        if self._collapse_streak >= a.collapse_warn_patience and not self._collapse_warned:
            self._collapse_warned = True
            logger.warning(
                "mlc: possible collapse: mlc/between_prompt_spread = %.3g, below %.2g x its first value %.3g for %d "
                "consecutive logged steps (every prompt's representation is moving to one direction, a trivial "
                "minimum of the MLC loss). Consider MLCArguments.guard (e.g. 'center', 'center+uniform', "
                "'center+anchor' with head_bias=False and head_orthogonal=True, 'whiten') or a signed objective "
                "('signed_sv_softmax', 'anchor_cos', 'signed_pairwise').",
                spread, a.collapse_warn_ratio, start, self._collapse_streak,
            )  # fmt: skip

    def _mlc_log(self, model, values: dict[str, float]) -> None:
        """Into the trainer's own metric store: ``_metrics`` (TRL trainers) or ``store_metrics`` (experimental)."""
        if not self.mlc_args.log_metrics:
            return
        mode = "train" if model.training else "eval"
        if hasattr(self, "_metrics"):
            for key, value in values.items():
                self._metrics[mode][key].append(value)
        elif hasattr(self, "store_metrics"):
            self.store_metrics(values, train_eval=mode)

    def _save(self, output_dir: str | None = None, state_dict=None):
        """The checkpoint, plus the extractor alone in ``<out>/mlc_head`` (written by the saving process; under
        FSDP/DeepSpeed from the full state dict the engine gathered for the checkpoint), with the settings it was
        trained with in its config (:meth:`_mlc_settings`)."""
        prefix = "mlc_head."  # taken first: saving may drop keys from state_dict
        gathered = {k.removeprefix(prefix): v for k, v in (state_dict or {}).items() if k.startswith(prefix)}
        super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:
            return
        out = Path(output_dir if output_dir is not None else self.args.output_dir)
        head = self.accelerator.unwrap_model(self.model).mlc_head
        head.save_pretrained(out / "mlc_head", state_dict=gathered or None, settings=self._mlc_settings())

    def _mlc_settings(self) -> dict:
        """What the extractor was trained with, saved in its config (``mlc eval`` reads them): the resolved layer
        (1-based, or ``"final"``), objective, tau, guard, base language and languages."""
        a = self.mlc_args
        return {"layer": self.mlc_layer, "objective": a.objective, "tau": a.tau, "guard": a.guard,
                "base_language": a.base_language, "languages": list(a.languages)}  # fmt: skip


def launched_with(engine: str) -> bool:
    """Whether ``accelerate launch`` set up ``engine`` ("DEEPSPEED", "FSDP") for this process."""
    return os.environ.get(f"ACCELERATE_USE_{engine}", "").lower() in ("1", "true")


def check_distributed_setup(args, mlc_args: MLCArguments) -> None:
    """Refuse, with the reason, the setups where MLC training would be wrong or fail late; turn off DDP's
    unused-parameter search (unset by default in transformers, which then enables it).

    The variant passes run outside DDP's forward, so DDP's search, which follows only the alignment forward's
    outputs, would mark the extractor ready before its gradient arrives ("marked ready twice")."""
    if args is None:
        return
    if getattr(args, "ddp_find_unused_parameters", None) is True:
        raise ValueError(
            "ddp_find_unused_parameters=True cannot be used with MLC: the variant passes and the extractor run "
            "outside DDP's forward, and the unused-parameter search would mark them ready before their gradients "
            "arrive; leave it unset (the MLC trainers set False: every parameter gets a gradient every step)"
        )
    args.ddp_find_unused_parameters = False
    wants_deepspeed = bool(getattr(args, "deepspeed", None)) or launched_with("DEEPSPEED")
    wants_fsdp = bool(getattr(args, "fsdp", None)) or launched_with("FSDP")
    if mlc_args.grad_cache and getattr(args, "world_size", 1) > 1 and (wants_fsdp or wants_deepspeed):
        raise ValueError(
            f"MLCArguments.grad_cache runs extra backward passes, which the {'FSDP' if wants_fsdp else 'DeepSpeed'} "
            f"gradient hooks do not support; use grad_cache=False with {args.world_size} processes under it "
            "(activation checkpointing bounds memory instead), or DDP, where the gradient cache is supported"
        )


class NonFiniteTrainingError(FloatingPointError):
    """Training stopped because the loss or the gradient norm turned NaN/inf (no checkpoint was written)."""


def _nonfinite_stop_callback():
    """A ``transformers.TrainerCallback`` (built lazily: transformers is optional for this module) that stops
    training at the first logged non-finite ``loss``, ``grad_norm`` or ``mlc/*`` value, or the first step after
    which a weight is non-finite, and cancels the checkpoint of that step, so NaN weights are never saved."""
    from transformers import TrainerCallback

    class NonFiniteStopCallback(TrainerCallback):
        def __init__(self) -> None:
            self.tripped: str | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            for key, value in (logs or {}).items():
                if (key in ("loss", "grad_norm") or key.startswith("mlc/")) and isinstance(value, (int, float)):
                    if not math.isfinite(value) and self.tripped is None:
                        self.tripped = f"{key} = {value} at step {state.global_step}"
            if self.tripped is not None:
                control.should_training_stop = True
                control.should_save = False
            return control

        def on_step_end(self, args, state, control, model=None, **kwargs):
            # after the optimizer step: a finite gradient with a huge step can still leave non-finite weights;
            # one isfinite per parameter (small next to the optimizer's own passes), checked before any save
            if self.tripped is None and model is not None:
                params = [p for p in model.parameters() if p.numel()]
                if params and not bool(torch.stack([torch.isfinite(p.detach()).all() for p in params]).all()):
                    self.tripped = f"a weight turned non-finite at step {state.global_step}"
            if self.tripped is not None:
                control.should_training_stop = True
                control.should_save = False
            return control

    return NonFiniteStopCallback()


def attach_nonfinite_stop(trainer) -> None:
    """Add the non-finite stop callback to ``trainer`` (logging every step so the check sees every step)."""
    callback = _nonfinite_stop_callback()
    trainer.add_callback(callback)
    trainer._mlc_nonfinite = callback


def raise_if_nonfinite(trainer) -> None:
    """Raise :class:`NonFiniteTrainingError` if ``trainer``'s run was stopped by the non-finite check."""
    callback = getattr(trainer, "_mlc_nonfinite", None)
    if callback is not None and callback.tripped is not None:
        raise NonFiniteTrainingError(
            f"training stopped: {callback.tripped} (non-finite); no checkpoint was written from these weights; "
            "lower the learning rate or the MLC weight, or check the data"
        )
