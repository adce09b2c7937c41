"""World v2's research steps, one at a time (the record: ``WORLD_CARD.md`` next to this file)::

    python -m experiments.transfer.v2 gate --out DIR [--cache-dir DIR] [--world-seeds 0,1]
    python -m experiments.transfer.v2 weights --conditions NAME[,NAME] --world-seeds 0 --out DIR
    python -m experiments.transfer.v2 runs --conditions NAME[,NAME] --seeds 0,1,2 [--cache-dir DIR]

``gate``: the pre-condition gate on each world seed's pretrained model (``gate.txt``, ``gate.json``);
``weights``: the weight rule's runs, evaluated in the base language only (``weights_<names>.json``); ``runs``:
fill the per-run result cache that ``mlc transfer`` reads, printing no result.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from mlc_kernels.transfer.align import AlignConfig, align_model
from mlc_kernels.transfer.evaluation import behaviour
from mlc_kernels.transfer.gate import format_gate
from mlc_kernels.transfer.options import parse_seeds
from mlc_kernels.transfer.pretrain import DEFAULT_CACHE
from mlc_kernels.transfer.protocol import DPO, V2Config, arm, condition_align, pick_weight
from mlc_kernels.transfer.runs import align_and_evaluate
from mlc_kernels.transfer.v2 import run_gate


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
    """``python -m experiments.transfer.v2 gate|weights|runs`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m experiments.transfer.v2", description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("gate", "weights", "runs"))
    parser.add_argument("--conditions", default=None, help="comma list of condition names (weights, runs)")
    parser.add_argument("--seeds", default="0,1,2", help="alignment seeds (runs)")
    parser.add_argument("--out", default="transfer_v2_out")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--world-seeds", default="0,1")
    args = parser.parse_args(argv)
    import datasets
    import transformers

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
