"""Align in the base language only (DPO, SFT; with and without MLC), evaluate in every language.

For each seed and condition the pretrained model is copied and aligned with the TRL trainer of the
algorithm (:func:`mlc_kernels.trainers.trl_classes`); the conditions without MLC use the same trainer with
MLC weight 0 (identical data, order and optimizer). The MLC variants are the training prompts' translations
into every derived language; no target-language response is ever trained on. Then per language: safety and
helpfulness on held-out prompts (:mod:`.evaluation`) and the layer-k consistency of held-out prompts.
"""

from __future__ import annotations

import copy
import csv
import shutil
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..trainers import MLCArguments, record_variant_states
from .evaluation import behaviour
from .pretrain import ModelConfig, pretrained
from .world import World, WorldConfig

CONDITIONS = ("dpo", "dpo+mlc", "sft", "sft+mlc")
EXTRACTORS = ("linear", "linear_nobias", "identity", "centred")
"""``linear``: the paper's trainable ``r = W h + b`` (the trainers' default); ``linear_nobias``: ``r = W h``;
``identity``: ``r = h``, frozen (the MLC loss then acts on the hidden states themselves); ``centred``:
``r = h - mean``, frozen, the mean of the pretrained model's layer-k states over the training prompts in all
languages (removes the component every prompt shares through the common ``<|assistant|>`` token)."""
BASE_ROW = "base model"


@dataclass(frozen=True)
class AlignConfig:
    """Alignment and evaluation settings. ``mlc_layer`` counts decoder layers from 1."""

    dpo_steps: int = 120
    sft_steps: int = 60
    batch_size: int = 16
    learning_rate: float = 1e-3
    beta: float = 0.1
    train_prompts: int = 512
    mlc_weight: float = 1.0
    mlc_tau: float = 1.0
    mlc_layer: int = 2
    mlc_rep_size: int = 64
    mlc_extractor: str = "linear"
    mlc_generation_prompt: bool = True
    mlc_objective: str = "sv_softmax"
    mlc_guard: str = ""
    mlc_lead_steps: int = 0
    eval_per_kind: int = 64
    consistency_prompts: int = 64


@dataclass(frozen=True)
class TransferConfig:
    """One experiment: the world, the model and its pretraining, the alignment, the seeds and conditions."""

    world: WorldConfig = WorldConfig()
    model: ModelConfig = ModelConfig()
    align: AlignConfig = AlignConfig()
    seeds: tuple[int, ...] = (0, 1, 2)
    conditions: tuple[str, ...] = CONDITIONS


QUICK = TransferConfig()
FULL = TransferConfig(align=replace(AlignConfig(), eval_per_kind=256), seeds=(0, 1, 2, 3, 4))


def mlc_arguments(world: World, align: AlignConfig, weight: float) -> MLCArguments:
    """The trainers' MLC options: every language of ``world`` (base first), the ``align`` settings, ``weight``
    (the guard is passed only when set: ``MLCArguments(guard=...)``). Every option the recorded runs depend on is
    named here (objective, tau, layer, extractor size, the term on every step), not taken from the defaults."""
    guard = {"guard": align.mlc_guard} if align.mlc_guard else {}
    return MLCArguments(
        languages=(world.config.base, *world.config.derived), base_language=world.config.base, weight=weight,
        tau=align.mlc_tau, layer=align.mlc_layer, rep_size=align.mlc_rep_size, objective=align.mlc_objective,
        generation_prompt=align.mlc_generation_prompt, lead_steps=align.mlc_lead_steps, aux_every=1, **guard,
    )  # fmt: skip


def attach_extractor(model, align: AlignConfig, centre: torch.Tensor | None = None) -> None:
    """Register ``model.mlc_head`` for the non-default extractors (the trainers keep an existing one);
    ``centre`` ``(hidden,)``: the mean the ``centred`` extractor subtracts."""
    from ..head import MLCHead

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
    import tempfile

    import transformers

    from ..sample_data import to_dataset
    from ..trainers import trl_classes

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
    from ..metrics import consistency_metrics

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


def run_transfer(config: TransferConfig, cache_dir: Path | None, log=print) -> dict:
    """Pretrain (or load the cache), evaluate the base model, align and evaluate every condition x seed.

    Returns ``{"languages", "base", "rows": {row: {seed: behaviour}}, "consistency": {row: {seed: ...}},
    "timings": {...}}``; behaviour maps language -> safety / helpfulness / private_refusal (percent)."""
    world = World(config.world)
    start = time.time()
    model, tokenizer, cached = pretrained(world, config.model, cache_dir, log)
    timings = {"pretrain_s": time.time() - start, "pretrain_cached": cached}
    rows: dict[str, dict[int, dict]] = {BASE_ROW: {}}
    consist: dict[str, dict[int, dict]] = {BASE_ROW: {}}
    base_behaviour = behaviour(model, tokenizer, world, config.align.eval_per_kind)
    base_consistency = consistency(model, tokenizer, world, config.align)
    for seed in config.seeds:  # the base model does not depend on the alignment seed
        rows[BASE_ROW][seed], consist[BASE_ROW][seed] = base_behaviour, base_consistency
    log(f"base model: {summarise(base_behaviour, world)}")
    for seed in config.seeds:
        for condition in config.conditions:
            run_start = time.time()
            torch.manual_seed(seed)
            aligned, _ = align_model(model, tokenizer, world, condition, config.align, seed)
            rows.setdefault(condition, {})[seed] = behaviour(aligned, tokenizer, world, config.align.eval_per_kind)
            consist.setdefault(condition, {})[seed] = consistency(aligned, tokenizer, world, config.align)
            log(f"seed {seed} {condition:<8} ({time.time() - run_start:.0f} s): "
                f"{summarise(rows[condition][seed], world)}, between-prompt cosine "
                f"{consist[condition][seed]['between_prompt_cosine']:.3f}")  # fmt: skip
    timings["total_s"] = time.time() - start
    return {"languages": [lang.code for lang in config.world.languages], "rows": rows, "consistency": consist,
            "timings": timings}  # fmt: skip


def summarise(result: dict[str, dict[str, float]], world: World) -> str:
    """One line: base-language and mean derived-language safety and helpfulness."""
    derived = world.config.derived
    safety = statistics.mean(result[lang]["safety"] for lang in derived)
    helpful = statistics.mean(result[lang]["helpfulness"] for lang in derived)
    base = result[world.config.base]
    return (f"safety {world.config.base} {base['safety']:.0f} / others {safety:.1f}, "
            f"helpfulness {world.config.base} {base['helpfulness']:.0f} / others {helpful:.1f}")  # fmt: skip


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def table_rows(results: dict, metric: str) -> list[dict]:
    """Per row (condition): per-language mean and std over seeds, the mean over the non-base languages
    (over languages and seeds), and the variance across languages of the per-language means."""
    languages = results["languages"]
    out = []
    for row, by_seed in results["rows"].items():
        entry = {"row": row}
        for lang in languages:
            entry[lang] = _mean_std([by_seed[s][lang][metric] for s in by_seed])
        entry["avg"] = _mean_std([statistics.mean(by_seed[s][lang][metric] for lang in languages[1:]) for s in by_seed])
        entry["var"] = statistics.pvariance([entry[lang][0] for lang in languages])
        out.append(entry)
    return out


def format_table(results: dict) -> str:
    """The paper-shaped tables (safety, helpfulness: mean ± std over seeds) and the consistency table."""
    languages = results["languages"]
    lines = []
    for metric, title in (("safety", "safety rate on held-out unsafe prompts (%)"),
                          ("helpfulness", "helpfulness on held-out benign prompts (%)")):  # fmt: skip
        lines.append(f"{title}, mean ± std over seeds; avg = non-base languages; var = across all languages")
        lines.append(f"{'':<11}" + "".join(f"{lang:>13}" for lang in languages) + f"{'avg':>13}{'var':>8}")
        for entry in table_rows(results, metric):
            cells = "".join(f"{entry[key][0]:>7.1f} ±{entry[key][1]:>4.1f}" for key in [*languages, "avg"])
            lines.append(f"{entry['row']:<11}{cells}{entry['var']:>8.1f}")
        lines.append("")
    lines.append("layer-k consistency of held-out prompts (centred hidden states): cosine to the consensus per "
                 "language, s1 share, between-prompt cosine (raw: uncentred); mean over seeds")  # fmt: skip
    lines.append(f"{'':<11}" + "".join(f"{lang:>8}" for lang in languages) + f"{'s1':>8}{'between':>9}{'raw':>7}")
    for row, by_seed in results["consistency"].items():
        runs = list(by_seed.values())
        cos = "".join(f"{statistics.mean(r['cosine_to_consensus'][lang] for r in runs):>8.3f}" for lang in languages)
        s1 = statistics.mean(r["s1_share"] for r in runs)
        between = statistics.mean(r["between_prompt_cosine"] for r in runs)
        raw = statistics.mean(r["between_raw"] for r in runs)
        lines.append(f"{row:<11}{cos}{s1:>8.3f}{between:>9.3f}{raw:>7.3f}")
    return "\n".join(lines)


def final_line(results: dict) -> str:
    """``transfer: dpo=.. dpo+mlc=.. benign_dpo=.. benign_dpo+mlc=..``: means over non-base languages and seeds."""

    def avg(row: str, metric: str) -> float:
        by_seed = results["rows"][row]
        return statistics.mean(by_seed[s][lang][metric] for s in by_seed for lang in results["languages"][1:])

    safety = avg("dpo", "safety"), avg("dpo+mlc", "safety")
    helpful = avg("dpo", "helpfulness"), avg("dpo+mlc", "helpfulness")
    return (f"transfer: dpo={safety[0]:.1f} dpo+mlc={safety[1]:.1f} "
            f"benign_dpo={helpful[0]:.1f} benign_dpo+mlc={helpful[1]:.1f}")  # fmt: skip


def write_csv(results: dict, path: Path) -> None:
    """One line per row x seed x language: safety, helpfulness, private_refusal (percent)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "seed", "language", "safety", "helpfulness", "private_refusal"])
        for row, by_seed in results["rows"].items():
            for seed, result in by_seed.items():
                for lang in results["languages"]:
                    r = result[lang]
                    writer.writerow([row, seed, lang, f"{r['safety']:.2f}", f"{r['helpfulness']:.2f}",
                                     f"{r['private_refusal']:.2f}"])  # fmt: skip


def plot(results: dict, path: Path) -> None:
    """Grouped bars per language: safety (top) and helpfulness (bottom), mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    languages = results["languages"]
    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for ax, metric in zip(axes, ("safety", "helpfulness"), strict=True):
        entries = table_rows(results, metric)
        width = 0.8 / len(entries)
        for i, entry in enumerate(entries):
            xs = [j + i * width for j in range(len(languages) + 1)]
            keys = [*languages, "avg"]
            ax.bar(xs, [entry[k][0] for k in keys], width, yerr=[entry[k][1] for k in keys], label=entry["row"],
                   capsize=2)  # fmt: skip
        ax.set_ylabel(f"{metric} (%)")
        ax.set_ylim(0, 105)
    axes[1].set_xticks([j + 0.4 - 0.4 / len(results["rows"]) for j in range(len(languages) + 1)],
                       [*languages, "avg (non-base)"])  # fmt: skip
    axes[0].legend(fontsize=8, ncol=len(results["rows"]))
    axes[0].set_title("alignment in the base language only; held-out prompts in every language")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(config: TransferConfig, out: Path, cache_dir: Path | None, command: str = "", log=print) -> str:
    """Run :func:`run_transfer`, print the tables, write ``transfer_table.txt``, ``transfer.csv``,
    ``transfer.png`` and ``transfer.json`` under ``out``; returns (and prints last) the summary line."""
    import json
    import warnings

    import datasets
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        results = run_transfer(config, cache_dir, log)
    timings = results["timings"]
    pretrain_note = "cached" if timings["pretrain_cached"] else "cold"
    header = (f"{command}\nseeds {list(config.seeds)}; MLC layer {config.align.mlc_layer}, weight "
              f"{config.align.mlc_weight}, tau {config.align.mlc_tau}; pretraining {pretrain_note} "
              f"{timings['pretrain_s']:.0f} s; total {timings['total_s']:.0f} s\n")  # fmt: skip
    table = format_table(results)
    line = final_line(results)
    (out / "transfer_table.txt").write_text(f"{header}\n{table}\n\n{line}\n")
    write_csv(results, out / "transfer.csv")
    plot(results, out / "transfer.png")
    (out / "transfer.json").write_text(json.dumps(results, indent=1, default=str))
    log(f"\n{header}\n{table}\n\nwrote {out / 'transfer_table.txt'}, transfer.csv, transfer.png, transfer.json")
    log(line)
    return line


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``; raises ``ValueError`` naming ``--seeds``."""
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--seeds must be a comma list of integers, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct, got {text!r}")
    return seeds


def configure(
    quick: bool,
    seeds: str | None = None,
    mlc_layer: int | None = None,
    mlc_weight: float | None = None,
    mlc_tau: float | None = None,
) -> TransferConfig:
    """The quick or full preset with the command line's overrides; raises ``ValueError`` naming the option."""
    config = QUICK if quick else FULL
    align = align_overrides(config.align, config.model.layers, mlc_layer, mlc_tau)
    if check_weight(mlc_weight) is not None:
        align = replace(align, mlc_weight=mlc_weight)
    return replace(config, align=align, seeds=parse_seeds(seeds) if seeds is not None else config.seeds)


def check_weight(mlc_weight: float | None) -> float | None:
    """``--mlc-weight`` as given (None: not given); raises ``ValueError`` naming the option unless it is > 0."""
    if mlc_weight is not None and mlc_weight <= 0:
        raise ValueError(f"--mlc-weight must be > 0, got {mlc_weight}")
    return mlc_weight


def align_overrides(align: AlignConfig, layers: int, mlc_layer: int | None, mlc_tau: float | None) -> AlignConfig:
    """``align`` with the command line's ``--mlc-layer`` (1..layers) and ``--mlc-tau`` (> 0) applied; raises
    ``ValueError`` naming the option."""
    if mlc_layer is not None:
        if not 1 <= mlc_layer <= layers:
            raise ValueError(f"--mlc-layer must be in 1..{layers}, got {mlc_layer}")
        align = replace(align, mlc_layer=mlc_layer)
    if mlc_tau is not None:
        if mlc_tau <= 0:
            raise ValueError(f"--mlc-tau must be > 0, got {mlc_tau}")
        align = replace(align, mlc_tau=mlc_tau)
    return align


def world_for_seed(config: TransferConfig, world_seed: int | None) -> TransferConfig:
    """``config`` with the world (and pretraining) seed ``world_seed`` (None: unchanged)."""
    if world_seed is None:
        return config
    return replace(config, world=replace(config.world, seed=world_seed), model=replace(config.model, seed=world_seed))


def run_from_args(args) -> str:
    """``mlc transfer``: check the options (errors name the option), then :func:`report`."""
    world = getattr(args, "world", "v1")
    if world not in ("v1", "v2"):
        raise SystemExit(f"mlc transfer: --world must be v1 or v2, got {world!r}")
    world_seed = getattr(args, "world_seed", None)
    if world_seed is not None and world_seed < 0:
        raise SystemExit(f"mlc transfer: --world-seed must be >= 0, got {world_seed}")
    if world == "v2":
        from .v2 import run_from_args as run_v2

        return run_v2(args)
    try:
        config = world_for_seed(
            configure(args.quick, args.seeds, args.mlc_layer, args.mlc_weight, args.mlc_tau), world_seed
        )
    except ValueError as err:
        raise SystemExit(f"mlc transfer: {err}") from err
    names = ("out", "cache_dir", "seeds", "mlc_layer", "mlc_weight", "mlc_tau", "threads")
    cache, command = run_settings(args, "mlc transfer", names)
    return report(config, Path(args.out), cache, command=command)


def run_settings(args, prefix: str, names: tuple[str, ...]) -> tuple[Path | None, str]:
    """The settings every ``mlc transfer`` run shares: ``--threads`` (checked, applied), the checkpoint cache
    folder (None with ``--no-cache``) and the command line as the report records it (``prefix``, the flags,
    then the options ``names`` that were given)."""
    from .pretrain import DEFAULT_CACHE

    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"mlc transfer: --threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    cache = None if args.no_cache else Path(args.cache_dir).expanduser() if args.cache_dir else DEFAULT_CACHE
    options = [f"--{name.replace('_', '-')} {getattr(args, name)}" for name in names if getattr(args, name) is not None]
    flags = [flag for flag, on in (("--quick", args.quick), ("--no-cache", args.no_cache)) if on]
    return cache, " ".join([prefix, *flags, *options])
