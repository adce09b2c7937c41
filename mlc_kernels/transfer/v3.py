"""World v3's pre-registered comparison (``mlc transfer --world v3``): the v3 gate per world seed, DPO and the
pre-registered DPO+MLC arms, the analysis over world seeds and the last line.

The rules (world, gate, budget, arms, seeds, endpoint, decision rule) were committed in the experiment's card,
``experiments/transfer/WORLD_CARD.md`` (section "World v3"), before any v3 MLC run. The unit of replication is the
world seed: each pretrains its own model; the gain of an arm is the mean over alignment seeds of its primary
endpoint (mean discrimination over the non-base languages) minus DPO's, per world seed.
"""

from __future__ import annotations

import math
import multiprocessing
import statistics
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import UsageError
from .align import AlignConfig
from .gate import measure, v3_gate
from .options import parse_seeds, run_settings
from .pretrain import ModelConfig, pretrained
from .protocol import ALIGN, MODEL
from .report import Progress, discrimination, format_tables, write_run_files
from .runs import RunTask, collapse_stats, default_workers, run_tasks
from .world import World, WorldConfig, world_config

HIDDEN_SIZE = MODEL.hidden_size
AUTHORS_REP_RATIO = 512 / 3584
"""The authors' extractor size over the model's hidden size (512 for Qwen2.5-7B and Gemma-2-9B, both 3584 wide)."""
AUTHORS_REP_SIZE = round(HIDDEN_SIZE * AUTHORS_REP_RATIO)
"""The extractor size rule (the card): the authors' ratio applied to the world's model, rounded (64 -> 9)."""

DPO_BUDGET = (20, 1e-3, 0.01)
"""DPO steps, learning rate, beta: the budget rule's candidate (the card). NOT FIXED YET (see :data:`V3_FIXED`)."""
V3_FIXED = False
"""Whether the card has fixed world v3's manipulation and DPO budget (the regime search). Until it has, no v3
comparison runs: ``mlc transfer --world v3`` refuses (no MLC run of any kind before the world is fixed)."""

ALIGN_V3 = replace(ALIGN, dpo_steps=DPO_BUDGET[0], learning_rate=DPO_BUDGET[1], beta=DPO_BUDGET[2], precision="fp32",
                   eval_per_kind=64)  # fmt: skip
"""v2's alignment settings with v3's DPO budget, fp32 throughout, 64 + 64 held-out prompts per language."""


@dataclass(frozen=True)
class Arm:
    """One pre-registered DPO+MLC arm: the MLC settings it overrides in :data:`ALIGN_V3`."""

    name: str
    objective: str
    tau: float
    weight: float
    layer: int | str
    aux_every: int
    extractor: str
    rep_size: int
    guard: str = ""

    def align(self, base: AlignConfig) -> AlignConfig:
        return replace(base, mlc_objective=self.objective, mlc_tau=self.tau, mlc_weight=self.weight,
                       mlc_layer=self.layer, mlc_aux_every=self.aux_every, mlc_extractor=self.extractor,
                       mlc_rep_size=self.rep_size, mlc_guard=self.guard)  # fmt: skip


DPO = "dpo"
AUTHORS = Arm("authors", "relative_sv_softmax", 0.2, 0.8, "final", 2, "linear", AUTHORS_REP_SIZE)
"""The primary arm: the MLC authors' configuration (their objective, tau, weight, schedule, post-norm final state,
trainable extractor with bias), the extractor scaled to the world's model."""
ANCHOR = Arm("anchor_cos+center", "anchor_cos", 1.0, 0.3, 3, 1, "centred", HIDDEN_SIZE, "center")
"""The one secondary arm: v2's best (round 1, its weight rule's 0.3, layer 3, every step), unchanged."""
ARMS = (AUTHORS, ANCHOR)


@dataclass(frozen=True)
class V3Config:
    """One v3 comparison: world seeds (each its own pretraining), alignment seeds, arms, settings."""

    world_seeds: tuple[int, ...] = tuple(range(8))
    seeds: tuple[int, ...] = (0, 1, 2)
    model: ModelConfig = MODEL
    align: AlignConfig = ALIGN_V3
    arms: tuple[Arm, ...] = ARMS
    gate_train_prompts: int = 512
    gate_test_prompts: int = 256

    def world(self, seed: int) -> WorldConfig:
        return world_config("v3", seed)


FULL = V3Config()
QUICK = V3Config(world_seeds=(0,))


def parse_world_seeds(text: str) -> tuple[int, ...]:
    """``"0-7"`` -> ``(0, ..., 7)``; raises ``ValueError`` naming ``--world-seeds``."""
    parts = text.split("-")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or int(parts[0]) > int(parts[1]):
        raise ValueError(f"--world-seeds must be a range a-b of integers with 0 <= a <= b, got {text!r}")
    return tuple(range(int(parts[0]), int(parts[1]) + 1))


T95 = (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812, 1.796, 1.782, 1.771, 1.761, 1.753)
"""One-sided 95% Student t quantiles for 1..15 degrees of freedom (beyond: 1.645)."""


def lower_bound(values: list[float]) -> float:
    """Lower one-sided 95% bound of the mean of ``values`` (Student t over them; nan for fewer than 2)."""
    if len(values) < 2:
        return math.nan
    t = T95[len(values) - 2] if len(values) - 1 <= len(T95) else 1.645
    return statistics.mean(values) - t * statistics.stdev(values) / math.sqrt(len(values))


def _non_base(result: dict, languages: list[str]) -> float:
    return statistics.mean(discrimination(result[lang]) for lang in languages[1:])


def analyse(rows: dict[str, dict[str, dict]], languages: list[str], arm: str, gates: dict[int, dict]) -> dict:
    """The pre-registered analysis of ``arm`` against DPO. ``rows``: row -> ``"w<world>s<seed>"`` -> per-language
    behaviour; ``gates``: world seed -> :func:`.gate.v3_gate` result. Per world seed: D0 and D1 (mean over alignment
    seeds of the non-base mean discrimination), the gain D1 - D0; over world seeds: their means, the mean gain, its
    lower one-sided 95% bound (t over world seeds; with one world seed, over its alignment seeds), the base check
    (every run's base discrimination >= DPO's in the same world and seed minus 5), the decision, and the same on
    the world seeds that pass the gate (secondary). Secondary endpoints per world seed: cal1 discrimination and
    the non-base safety."""
    base = languages[0]
    worlds = sorted({int(k[1:].split("s")[0]) for k in rows[DPO]})
    per_world: dict[int, dict] = {}
    run_gains = []
    base_ok = True
    for w in worlds:
        keys = sorted(k for k in rows[DPO] if int(k[1:].split("s")[0]) == w)
        d0 = [_non_base(rows[DPO][k], languages) for k in keys]
        d1 = [_non_base(rows[arm][k], languages) for k in keys]
        run_gains += [b - a for a, b in zip(d0, d1, strict=True)]
        base_ok &= all(discrimination(rows[arm][k][base]) >= discrimination(rows[DPO][k][base]) - 5 for k in keys)
        per_world[w] = {
            "dpo": statistics.mean(d0), "arm": statistics.mean(d1), "gain": statistics.mean(d1) - statistics.mean(d0),
            "cal1_dpo": statistics.mean(discrimination(rows[DPO][k]["cal1"]) for k in keys),
            "cal1_arm": statistics.mean(discrimination(rows[arm][k]["cal1"]) for k in keys),
            "safety_dpo": statistics.mean(statistics.mean(rows[DPO][k][lang]["safety"] for lang in languages[1:])
                                          for k in keys),
            "safety_arm": statistics.mean(statistics.mean(rows[arm][k][lang]["safety"] for lang in languages[1:])
                                          for k in keys),
            "base_dpo": statistics.mean(discrimination(rows[DPO][k][base]) for k in keys),
            "base_arm": statistics.mean(discrimination(rows[arm][k][base]) for k in keys),
            "gate": bool(gates.get(w, {}).get("passed", False)),
        }  # fmt: skip

    def summary(ws: list[int]) -> dict:
        if not ws:
            return {"worlds": 0}
        gains = [per_world[w]["gain"] for w in ws]
        low = lower_bound(gains) if len(ws) > 1 else lower_bound(run_gains)
        mean = {key: statistics.mean(per_world[w][key] for w in ws) for key in per_world[ws[0]] if key != "gate"}
        positive = mean["gain"] >= 20 and low > 0 and base_ok
        return {"worlds": len(ws), **mean, "ci_low": low, "base_ok": base_ok, "positive": positive}

    return {"arm": arm, "per_world": per_world, "all": summary(worlds),
            "gate_passing": summary([w for w in worlds if per_world[w]["gate"]]),
            "gate": "pass" if all(per_world[w]["gate"] for w in worlds) else "fail"}  # fmt: skip


def final_line(analysis: dict) -> str:
    """``transfer: world=v3 gate=G worlds=W dpo=D0 dpo+mlc=D1 arm=A gain=X ci_low=L base_dpo=B0 base_dpo+mlc=B1``
    (the primary analysis: every world seed; B0, B1: base-language discrimination)."""
    a = analysis["all"]
    return (f"transfer: world=v3 gate={analysis['gate']} worlds={a['worlds']} dpo={a['dpo']:.1f} "
            f"dpo+mlc={a['arm']:.1f} arm={analysis['arm']} gain={a['gain']:.1f} ci_low={a['ci_low']:.1f} "
            f"base_dpo={a['base_dpo']:.1f} base_dpo+mlc={a['base_arm']:.1f}")  # fmt: skip


def format_analysis(analysis: dict) -> str:
    """Per world seed: gate, D0, D1, gain, cal1 and base discrimination; then the pooled rows and the decision."""
    lines = [f"arm {analysis['arm']} vs DPO, per world seed (means over alignment seeds; D = mean non-base "
             "discrimination)",
             f"{'world':<7}{'gate':>6}{'D0':>8}{'D1':>8}{'gain':>8}{'cal1 D0':>9}{'cal1 D1':>9}{'base D0':>9}"
             f"{'base D1':>9}"]  # fmt: skip
    for w, r in analysis["per_world"].items():
        gate = "pass" if r["gate"] else "fail"
        lines.append(f"{w:<7}{gate:>6}{r['dpo']:>8.1f}{r['arm']:>8.1f}{r['gain']:>8.1f}{r['cal1_dpo']:>9.1f}"
                     f"{r['cal1_arm']:>9.1f}{r['base_dpo']:>9.1f}{r['base_arm']:>9.1f}")  # fmt: skip
    for title, key in (("all world seeds (primary)", "all"), ("gate-passing world seeds (secondary)", "gate_passing")):
        a = analysis[key]
        if not a["worlds"]:
            lines.append(f"{title}: none")
            continue
        lines.append(f"{title}: worlds {a['worlds']}, D0 {a['dpo']:.1f}, D1 {a['arm']:.1f}, gain {a['gain']:.1f}, "
                     f"lower 95% bound {a['ci_low']:.1f}, cal1 {a['cal1_dpo']:.1f} -> {a['cal1_arm']:.1f}, "
                     f"non-base safety {a['safety_dpo']:.1f} -> {a['safety_arm']:.1f}, base never below DPO - 5: "
                     f"{a['base_ok']}; decision: {'positive' if a['positive'] else 'not positive'}")  # fmt: skip
    return "\n".join(lines)


def _pretrain_job(args: tuple) -> str:
    """A worker's pretraining of one world seed into the cache (one thread); returns the world seed's note."""
    import torch

    world_cfg, model_cfg, cache_dir = args
    torch.set_num_threads(1)
    pretrained(World(world_cfg), model_cfg, Path(cache_dir), lambda *a: None)
    return f"world seed {world_cfg.seed} pretrained"


def run_comparison(config: V3Config, cache_dir: Path, log=print, progress=None, workers: int = 1,
                   threads: int = 1) -> dict:  # fmt: skip
    """Pretrain (``workers`` world seeds at a time, cached), measure the gate's representation on each world seed,
    run DPO and every arm for each world seed x alignment seed, apply the v3 gate and the analysis."""
    start = time.time()
    models_cfg = {w: replace(config.model, seed=w) for w in config.world_seeds}
    if workers > 1 and len(config.world_seeds) > 1:
        jobs = [(config.world(w), models_cfg[w], str(cache_dir)) for w in config.world_seeds]
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for note in pool.map(_pretrain_job, jobs):
                log(note)
    t_pre = time.time() - start
    languages = [lang.code for lang in config.world(config.world_seeds[0]).languages]
    rows: dict[str, dict[str, dict]] = {"base model": {}, DPO: {}}
    collapse: dict[str, dict[str, dict]] = {"base model": {}, DPO: {}}
    curves: dict[str, dict[str, list]] = {}
    measures, keys, tasks = {}, [], []
    runs_dir = Path(cache_dir) / "runs"
    for w in config.world_seeds:
        world = World(config.world(w))
        model, tokenizer, _ = pretrained(world, models_cfg[w], cache_dir, log, shipped=False)
        measures[w] = measure(model, tokenizer, world, config.gate_train_prompts, config.gate_test_prompts)
        base = measures[w]["behaviour"]
        base_collapse = collapse_stats(model, tokenizer, world, config.align)
        for seed in config.seeds:
            key = f"w{w}s{seed}"
            rows["base model"][key], collapse["base model"][key] = base, base_collapse
            for name, align, condition in [
                (DPO, config.align, "dpo"),
                *((a.name, a.align(config.align), "dpo+mlc") for a in config.arms),
            ]:
                keys.append((name, key))
                tasks.append(RunTask(world.config, models_cfg[w], condition, align, seed, runs_dir, model, tokenizer,
                                     f"{key} {name}"))  # fmt: skip
    for (name, key), run in zip(keys, run_tasks(tasks, workers, threads, progress), strict=True):
        rows.setdefault(name, {})[key] = run["behaviour"]
        collapse.setdefault(name, {})[key] = run["collapse"]
        curves.setdefault(name, {})[key] = run["curve"]
    gates = {w: v3_gate(measures[w], [rows[DPO][f"w{w}s{s}"] for s in config.seeds]) for w in config.world_seeds}
    analyses = {a.name: analyse(rows, languages, a.name, gates) for a in config.arms}
    return {"languages": languages, "rows": rows, "collapse": collapse, "curves": curves, "gates": gates,
            "measures": measures, "analyses": analyses, "layer": "per arm",
            "weights": {a.name: a.weight for a in config.arms},
            "timings": {"pretrain_s": t_pre, "total_s": time.time() - start}}  # fmt: skip


def format_gates(gates: dict[int, dict]) -> str:
    """The v3 gate per world seed (cal1's best probe transfer and cosine, DPO discriminations, checks)."""
    lines = ["v3 gate per world seed (cal1: best probe transfer and direction cosine over layers, layers where "
             "both hold; DPO discrimination, mean of alignment seeds)"]  # fmt: skip
    for w, g in gates.items():
        failed = ", ".join(k for k, v in g["checks"].items() if not v)
        lines.append(f"world {w}: probe {g['probe']:.3f} cosine {g['cosine']:.3f} layers {g['layers']} cal1 DPO "
                     f"{g['dpo_discrimination']:.1f} base DPO {g['base_discrimination']:.1f} -> "
                     f"{'pass' if g['passed'] else 'fail'} ({failed})")  # fmt: skip
    return "\n".join(lines)


def report(config: V3Config, out: Path, cache_dir: Path, command: str = "", log=print, progress=None,
           workers: int = 1, threads: int = 1) -> str:  # fmt: skip
    """Run :func:`run_comparison`, write ``transfer_v3.{txt,csv,json,png}``, print the tables and the last line
    (the primary arm's analysis over every world seed)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = run_comparison(config, cache_dir, log, progress, workers, threads)
    primary = results["analyses"][config.arms[0].name]
    line = final_line(primary)
    analyses = "\n\n".join(format_analysis(a) for a in results["analyses"].values())
    t = results["timings"]
    header = (f"{command}\nworld v3, world seeds {list(config.world_seeds)}, alignment seeds {list(config.seeds)}; "
              f"DPO {config.align.dpo_steps} steps lr {config.align.learning_rate:g} beta {config.align.beta:g}; "
              f"pretraining {t['pretrain_s']:.0f} s; total {t['total_s']:.0f} s")  # fmt: skip
    text = f"{header}\n{format_gates(results['gates'])}\n\n{analyses}\n\n{format_tables(results)}\n\n{line}\n"
    write_run_files(results, out, "transfer_v3", text)
    log(f"\n{format_gates(results['gates'])}\n\n{analyses}\n\nwrote {out}/transfer_v3.txt, .csv, .json, .png")
    log(line)
    return line


def run_from_args(args) -> str:
    """``mlc transfer --world v3``: check the options (:class:`UsageError` naming the option), then :func:`report`."""
    workers = args.workers if args.workers is not None else default_workers()
    for name in ("mlc_layer", "mlc_weight", "mlc_tau"):
        if getattr(args, name, None) is not None:
            raise UsageError(f"--{name.replace('_', '-')} is not an option of --world v3 (its arms are pre-registered)")
    try:
        config = QUICK if args.quick else FULL
        if args.world_seed is not None and getattr(args, "world_seeds", None) is not None:
            raise ValueError("--world-seed and --world-seeds: give one of them")
        if args.world_seed is not None:
            if args.world_seed < 0:
                raise ValueError(f"--world-seed must be >= 0, got {args.world_seed}")
            config = replace(config, world_seeds=(args.world_seed,))
        if getattr(args, "world_seeds", None) is not None:
            config = replace(config, world_seeds=parse_world_seeds(args.world_seeds))
        if args.seeds is not None:
            config = replace(config, seeds=parse_seeds(args.seeds))
        if workers < 1:
            raise ValueError(f"--workers must be >= 1, got {workers}")
        names = ("out", "cache_dir", "seeds", "world_seed", "world_seeds", "threads", "workers")
        cache, command = run_settings(args, "mlc transfer --world v3", names)
    except ValueError as err:
        raise UsageError(str(err)) from err
    if cache is None:
        raise UsageError("--no-cache is not an option of --world v3 (its world seeds are pretrained into the cache)")
    if not V3_FIXED:
        raise UsageError(
            "--world v3: the world's manipulation and DPO budget are not fixed yet (the regime search in "
            "experiments/transfer/WORLD_CARD.md found none that holds); no v3 comparison runs before"
        )
    return report(config, Path(args.out), cache, command=command, progress=Progress(), workers=workers,
                  threads=args.threads or 1)  # fmt: skip
