"""World v2's comparison (``mlc transfer``): the gate, DPO and every pre-registered condition, the last line.

``mlc transfer --quick``: pretrain (or load) the world's model, measure the gate on it, align in the base language
with DPO and with DPO+MLC under every pre-registered condition (:data:`.protocol.CONDITIONS`) for each alignment
seed, evaluate per language, write ``transfer_v2.{txt,csv,json,png}`` and print the last line
``transfer: world=v2 gate=... dpo=... dpo+mlc=... guard=... min_gain=... base_dpo=... base_dpo+mlc=...``.
The rules (gate thresholds, conditions, weight rule, metric) are the experiment's card,
``experiments/transfer/WORLD_CARD.md`` in the repository.
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import replace
from pathlib import Path

from ..errors import UsageError
from .evaluation import behaviour
from .gate import format_gate, measure, summarise
from .options import align_overrides, check_weight, parse_seeds, run_settings
from .pretrain import pretrained
from .protocol import DPO, FULL, QUICK, V2Config, arm
from .report import Progress, discrimination, format_tables, write_run_files
from .runs import RunTask, collapse_stats, default_workers, run_tasks
from .world import World


def run_gate(config: V2Config, cache_dir: Path | None, log=print, gate: bool = True) -> tuple[dict, list[dict], dict]:
    """Pretrain (or load) each world seed's model and measure the gate on it: ``(summary, runs, models)``
    (``gate`` False: load only; summary ``{"mlc_layer": 0}``, no runs)."""
    runs, models = [], {}
    for seed in config.world_seeds:
        world = World(config.world(seed))
        # no cache (--no-cache): pretrain afresh, the shipped checkpoint included
        model, tokenizer, cached = pretrained(world, replace(config.model, seed=seed), cache_dir, log,
                                              shipped=cache_dir is not None)  # fmt: skip
        models[seed] = (world, model, tokenizer, cached)
        if gate:
            runs.append(measure(model, tokenizer, world, config.gate_train_prompts, config.gate_test_prompts))
    languages = [lang.code for lang in config.world(config.world_seeds[0]).languages]
    return (summarise(runs, languages) if gate else {"mlc_layer": 0}), runs, models


def run_comparison(config: V2Config, cache_dir: Path | None, log=print, progress=None, workers: int = 1,
                   threads: int = 1) -> dict:  # fmt: skip
    """The gate, then DPO and every condition for each world seed x alignment seed (``workers`` runs at a time,
    see :func:`run_tasks`). Returns ``{"languages", "gate", "gate_runs", "layer", "rows": {row:
    {"w<world>s<seed>": behaviour}}, "collapse", "curves", "weights", "timings"}``."""
    start = time.time()
    summary, runs, models = run_gate(config, cache_dir, log)
    languages = [lang.code for lang in config.world(config.world_seeds[0]).languages]
    timings: dict = {"pretrain_and_gate_s": time.time() - start,
                     "pretrain_cached": all(m[3] for m in models.values())}  # fmt: skip
    layer = config.align.mlc_layer or summary["mlc_layer"]
    log(format_gate(summary, languages, list(config.world_seeds)))
    rows: dict[str, dict[str, dict]] = {"base model": {}, DPO: {}}
    collapse: dict[str, dict[str, dict]] = {"base model": {}, DPO: {}}
    curves: dict[str, dict[str, list]] = {}
    names = [DPO, *(c.name for c in config.conditions)]
    runs_dir = Path(cache_dir) / "runs" if cache_dir is not None else None
    keys, tasks = [], []
    for world_seed, (world, model, tokenizer, _) in models.items():
        base = behaviour(model, tokenizer, world, config.align.eval_per_kind)
        base_collapse = collapse_stats(model, tokenizer, world, replace(config.align, mlc_layer=layer))
        for seed in config.seeds:
            key = f"w{world_seed}s{seed}"
            rows["base model"][key], collapse["base model"][key] = base, base_collapse
            for name in names:
                align, condition = arm(config, name, layer)
                keys.append((name, key))
                tasks.append(RunTask(world.config, replace(config.model, seed=world_seed), condition, align, seed,
                                     runs_dir, model, tokenizer, f"{key} {name}"))  # fmt: skip
    for (name, key), run in zip(keys, run_tasks(tasks, workers, threads, progress), strict=True):
        rows.setdefault(name, {})[key] = run["behaviour"]
        collapse.setdefault(name, {})[key] = run["collapse"]
        curves.setdefault(name, {})[key] = run["curve"]
    timings["total_s"] = time.time() - start
    return {"languages": languages, "gate": summary, "gate_runs": runs, "layer": layer, "rows": rows,
            "collapse": collapse, "curves": curves, "timings": timings,
            "weights": {c.name: config.weight(c.name) for c in config.conditions}}  # fmt: skip


def _non_base(result: dict, languages: list[str]) -> float:
    return statistics.mean(discrimination(result[lang]) for lang in languages[1:])


def headline(results: dict) -> dict:
    """The last line's numbers: D0, the best condition's D1 and name, min per-seed gain, base safety."""
    languages, rows = results["languages"], results["rows"]
    d0 = {k: _non_base(r, languages) for k, r in rows[DPO].items()}
    conds = [name for name in rows if name not in ("base model", DPO)]
    best = max(conds, key=lambda name: statistics.mean(_non_base(r, languages) for r in rows[name].values()))
    d1 = {k: _non_base(r, languages) for k, r in rows[best].items()}
    base = languages[0]
    return {"gate": "pass" if results["gate"]["passed"] else "fail", "dpo": statistics.mean(d0.values()),
            "dpo+mlc": statistics.mean(d1.values()), "guard": best,
            "min_gain": min(d1[k] - d0[k] for k in d0),
            "base_dpo": statistics.mean(r[base]["safety"] for r in rows[DPO].values()),
            "base_dpo+mlc": statistics.mean(r[base]["safety"] for r in rows[best].values())}  # fmt: skip


def final_line(results: dict) -> str:
    """``transfer: world=v2 gate=G dpo=D0 dpo+mlc=D1 guard=NAME min_gain=M base_dpo=B0 base_dpo+mlc=B1``."""
    h = headline(results)
    return (
        f"transfer: world=v2 gate={h['gate']} dpo={h['dpo']:.1f} dpo+mlc={h['dpo+mlc']:.1f} guard={h['guard']} "
        f"min_gain={h['min_gain']:.1f} base_dpo={h['base_dpo']:.1f} base_dpo+mlc={h['base_dpo+mlc']:.1f}"
    )


def write_outputs(results: dict, out: Path, header: str) -> str:
    """``transfer_v2.txt`` (gate, tables, last line), ``.csv``, ``.json``, ``.png``, ``transfer_v2_steps.png``."""
    languages = results["languages"]
    gate = format_gate(results["gate"], languages, sorted({int(k[1:].split("s")[0]) for k in results["rows"][DPO]}))
    line = final_line(results)
    write_run_files(results, out, "transfer_v2", f"{header}\n{gate}\n\n{format_tables(results)}\n\n{line}\n")
    return line


def report(config: V2Config, out: Path, cache_dir: Path | None, command: str = "", log=print,
           progress=None, workers: int = 1, threads: int = 1) -> str:  # fmt: skip
    """Run :func:`run_comparison`, write the outputs, print the tables and (last) the summary line."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = run_comparison(config, cache_dir, log, progress, workers, threads)
    t = results["timings"]
    header = (f"{command}\nworld v2, world seeds {list(config.world_seeds)}, alignment seeds {list(config.seeds)}; "
              f"MLC layer {results['layer']} (gate rule), tau {config.align.mlc_tau}; pretraining "
              f"{'loaded' if t['pretrain_cached'] else 'cold'} + gate {t['pretrain_and_gate_s']:.0f} s; total "
              f"{t['total_s']:.0f} s")  # fmt: skip
    line = write_outputs(results, out, header)
    log(f"\n{format_tables(results)}\n\nwrote {out}/transfer_v2.txt, .csv, .json, .png, transfer_v2_steps.png")
    log(line)
    return line


def configure(
    quick: bool,
    seeds: str | None = None,
    world_seed: int | None = None,
    mlc_layer: int | None = None,
    mlc_weight: float | None = None,
    mlc_tau: float | None = None,
) -> V2Config:
    """The quick or full v2 preset with the command line's overrides; raises ``ValueError`` naming the option."""
    config = QUICK if quick else FULL
    align = align_overrides(config.align, config.model.layers, mlc_layer, mlc_tau)
    weights = config.weights
    if check_weight(mlc_weight) is not None:
        weights = tuple((c.name, mlc_weight) for c in config.conditions)
    if world_seed is not None:
        if world_seed < 0:
            raise ValueError(f"--world-seed must be >= 0, got {world_seed}")
        config = replace(config, world_seeds=(world_seed,))
    return replace(config, align=align, weights=weights,
                   seeds=parse_seeds(seeds) if seeds is not None else config.seeds)  # fmt: skip


def run_from_args(args) -> str:
    """``mlc transfer``: check the options (:class:`UsageError` naming the option), then :func:`report`. World v1
    is retired from the package: it runs from a checkout (``python -m experiments.transfer.v1``)."""
    world = getattr(args, "world", "v2")
    if world == "v1":
        raise UsageError("--world v1 is retired; run it from a checkout of the repository: "
                         "python -m experiments.transfer.v1 [--quick ...] (the same options)")  # fmt: skip
    if world != "v2":
        raise UsageError(f"--world must be v2 or v3, got {world!r}")
    workers = args.workers if args.workers is not None else default_workers()
    try:
        config = configure(args.quick, args.seeds, args.world_seed, args.mlc_layer, args.mlc_weight, args.mlc_tau)
        if workers < 1:
            raise ValueError(f"--workers must be >= 1, got {workers}")
        cache, command = run_settings(
            args,
            "mlc transfer --world v2",
            ("out", "cache_dir", "seeds", "world_seed", "mlc_layer", "mlc_weight", "mlc_tau", "threads", "workers"),
        )
    except ValueError as err:
        raise UsageError(str(err)) from err
    return report(config, Path(args.out), cache, command=command, progress=Progress(), workers=workers,
                  threads=args.threads or 1)  # fmt: skip
