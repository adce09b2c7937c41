"""World v1's protocol (retired from the package; its record: ``WORLD_CARD.md`` next to this file).

Align in the base language only (DPO, SFT; with and without MLC), evaluate in every language, over seeds:
the paper-shaped safety and helpfulness tables, the consistency table, ``transfer_table.txt``, ``transfer.csv``,
``transfer.png``, ``transfer.json`` and the last line ``transfer: dpo=.. dpo+mlc=.. benign_dpo=..
benign_dpo+mlc=..``. From a checkout of the repository (what ``mlc transfer --world v1`` ran)::

    python -m experiments.transfer.v1 --quick [--out DIR] [--seeds 0,1,2] [--mlc-layer K] ...
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mlc_kernels.transfer.align import AlignConfig, align_model, consistency
from mlc_kernels.transfer.evaluation import behaviour
from mlc_kernels.transfer.options import align_overrides, check_weight, parse_seeds, run_settings
from mlc_kernels.transfer.pretrain import ModelConfig, pretrained
from mlc_kernels.transfer.report import mean_std
from mlc_kernels.transfer.world import World, WorldConfig

CONDITIONS = ("dpo", "dpo+mlc", "sft", "sft+mlc")
BASE_ROW = "base model"


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


def table_rows(results: dict, metric: str) -> list[dict]:
    """Per row (condition): per-language mean and std over seeds, the mean over the non-base languages
    (over languages and seeds), and the variance across languages of the per-language means."""
    languages = results["languages"]
    out = []
    for row, by_seed in results["rows"].items():
        entry = {"row": row}
        for lang in languages:
            entry[lang] = mean_std([by_seed[s][lang][metric] for s in by_seed])
        entry["avg"] = mean_std([statistics.mean(by_seed[s][lang][metric] for lang in languages[1:]) for s in by_seed])
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


def world_for_seed(config: TransferConfig, world_seed: int | None) -> TransferConfig:
    """``config`` with the world (and pretraining) seed ``world_seed`` (None: unchanged)."""
    if world_seed is None:
        return config
    return replace(config, world=replace(config.world, seed=world_seed), model=replace(config.model, seed=world_seed))


def _finite_float(text: str) -> float:
    """A finite number (an argparse type; argparse reports the ``ValueError`` of a non-number)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> str:
    """``python -m experiments.transfer.v1``: the options of ``mlc transfer`` that v1 read; returns the last line."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="python -m experiments.transfer.v1", description=__doc__.splitlines()[0],
                                     formatter_class=fmt)  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="3 seeds, 64+64 prompts per language")
    parser.add_argument("--out", default="transfer_out", help="folder for the table, CSV, JSON and PNG")
    parser.add_argument("--cache-dir", default=None, help="checkpoint cache (~/.cache/mlc_kernels/transfer)")
    parser.add_argument("--no-cache", action="store_true", help="pretrain afresh and keep nothing")
    parser.add_argument("--seeds", default=None, help="comma list of alignment seeds (quick: 0,1,2, full: 0..4)")
    parser.add_argument("--mlc-layer", type=int, default=None, help="decoder layer k (default 2 of 4)")
    parser.add_argument("--mlc-weight", type=_finite_float, default=None, help="MLC weight (default 1.0)")
    parser.add_argument("--mlc-tau", type=_finite_float, default=None, help="MLC temperature (default 1.0)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--world-seed", type=int, default=None, help="world and pretraining seed (default 0)")
    args = parser.parse_args(argv)
    if Path(args.out).is_file():
        parser.error(f"--out {args.out} is an existing file, not a folder; give a folder path")
    if args.world_seed is not None and args.world_seed < 0:
        parser.error(f"--world-seed must be >= 0, got {args.world_seed}")
    try:
        config = world_for_seed(
            configure(args.quick, args.seeds, args.mlc_layer, args.mlc_weight, args.mlc_tau), args.world_seed
        )
        names = ("out", "cache_dir", "seeds", "mlc_layer", "mlc_weight", "mlc_tau", "threads")
        cache, command = run_settings(args, "python -m experiments.transfer.v1", names)
    except ValueError as err:
        parser.error(str(err))
    return report(config, Path(args.out), cache, command=command)


if __name__ == "__main__":
    main()
