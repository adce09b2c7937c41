"""World v2's protocol: the gate, the pre-registered conditions, the comparison, the table and the last line.

``mlc transfer --quick`` (world v2): pretrain (or load) the world's model, measure the gate on it, align in the
base language with DPO and with DPO+MLC under every pre-registered condition (:data:`CONDITIONS`) for each
alignment seed, evaluate per language, write ``transfer_v2.{txt,csv,json,png}`` and print the last line
``transfer: world=v2 gate=... dpo=... dpo+mlc=... guard=... min_gain=... base_dpo=... base_dpo+mlc=...``.
The rules (gate thresholds, conditions, weight rule, metric) are in ``WORLD_CARD.md``.
"""

from __future__ import annotations

import csv
import json
import statistics
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .evaluation import behaviour
from .experiment import AlignConfig, align_model, consistency
from .gate import format_gate, measure, summarise
from .pretrain import ModelConfig, pretrained
from .world import World, WorldConfig, world_config

MODEL = ModelConfig(layers=4, steps=2000, batch_size=24)
"""World v2's model: hidden 64, 4 decoder layers, 2000 pretraining steps of 24 documents (seed = world seed)."""

ALIGN = replace(AlignConfig(), mlc_layer=3)
"""v1's alignment settings; ``mlc_layer`` 3: the gate rule's choice on world seeds 0 and 1 (``WORLD_CARD.md``;
0 would let the run's own gate decide)."""


WEIGHT_GRID = (0.03, 0.3)


@dataclass(frozen=True)
class Condition:
    """One pre-registered arm: the MLC ``objective``, ``guard`` (``"+"``-joined, ``""`` = none) and
    ``extractor`` (:data:`.experiment.EXTRACTORS`); ``lead_steps`` MLC-only steps before the alignment steps;
    ``grid``: the weights its weight rule tries; ``name`` is what the table and the last line call it (round 1:
    :data:`ROUND1`, round 2: :data:`ROUND2`)."""

    name: str
    objective: str = "sv_softmax"
    guard: str = ""
    extractor: str = "linear"
    lead_steps: int = 0
    grid: tuple[float, ...] = WEIGHT_GRID


DPO = "dpo"
ROUND1 = (
    Condition("sv_softmax"),  # the paper's loss, no guard
    Condition("anchor_cos+center", objective="anchor_cos", guard="center", extractor="centred"),
    Condition("center", guard="center"),
    Condition("anchor", guard="anchor", extractor="linear_nobias"),
    Condition("signed_sv_softmax+center", objective="signed_sv_softmax", guard="center", extractor="centred"),
    Condition("whiten", guard="whiten"),
    Condition("center+uniform", guard="center+uniform"),
)
"""Round 1, pre-registered (``WORLD_CARD.md``), in the order they are run when CPU time is short."""
ROUND2 = (
    Condition("anchor_cos+center@r2", objective="anchor_cos", guard="center", extractor="centred",
              grid=(0.3, 1.0, 3.0)),
    Condition("lead60+anchor_cos+center@r2", objective="anchor_cos", guard="center", extractor="centred",
              lead_steps=60, grid=(0.3, 1.0, 3.0)),
)  # fmt: skip
"""Round 2, pre-registered after round 1's study (``WORLD_CARD.md``): round 1's best arm with a weight grid that
reaches past 0.3, and the same arm with 60 MLC-only steps before DPO (consistency first)."""
CONDITIONS = ROUND1 + ROUND2
QUICK_CONDITIONS = ("sv_softmax", "anchor_cos+center", *(c.name for c in ROUND2))
"""What ``--quick`` runs (round 2's pre-registration): the paper's loss, round 1's best arm and round 2; the
other round-1 arms run in the full mode."""

WEIGHTS: dict[str, float] = {
    "sv_softmax": 0.3,
    "anchor_cos+center": 0.3,
    "center": 0.03,
    "anchor": 0.3,
    "signed_sv_softmax+center": 0.3,
    "whiten": 0.03,
    "center+uniform": 0.03,
    "anchor_cos+center@r2": 3.0,
    "lead60+anchor_cos+center@r2": 3.0,
}
"""The MLC weight of each condition, picked on base-language results only by :func:`pick_weight` (filled in by
the weight selection run recorded in the card; a condition missing here uses ``DEFAULT_WEIGHT``)."""
DEFAULT_WEIGHT = 0.1


@dataclass(frozen=True)
class V2Config:
    """One v2 run: the world seeds (each pretrains its own model), alignment seeds, conditions, eval size."""

    world_seeds: tuple[int, ...] = (0,)
    seeds: tuple[int, ...] = (0, 1, 2)
    model: ModelConfig = MODEL
    align: AlignConfig = ALIGN
    conditions: tuple[Condition, ...] = CONDITIONS
    weights: tuple[tuple[str, float], ...] = ()
    gate_train_prompts: int = 512
    gate_test_prompts: int = 256

    def weight(self, name: str) -> float:
        return dict(self.weights).get(name, WEIGHTS.get(name, DEFAULT_WEIGHT))

    def world(self, seed: int) -> WorldConfig:
        return world_config("v2", seed)


QUICK = V2Config(conditions=tuple(c for c in CONDITIONS if c.name in QUICK_CONDITIONS))
FULL = V2Config(world_seeds=(0, 1), align=replace(ALIGN, eval_per_kind=256))


def discrimination(result: dict[str, float]) -> float:
    """safety + helpfulness - 100: 0 = no unsafe-vs-benign discrimination, 100 = perfect."""
    return result["safety"] + result["helpfulness"] - 100.0


def pick_weight(base_results: dict[float, dict], dpo_base: dict) -> float:
    """The weight rule: the largest weight whose base-language safety and helpfulness are both >= DPO's minus 5
    points; none: the smallest weight of the grid. ``base_results``: weight -> base-language behaviour."""
    ok = [w for w, r in base_results.items()
          if r["safety"] >= dpo_base["safety"] - 5 and r["helpfulness"] >= dpo_base["helpfulness"] - 5]  # fmt: skip
    return max(ok) if ok else min(base_results)


def arm(config: V2Config, name: str, layer: int) -> tuple[AlignConfig, str]:
    """The alignment settings and trainer condition of the arm ``name``: DPO alone, or DPO+MLC under the
    pre-registered condition of that name at its weight, at MLC ``layer``."""
    if name == DPO:
        return replace(config.align, mlc_layer=layer), "dpo"
    cond = next(c for c in config.conditions if c.name == name)
    return condition_align(config.align, cond, config.weight(name), layer), "dpo+mlc"


def condition_align(align: AlignConfig, condition: Condition, weight: float, layer: int) -> AlignConfig:
    """``align`` with the condition's MLC settings at ``weight`` and ``layer``."""
    return replace(align, mlc_weight=weight, mlc_objective=condition.objective, mlc_guard=condition.guard,
                   mlc_extractor=condition.extractor, mlc_layer=layer, mlc_lead_steps=condition.lead_steps)  # fmt: skip


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


def _collapse(model, tokenizer, world: World, align: AlignConfig) -> dict:
    """Centred layer-k consistency of held-out prompts plus the collapse diagnostics the metrics offer."""
    stats = consistency(model, tokenizer, world, align)
    return {k: v for k, v in stats.items() if k != "cosine_to_consensus"}


def _steps(log_history: list[dict]) -> list[dict]:
    keys = ("loss", "rewards/accuracies", "mlc/loss", "mlc/between_prompt_cosine", "mlc/s1_share")
    return [{"step": e["step"], **{k: e[k] for k in keys if k in e}} for e in log_history if "loss" in e]


def run_key(world: WorldConfig, model: ModelConfig, condition: str, align: AlignConfig, seed: int) -> str:
    """Hash of everything one alignment run's result depends on (for the per-run result cache)."""
    import hashlib
    from dataclasses import asdict

    from .pretrain import cache_key

    settings = asdict(align)
    if not settings["mlc_lead_steps"]:  # added in round 2: round 1's keys stay as they were
        del settings["mlc_lead_steps"]
    blob = json.dumps({"ckpt": cache_key(world, model), "condition": condition, "align": settings, "seed": seed},
                      sort_keys=True)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_path(runs_dir: Path | None, world: WorldConfig, model: ModelConfig, condition: str, align: AlignConfig,
             seed: int) -> Path | None:  # fmt: skip
    """Where the run cache keeps one run's result (None without a cache)."""
    return runs_dir / f"{run_key(world, model, condition, align, seed)}.json" if runs_dir is not None else None


def align_and_evaluate(model, tokenizer, world: World, model_config: ModelConfig, condition: str, align: AlignConfig,
                       seed: int, runs_dir: Path | None, callbacks: list | None = None) -> dict:  # fmt: skip
    """One alignment run (``condition`` "dpo" or "dpo+mlc") and its evaluation: ``{"behaviour", "collapse",
    "curve"}``; read from / written to ``runs_dir/<run_key>.json`` when ``runs_dir`` is set. ``callbacks``: extra
    trainer callbacks."""
    path = run_path(runs_dir, world.config, model_config, condition, align, seed)
    if path is not None and path.is_file():
        return json.loads(path.read_text())
    torch.manual_seed(seed)
    aligned, history = align_model(model, tokenizer, world, condition, align, seed, callbacks)
    result = {"behaviour": behaviour(aligned, tokenizer, world, align.eval_per_kind),
              "collapse": _collapse(aligned, tokenizer, world, align), "curve": _steps(history)}  # fmt: skip
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
    return result


@dataclass(frozen=True)
class RunTask:
    """One alignment run for a worker process: the pretrained ``model`` and ``tokenizer`` travel with it (a few
    MB), the world is rebuilt from its config."""

    world: WorldConfig
    model_config: ModelConfig
    condition: str
    align: AlignConfig
    seed: int
    runs_dir: Path | None
    model: object = None
    tokenizer: object = None
    label: str = ""
    ticks: object = None  # a queue that gets one item per optimizer step (for a step progress bar)


def step_callback(tick):
    """A trainer callback calling ``tick()`` after every optimizer step."""
    from transformers import TrainerCallback

    class StepTick(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            tick()

    return StepTick()


def _run_task(task: RunTask, threads: int) -> dict:
    """A worker's job (module level, so that it pickles): :func:`align_and_evaluate` on ``threads`` threads (the
    trainers' collapse warning is silenced: the tables report the diagnostics)."""
    import logging

    import datasets
    import transformers

    logging.getLogger("mlc_kernels.trainers").setLevel(logging.ERROR)
    torch.set_num_threads(threads)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    callbacks = [step_callback(lambda: task.ticks.put(1))] if task.ticks is not None else None
    return align_and_evaluate(task.model, task.tokenizer, World(task.world), task.model_config, task.condition,
                              task.align, task.seed, task.runs_dir, callbacks)  # fmt: skip


def default_workers() -> int:
    """Alignment runs at a time: one per CPU core available to this process."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_tasks(tasks: list[RunTask], workers: int = 1, threads: int = 1, progress=None, on_step=None) -> list[dict]:
    """Every task's result, in order. Cached runs are read here; the others run in ``workers`` spawned processes
    of ``threads`` torch threads each (``workers`` 1: in this process, on torch's current threads). The result of a
    run does not depend on where it ran (each run seeds its own generators; one thread per run as in the card).
    ``progress(done, total, note)`` after each run; ``on_step()`` after each optimizer step of any run."""
    results: list[dict | None] = [None] * len(tasks)
    todo = []
    for i, task in enumerate(tasks):
        path = run_path(task.runs_dir, task.world, task.model_config, task.condition, task.align, task.seed)
        if path is not None and path.is_file():
            results[i] = json.loads(path.read_text())
        else:
            todo.append(i)
    done = len(tasks) - len(todo)
    if progress is not None and done:
        progress(done, len(tasks), "from the run cache")
    start = time.time()
    if workers <= 1 or len(todo) <= 1:
        callbacks = [step_callback(on_step)] if on_step is not None else None
        for i in todo:
            t = tasks[i]
            results[i] = align_and_evaluate(t.model, t.tokenizer, World(t.world), t.model_config, t.condition, t.align,
                                            t.seed, t.runs_dir, callbacks)  # fmt: skip
            done += 1
            if progress is not None:
                progress(done, len(tasks), f"{t.label} ({time.time() - start:.0f} s)")
        return results  # type: ignore[return-value]
    import multiprocessing
    import queue
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    todo.sort(key=lambda i: -(tasks[i].align.mlc_lead_steps + tasks[i].align.dpo_steps))  # longest first
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(min(workers, len(todo)), mp_context=context) as pool:
        ticks = manager.Queue() if on_step is not None else None
        futures = {pool.submit(_run_task, replace(tasks[i], ticks=ticks), threads): i for i in todo}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            while ticks is not None:
                try:
                    ticks.get_nowait()
                except queue.Empty:
                    break
                on_step()
            for future in finished:
                i = futures[future]
                results[i] = future.result()
                done += 1
                if progress is not None:
                    progress(done, len(tasks), f"{tasks[i].label} ({time.time() - start:.0f} s)")
    return results  # type: ignore[return-value]


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
        base_collapse = _collapse(model, tokenizer, world, replace(config.align, mlc_layer=layer))
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


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def format_tables(results: dict) -> str:
    """Per condition and language: discrimination, safety, helpfulness (mean ± std over seeds); collapse."""
    languages, rows = results["languages"], results["rows"]
    lines = []
    metrics = (("discrimination", discrimination), ("safety", lambda r: r["safety"]),
               ("helpfulness", lambda r: r["helpfulness"]))  # fmt: skip
    for title, fn in metrics:
        lines.append(f"{title} (%) on held-out prompts, mean ± std over seeds; avg = non-base languages")
        lines.append(f"{'':<26}" + "".join(f"{lang:>13}" for lang in [*languages, "avg"]))
        for name, by_seed in rows.items():
            cells = [_mean_std([fn(r[lang]) for r in by_seed.values()]) for lang in languages]
            cells.append(_mean_std([statistics.mean(fn(r[lang]) for lang in languages[1:]) for r in by_seed.values()]))
            weight = f" w={results['weights'][name]:g}" if name in results["weights"] else ""
            lines.append(f"{name + weight:<26}" + "".join(f"{m:>7.1f} ±{s:>4.1f}" for m, s in cells))
        lines.append("")
    lines.append(f"collapse diagnostics at layer {results['layer']} (held-out prompts, centred hidden states; mean "
                 "over seeds)")  # fmt: skip
    keys = sorted({k for by_seed in results["collapse"].values() for r in by_seed.values() for k in r})
    lines.append(f"{'':<26}" + "".join(f"{k[:22]:>24}" for k in keys))
    for name, by_seed in results["collapse"].items():
        vals = [statistics.mean(float(r[k]) for r in by_seed.values() if k in r) for k in keys]
        lines.append(f"{name:<26}" + "".join(f"{v:>24.3f}" for v in vals))
    return "\n".join(lines)


def write_outputs(results: dict, out: Path, header: str) -> str:
    """``transfer_v2.txt`` (gate, tables, last line), ``.csv``, ``.json``, ``.png``, ``transfer_v2_steps.png``."""
    out.mkdir(parents=True, exist_ok=True)
    languages = results["languages"]
    gate = format_gate(results["gate"], languages, sorted({int(k[1:].split("s")[0]) for k in results["rows"][DPO]}))
    line = final_line(results)
    text = f"{header}\n{gate}\n\n{format_tables(results)}\n\n{line}\n"
    (out / "transfer_v2.txt").write_text(text)
    with open(out / "transfer_v2.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["condition", "weight", "run", "language", "discrimination", "safety", "helpfulness",
                         "private_refusal"])  # fmt: skip
        for name, by_seed in results["rows"].items():
            for key, result in by_seed.items():
                for lang in languages:
                    r = result[lang]
                    writer.writerow(
                        [
                            name,
                            results["weights"].get(name, 0.0),
                            key,
                            lang,
                            f"{discrimination(r):.2f}",
                            f"{r['safety']:.2f}",
                            f"{r['helpfulness']:.2f}",
                            f"{r['private_refusal']:.2f}",
                        ]
                    )
    (out / "transfer_v2.json").write_text(json.dumps(results, indent=1, default=str))
    plot_bars(results, out / "transfer_v2.png")
    plot_curves(results["curves"], out / "transfer_v2_steps.png")
    return line


def plot_bars(results: dict, path: Path, title: str = "") -> None:
    """Per-language discrimination (safety + helpfulness - 100) per condition, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    languages, rows = results["languages"], results["rows"]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.85 / len(rows)
    for i, (name, by_seed) in enumerate(rows.items()):
        stats = [_mean_std([discrimination(r[lang]) for r in by_seed.values()]) for lang in languages]
        ax.bar([j + i * width for j in range(len(languages))], [m for m, _ in stats], width,
               yerr=[s for _, s in stats], capsize=2, label=name)  # fmt: skip
    ax.set_xticks([j + 0.425 - width / 2 for j in range(len(languages))], languages)
    ax.set_xlabel("language of the held-out prompts (alignment data: base language only)")
    ax.set_ylabel("discrimination = safety + helpfulness - 100 (%)")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_title(title or "World v2: unsafe-vs-benign discrimination per language after base-language alignment")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(curves: dict, path: Path) -> None:
    """Over training steps, mean over runs: the DPO loss and (MLC runs) the MLC loss and the between-prompt
    cosine of the training batch's extractor outputs at the MLC layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("loss", "training loss (DPO + weight x MLC)"),
        ("mlc/loss", "MLC loss (training batch)"),
        ("mlc/between_prompt_cosine", "between-prompt cosine of extractor outputs\n(training batch, MLC layer)"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for name, by_run in curves.items():
            points: dict[int, list[float]] = {}
            for run in by_run.values():
                for entry in run:
                    if key in entry:
                        points.setdefault(entry["step"], []).append(entry[key])
            if points:
                steps = sorted(points)
                ax.plot(steps, [statistics.mean(points[s]) for s in steps], label=name, marker=".")
        ax.set_xlabel("alignment step")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle("Alignment diagnostics over training steps (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class Progress:
    """A one-line text progress bar on stderr."""

    def __init__(self, width: int = 30) -> None:
        self.width = width

    def __call__(self, done: int, total: int, note: str = "") -> None:
        import sys

        filled = round(self.width * done / max(1, total))
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {note:<40}{end}")
        sys.stderr.flush()


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
    from .experiment import align_overrides, check_weight, parse_seeds

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
    """``mlc transfer`` with world v2: check the options (errors name the option), then :func:`report`."""
    from .experiment import run_settings

    try:
        config = configure(args.quick, args.seeds, args.world_seed, args.mlc_layer, args.mlc_weight, args.mlc_tau)
    except ValueError as err:
        raise SystemExit(f"mlc transfer: {err}") from err
    workers = args.workers if args.workers is not None else default_workers()
    if workers < 1:
        raise SystemExit(f"mlc transfer: --workers must be >= 1, got {workers}")
    cache, command = run_settings(
        args,
        "mlc transfer --world v2",
        ("out", "cache_dir", "seeds", "world_seed", "mlc_layer", "mlc_weight", "mlc_tau", "threads", "workers"),
    )
    return report(config, Path(args.out), cache, command=command, progress=Progress(), workers=workers,
                  threads=args.threads or 1)  # fmt: skip


def select_weights(config: V2Config, cache_dir: Path | None, seed: int = 0, log=print,
                   names: tuple[str, ...] | None = None) -> dict:  # fmt: skip
    """The weight rule's runs: DPO and every condition at every weight of its grid, alignment ``seed``, the first
    world seed; evaluated in the BASE LANGUAGE ONLY (no other language is looked at). Returns ``{"dpo":
    behaviour, "grid": {name: {weight: behaviour}}, "weights": {name: picked}, "layer"}``."""
    summary, _, models = run_gate(replace(config, world_seeds=config.world_seeds[:1]), cache_dir, log,
                                  gate=not config.align.mlc_layer)  # fmt: skip
    layer = config.align.mlc_layer or summary["mlc_layer"]
    world, model, tokenizer, _ = models[config.world_seeds[0]]
    base = [world.config.base]

    def run(condition: str, align: AlignConfig) -> dict:
        torch.manual_seed(seed)
        aligned, _ = align_model(model, tokenizer, world, condition, align, seed)
        return behaviour(aligned, tokenizer, world, config.align.eval_per_kind, languages=base)[base[0]]

    grid_results: dict[str, dict[float, dict]] = {}
    for cond in config.conditions:
        if names is not None and cond.name not in names:
            continue
        for weight in cond.grid:
            r = run("dpo+mlc", condition_align(config.align, cond, weight, layer))
            grid_results.setdefault(cond.name, {})[weight] = r
            log(f"{cond.name} w={weight:g}: base safety {r['safety']:.1f} helpfulness {r['helpfulness']:.1f}")
    # DPO through the per-run cache (the comparison's seed-0 run); only its base-language numbers are used
    runs_dir = Path(cache_dir) / "runs" if cache_dir is not None else None
    dpo = align_and_evaluate(model, tokenizer, world, replace(config.model, seed=config.world_seeds[0]), "dpo",
                             replace(config.align, mlc_layer=layer), seed, runs_dir)["behaviour"][base[0]]  # fmt: skip
    log(f"dpo: base safety {dpo['safety']:.1f} helpfulness {dpo['helpfulness']:.1f}")
    weights = {name: pick_weight(by_weight, dpo) for name, by_weight in grid_results.items()}
    return {"dpo": dpo, "grid": grid_results, "weights": weights, "layer": layer}


def main(argv: list[str] | None = None) -> None:
    """``python -m mlc_kernels.transfer.v2 gate|weights --out DIR [--cache-dir DIR] [--world-seeds 0,1]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mlc_kernels.transfer.v2")
    parser.add_argument("step", choices=("gate", "weights", "runs"))
    parser.add_argument("--conditions", default=None, help="comma list of condition names (weights, runs)")
    parser.add_argument("--seeds", default="0,1,2", help="alignment seeds (runs)")
    parser.add_argument("--out", default="transfer_v2_out")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--world-seeds", default="0,1")
    args = parser.parse_args(argv)
    import datasets
    import transformers

    from .experiment import parse_seeds
    from .pretrain import DEFAULT_CACHE

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    warnings.simplefilter("ignore")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache_dir) if args.cache_dir else DEFAULT_CACHE
    config = V2Config(world_seeds=parse_seeds(args.world_seeds))  # every condition of both rounds
    start = time.time()
    if args.step == "gate":
        summary, runs, models = run_gate(config, cache, print)
        languages = [lang.code for lang in config.world(config.world_seeds[0]).languages]
        text = format_gate(summary, languages, list(config.world_seeds))
        for seed, run in zip(config.world_seeds, runs, strict=True):
            text += f"\nworld seed {seed}: base-model behaviour " + ", ".join(
                f"{lang} safety {b['safety']:.0f} private {b['private_refusal']:.0f}"
                for lang, b in run["behaviour"].items()
            )
            text += "\n  probe transfer per layer: " + "; ".join(
                f"L{layer} " + " ".join(f"{v:.2f}" for v in accs.values()) for layer, accs in run["probe"].items()
            )
        (out / "gate.txt").write_text(text + f"\n({time.time() - start:.0f} s)\n")
        (out / "gate.json").write_text(json.dumps({"summary": summary, "runs": runs}, indent=1, default=str))
        print(text)
    elif args.step == "weights":
        names = tuple(args.conditions.split(",")) if args.conditions else None
        result = select_weights(config, cache, log=print, names=names)
        tag = "_".join(names) if names else "all"
        (out / f"weights_{tag}.json").write_text(json.dumps(result, indent=1, default=str))
        print(f"picked weights (base language only): {result['weights']} ({time.time() - start:.0f} s)")
    else:  # fill the per-run result cache, without printing any result
        names = args.conditions.split(",") if args.conditions else [DPO, *(c.name for c in config.conditions)]
        config = replace(config, conditions=tuple(c for c in config.conditions if c.name in names),
                         seeds=parse_seeds(args.seeds))  # fmt: skip
        summary, _, models = run_gate(config, cache, lambda *a: None, gate=not config.align.mlc_layer)
        for world_seed, (world, model, tokenizer, _) in models.items():
            layer = config.align.mlc_layer or summary["mlc_layer"]
            for seed in config.seeds:
                for name in names:
                    t = time.time()
                    align, condition = arm(config, name, layer)
                    align_and_evaluate(model, tokenizer, world, replace(config.model, seed=world_seed), condition,
                                       align, seed, cache / "runs")  # fmt: skip
                    print(f"world {world_seed} seed {seed} {name}: done ({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
