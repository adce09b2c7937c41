"""``mlc demo``: base-language DPO vs DPO+MLC on the shipped world-v2 model, evaluated in every language.

The model (4 layers, hidden 64) and its tokenizer ship in ``mlc_kernels/transfer/data/world_v2/``: produced by
:func:`.pretrain.pretrained` for world v2, seed 0 (``recipe.json``). The demo copies them to
``<out>/model`` and a small data file in the world's languages to ``<out>/data.jsonl`` (so ``mlc train --model
<out>/model --dataset <out>/data.jsonl --languages base,high1,high2,low1,low2`` runs offline on records the model
reads), aligns them in the base language only
with DPO and with DPO+MLC (the condition :data:`DEMO_CONDITION`), and prints per-language safety,
helpfulness and discrimination before and after, with the collapse diagnostics; PNGs go to ``<out>``.
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from dataclasses import replace
from pathlib import Path

from .align import consistency
from .evaluation import behaviour
from .pretrain import SHIPPED, load_shipped
from .protocol import ALIGN, CONDITIONS, MODEL, V2Config, condition_align
from .report import Progress, discrimination, plot_bars, plot_curves
from .runs import RunTask, default_workers, fixed_numerics, run_tasks
from .world import World, world_config

DEMO_DATA_RECORDS = 64
"""Records in ``<out>/data.jsonl``: the first of the world's alignment records (every language, DPO and SFT)."""

DEMO_NUMERICS = "fp32, eager attention, one torch thread per run"
"""How the demo computes: not TRL's default bf16 autocast, whose CPU results depend on the processor's bf16
instructions (the same install gave +5.9 and +9.0 with and without them), nor the sdpa kernels that library
versions choose; so its table is the recorded one (``tests/test_first_hour_demo.py``; the same with AVX2 or AVX-512
kernels)."""

DEMO_CONDITION = "anchor_cos+center"
"""The DPO+MLC condition the demo runs (a name of :data:`.protocol.CONDITIONS`)."""


class _StepBar:
    """One progress bar over the optimizer steps of both runs (drawn by :class:`.report.Progress`)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.draw = total, 0, Progress()

    def step(self) -> None:
        self.done += 1
        self.draw(self.done, self.total, "alignment steps")


def format_demo(rows: dict[str, dict], collapse: dict[str, dict], languages: list[str]) -> str:
    """The concise table: per language safety / helpfulness / discrimination per row; collapse diagnostics."""
    lines = [f"{'':<12}" + "".join(f"{lang:>16}" for lang in languages) + f"{'non-base avg':>16}",
             f"{'':<12}" + "".join(f"{'saf/help/disc':>16}" for _ in [*languages, 0])]  # fmt: skip
    for name, result in rows.items():
        cells = [f"{r['safety']:.0f}/{r['helpfulness']:.0f}/{discrimination(r):+.0f}" for r in
                 (result[lang] for lang in languages)]  # fmt: skip
        avg = {k: statistics.mean(result[lang][k] for lang in languages[1:]) for k in ("safety", "helpfulness")}
        cells.append(f"{avg['safety']:.0f}/{avg['helpfulness']:.0f}/{discrimination(avg):+.0f}")
        lines.append(f"{name:<12}" + "".join(f"{c:>16}" for c in cells))
    lines.append("")
    lines.append("collapse diagnostics (held-out prompts, centred layer-k hidden states; 1 = every prompt on one "
                 "direction):")  # fmt: skip
    for name, stats in collapse.items():
        extra = "".join(f", {k} {v:.3f}" for k, v in stats.items() if isinstance(v, float)
                        and k not in ("between_prompt_cosine", "between_raw", "s1_share"))  # fmt: skip
        lines.append(f"  {name:<10} between-prompt cosine {stats['between_prompt_cosine']:.3f}, s1 share "
                     f"{stats['s1_share']:.3f}{extra}")  # fmt: skip
    return "\n".join(lines)


def write_demo_data(world: World, path: Path, count: int = DEMO_DATA_RECORDS) -> Path:
    """``count`` of ``world``'s alignment records as this package's JSONL (prompt, chosen, rejected, completion,
    variants in every derived language): data the demo model reads, for ``mlc train``/``mlc eval``."""
    import json

    keys = ("prompt", "chosen", "rejected", "completion", "variants")
    lines = [json.dumps({k: r[k] for k in keys}, ensure_ascii=False) for r in world.alignment_records()[:count]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def save_demo_start(out: Path, model_path: Path = SHIPPED):
    """The shipped model and tokenizer in ``<out>/model``, the world's records in ``<out>/data.jsonl``; returns
    ``(model, tokenizer, recipe, world)``."""
    model, tokenizer, recipe = load_shipped(model_path)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    world = World(world_config(recipe["world"], recipe["world_seed"]))
    write_demo_data(world, out / "data.jsonl")
    return model, tokenizer, recipe, world


def run_demo(out_dir: Path | str = "mlc_demo", steps: int = 120, seed: int = 0, condition: str = DEMO_CONDITION,
             mlc_weight: float | None = None, per_kind: int = 64, model_path: Path = SHIPPED,
             log=print, workers: int | None = None) -> dict:  # fmt: skip
    """The demo (see the module docstring); the two alignment runs go side by side in ``workers`` processes
    (default: one per CPU core; 1: one after the other in this process). Returns ``{"rows", "collapse", "curves",
    "seconds", "gain"}``."""
    import datasets
    import transformers

    start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    logging.getLogger("mlc_kernels.trainers").setLevel(logging.ERROR)  # the collapse warning: shown in the table
    model, tokenizer, recipe, world = save_demo_start(out, model_path)
    model.set_attn_implementation("eager")  # fp32, one fixed attention kernel, one thread: see DEMO_NUMERICS
    layer = recipe.get("mlc_layer", 3)
    cond = next((c for c in CONDITIONS if c.name == condition), None)
    if cond is None:
        raise ValueError(f"condition must be one of {[c.name for c in CONDITIONS]}, got {condition!r}")
    weight = mlc_weight if mlc_weight is not None else V2Config().weight(cond.name)
    base_align = replace(ALIGN, dpo_steps=steps, mlc_layer=layer, eval_per_kind=per_kind, precision="fp32")
    languages = [lang.code for lang in world.config.languages]
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"mlc demo: world v2 model ({n_params / 1e6:.2f}M parameters, {model.config.num_hidden_layers} layers, "
        f"pretrained on code-switched text in {len(languages)} languages, shipped); DPO on {base_align.train_prompts} "
        f"base-language prompts, {steps} steps, with and without MLC ({cond.name}, weight {weight:g}, layer {layer})"
    )
    rows, collapse, curves = {}, {}, {}
    with warnings.catch_warnings(), fixed_numerics(threads=1):
        warnings.simplefilter("ignore")
        rows["base model"] = behaviour(model, tokenizer, world, per_kind)
        collapse["base model"] = consistency(model, tokenizer, world, base_align)
        mlc_align = condition_align(base_align, cond, weight, layer)
        bar = _StepBar(2 * steps + cond.lead_steps)
        arms = (("DPO", "dpo", base_align), ("DPO+MLC", "dpo+mlc", mlc_align))
        tasks = [RunTask(world.config, MODEL, condition_name, align, seed, None, model, tokenizer, name)
                 for name, condition_name, align in arms]  # fmt: skip
        workers = workers if workers is not None else default_workers()
        for (name, _, _), run in zip(arms, run_tasks(tasks, workers, threads=1, on_step=bar.step), strict=True):
            rows[name], collapse[name] = run["behaviour"], run["collapse"]
            curves[name] = {"demo": run["curve"]}
    log("per language, held-out prompts: safety % / helpfulness % / discrimination (safety + helpfulness - 100)")
    log(format_demo(rows, collapse, languages))
    gain = (statistics.mean(discrimination(rows["DPO+MLC"][lang]) for lang in languages[1:])
            - statistics.mean(discrimination(rows["DPO"][lang]) for lang in languages[1:]))  # fmt: skip
    verdict = "MLC helped" if gain >= 5 else "MLC made no clear difference" if gain > -5 else "MLC hurt"
    log(f"{verdict}: non-base discrimination DPO+MLC - DPO = {gain:+.1f} points (one alignment seed of one world; "
        "`mlc transfer --quick` runs 3 seeds and the pre-registered arms; on a second world seed no MLC arm beats "
        "DPO: README, 'Cross-lingual transfer')")  # fmt: skip
    results = {"languages": languages, "rows": {k: {"demo": v} for k, v in rows.items()}}
    plot_bars(results, out / "mlc_demo_languages.png",
              title="mlc demo: discrimination per language (base-language alignment only)")  # fmt: skip
    plot_curves(curves, out / "mlc_demo_steps.png")
    seconds = time.time() - start
    log(f"wrote {out / 'mlc_demo_languages.png'}, {out / 'mlc_demo_steps.png'}, the starting model in "
        f"{out / 'model'} and data it reads in {out / 'data.jsonl'} ({seconds:.0f} s); next: mlc train --model "
        f"{out / 'model'} --dataset {out / 'data.jsonl'} --languages {','.join(languages)} "
        f"--mlc-layer {layer}")  # fmt: skip
    return {"rows": rows, "collapse": collapse, "curves": curves, "seconds": seconds, "gain": gain}
