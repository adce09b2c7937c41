"""One alignment run in a synthetic world and the measurements taken around it.

:func:`align_model` copies a pretrained model and aligns it in the base language with the TRL trainer of the
algorithm (:func:`mlc_kernels.trainers.trl_classes`); the conditions without MLC use the same trainer with
MLC weight 0 (identical data, order and optimizer). The MLC variants are the training prompts' translations
into every derived language; no target-language response is ever trained on. :func:`consistency`: the
layer-k consistency of held-out prompts.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from dataclasses import dataclass

import torch

from ..head import MLCHead
from ..metrics import consistency_metrics
from ..sample_data import to_dataset
from ..trainers import MLCArguments, record_variant_states, trl_classes
from .world import World

EXTRACTORS = ("linear", "linear_nobias", "identity", "centred")
"""``linear``: the paper's trainable ``r = W h + b`` (the trainers' default); ``linear_nobias``: ``r = W h``;
``identity``: ``r = h``, frozen (the MLC loss then acts on the hidden states themselves); ``centred``:
``r = h - mean``, frozen, the mean of the pretrained model's layer-k states over the training prompts in all
languages (removes the component every prompt shares through the common ``<|assistant|>`` token)."""


@dataclass(frozen=True)
class AlignConfig:
    """Alignment and evaluation settings. ``mlc_layer`` counts decoder layers from 1 (or ``"final"``: the last
    layer's output after the final norm, the MLC authors' state); ``mlc_aux_every``: the MLC term on every k-th
    optimizer step (the authors' 2; 1 in v1 and v2)."""

    dpo_steps: int = 120
    sft_steps: int = 60
    batch_size: int = 16
    learning_rate: float = 1e-3
    beta: float = 0.1
    train_prompts: int = 512
    mlc_weight: float = 1.0
    mlc_tau: float = 1.0
    mlc_layer: int | str = 2
    mlc_rep_size: int = 64
    mlc_extractor: str = "linear"
    mlc_generation_prompt: bool = True
    mlc_objective: str = "sv_softmax"
    mlc_guard: str = ""
    mlc_lead_steps: int = 0
    mlc_aux_every: int = 1
    eval_per_kind: int = 64
    consistency_prompts: int = 64
    precision: str = "bf16"


PRECISIONS = ("bf16", "fp32")
"""``AlignConfig.precision``: ``bf16``: the TRL configs' default (bf16 autocast, also on CPU), which the recorded
transfer runs used (on CPU its results depend on the processor's bf16 instructions); ``fp32``: fp32 throughout (the
demo's: its table is the same with and without them)."""


def mlc_arguments(world: World, align: AlignConfig, weight: float) -> MLCArguments:
    """The trainers' MLC options: every language of ``world`` (base first), the ``align`` settings, ``weight``
    (the guard is passed only when set: ``MLCArguments(guard=...)``). Every option the recorded runs depend on is
    named here (objective, tau, layer, extractor size, the term on every step, the base variant in its own pass as
    when they were recorded), not taken from the defaults."""
    guard = {"guard": align.mlc_guard} if align.mlc_guard else {}
    return MLCArguments(
        languages=(world.config.base, *world.config.derived), base_language=world.config.base, weight=weight,
        tau=align.mlc_tau, layer=align.mlc_layer, rep_size=align.mlc_rep_size, objective=align.mlc_objective,
        generation_prompt=align.mlc_generation_prompt, lead_steps=align.mlc_lead_steps,
        aux_every=align.mlc_aux_every, base_from_policy=False, **guard,
    )  # fmt: skip


def attach_extractor(model, align: AlignConfig, centre: torch.Tensor | None = None) -> None:
    """Register ``model.mlc_head`` for the non-default extractors (the trainers keep an existing one);
    ``centre`` ``(hidden,)``: the mean the ``centred`` extractor subtracts."""
    if align.mlc_extractor not in EXTRACTORS:
        raise ValueError(f"mlc_extractor must be one of {EXTRACTORS}, got {align.mlc_extractor!r}")
    if align.mlc_extractor == "linear":
        return
    hidden = model.config.hidden_size
    if align.mlc_extractor == "linear_nobias":
        model.add_module("mlc_head", MLCHead(hidden, align.mlc_rep_size, bias=False))
        return
    centred = align.mlc_extractor == "centred"
    head = MLCHead(hidden, hidden, bias=centred)
    with torch.no_grad():
        head.weight.copy_(torch.eye(hidden))
        if centred:
            head.bias.copy_(-centre)
    head.requires_grad_(False)
    model.add_module("mlc_head", head)


def align_model(model, tokenizer, world: World, condition: str, align: AlignConfig, seed: int,
                callbacks: list | None = None):  # fmt: skip
    """Align a copy of ``model`` under ``condition`` (one of :data:`CONDITIONS`); returns ``(model, logs)``.
    Nothing is saved (the trainer's output folder is a temporary one). ``callbacks``: extra trainer callbacks."""
    import transformers

    if align.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {align.precision!r}")
    algorithm, with_mlc = condition.split("+")[0], condition.endswith("+mlc")
    trainer_cls, config_cls = trl_classes(algorithm)
    mlc = mlc_arguments(world, align, align.mlc_weight if with_mlc else 0.0)
    steps = align.dpo_steps if algorithm == "dpo" else align.sft_steps
    steps += align.mlc_lead_steps if with_mlc else 0  # MLC alone first, then the usual alignment steps
    records = world.alignment_records()[: align.train_prompts]
    out = tempfile.mkdtemp(prefix="mlc_transfer_")
    options = dict(
        output_dir=out, per_device_train_batch_size=align.batch_size, max_steps=steps,
        learning_rate=align.learning_rate, logging_steps=max(1, steps // 6), report_to=[], save_strategy="no",
        seed=seed, use_cpu=True, disable_tqdm=True, max_length=256, gradient_checkpointing=False,
    )  # fmt: skip
    if algorithm == "dpo":
        options["beta"] = align.beta
    if align.precision == "fp32":
        options.update(bf16=False, fp16=False)
    policy = copy.deepcopy(model)
    if with_mlc:
        centre = None
        if align.mlc_extractor == "centred":
            reps, mask = layer_states(model, tokenizer, world, align, records[:64])
            centre = reps.float()[mask].mean(dim=0)
        attach_extractor(policy, align, centre)
    extra = {"ref_model": copy.deepcopy(model)} if algorithm == "dpo" else {}
    transformers.logging.set_verbosity_error()
    trainer = trainer_cls(
        model=policy, args=config_cls(**options), processing_class=tokenizer, mlc_args=mlc,
        train_dataset=to_dataset(records, algorithm, mlc.languages, mlc.base_language), **extra,
    )  # fmt: skip
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    for callback in callbacks or []:
        trainer.add_callback(callback)
    trainer.train()
    shutil.rmtree(out, ignore_errors=True)
    policy.eval()
    return policy, trainer.state.log_history


def layer_states(model, tokenizer, world: World, align: AlignConfig, records: list[dict]):
    """Layer-k states of ``records``' prompts in every language: ``(reps (N, m, hidden), mask (N, m))``."""
    return record_variant_states(model, tokenizer, records, mlc_arguments(world, align, 0.0), align.mlc_layer)


@torch.no_grad()
def consistency(model, tokenizer, world: World, align: AlignConfig) -> dict:
    """Layer-k consistency of held-out prompts, on hidden states (no extractor) *centred* by their mean over
    all prompts and languages (every prompt ends with the same ``<|assistant|>`` token, which gives all raw
    states a large common component): per-language cosine to the prompt's consensus direction, s1 share and
    between-prompt cosine (near 1 = collapse); ``between_raw``: the between-prompt cosine without centring."""
    mlc = mlc_arguments(world, align, 0.0)
    reps, mask = layer_states(model, tokenizer, world, align, world.heldout_records()[: align.consistency_prompts])
    raw = consistency_metrics(reps.float(), mask)
    centred = reps.float() - reps.float()[mask].mean(dim=0)
    stats = consistency_metrics(centred, mask)
    cos = stats["cosine_to_consensus"]
    return {
        "cosine_to_consensus": {lang: cos[:, j].nanmean().item() for j, lang in enumerate(mlc.languages)},
        "s1_share": stats["s1_share"].nanmean().item(),
        "between_prompt_cosine": float(stats["between_prompt_cosine"]),
        "between_raw": float(raw["between_prompt_cosine"]),
        **{
            key: float(stats[key])
            for key in ("signed_between_prompt_cosine", "consensus_effective_rank", "sign_flip_share")
            if key in stats
        },  # fmt: skip
    }
