"""Sweep of the MLC settings (layer, weight, tau) on the quick world: why transfer does or does not appear.

``python -m experiments.transfer.study --layers 1,2,3 --weights 0.1,1 --taus 1 --seeds 0 --out DIR``

For each seed the algorithm without MLC is run once, then the algorithm with MLC at every grid point; the
world, the pretrained model and every other setting are the quick mode's. One CSV line per run:
base-language safety, mean non-base safety and helpfulness (percent), per-language safety, and the
centred layer-k consistency (s1 share, between-prompt cosine) at the run's own layer.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import statistics
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from experiments.transfer.v1 import QUICK
from mlc_kernels.hf import decoder_layers, last_prompt_hidden
from mlc_kernels.transfer.align import EXTRACTORS, AlignConfig, align_model, consistency
from mlc_kernels.transfer.evaluation import behaviour, prompt_ids
from mlc_kernels.transfer.options import parse_seeds
from mlc_kernels.transfer.pretrain import DEFAULT_CACHE, pretrained
from mlc_kernels.transfer.world import PRIVATE_FRAMES, PRIVATE_ITEMS, World

FIELDS = ("prompts", "algorithm", "extractor", "generation_prompt", "parallel_share", "pretrain_steps", "layer",
          "weight", "tau", "seed", "base_safety", "safety", "helpfulness", "s1_share", "between_prompt_cosine",
          "seconds")


def _floats(text: str, name: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"study: {name} must be a comma list of numbers, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise SystemExit(f"study: {name} must be > 0, got {text!r}")
    return values


def run_study(algorithm: str, grid: list[tuple[int, float, float]], seeds: tuple[int, ...], out: Path,
              cache_dir: Path | None, base: AlignConfig = QUICK.align, parallel_share: float = 0.0,
              pretrain_steps: int = QUICK.model.steps, on_training_prompts: bool = False,
              log=print) -> list[dict]:  # fmt: skip
    """Run the grid of ``(layer, weight, tau)`` over ``base`` (the other MLC options); the first row of each seed
    is the run without MLC. Pretraining studies: ``parallel_share`` > 0 adds parallel text (the quick world
    has none), ``pretrain_steps`` changes the amount of pretraining. ``on_training_prompts``: behaviour on the
    prompts trained on (and their translations) instead of held-out ones. Writes (appends to) ``study.csv``."""
    world = World(replace(QUICK.world, parallel_share=parallel_share))
    model, tokenizer, _ = pretrained(world, replace(QUICK.model, steps=pretrain_steps), cache_dir, log)
    derived = world.config.derived
    rows = []
    out.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        settings = [(base.mlc_layer, 0.0, base.mlc_tau), *grid]
        for layer, weight, tau in settings:
            start = time.time()
            align = replace(base, mlc_layer=layer, mlc_weight=weight or 1.0, mlc_tau=tau)
            condition = f"{algorithm}+mlc" if weight else algorithm
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                aligned, _ = align_model(model, tokenizer, world, condition, align, seed)
            result = behaviour(aligned, tokenizer, world, align.eval_per_kind,
                               align.train_prompts if on_training_prompts else 0)  # fmt: skip
            stats = consistency(aligned, tokenizer, world, align)
            row = {
                "prompts": "train" if on_training_prompts else "heldout", "algorithm": algorithm,
                "extractor": align.mlc_extractor if weight else "-",
                "generation_prompt": align.mlc_generation_prompt, "parallel_share": parallel_share,
                "pretrain_steps": pretrain_steps,
                "layer": layer, "weight": weight, "tau": tau, "seed": seed,
                "base_safety": result[world.config.base]["safety"],
                "safety": statistics.mean(result[lang]["safety"] for lang in derived),
                "helpfulness": statistics.mean(result[lang]["helpfulness"] for lang in derived),
                "s1_share": stats["s1_share"], "between_prompt_cosine": stats["between_prompt_cosine"],
                "seconds": time.time() - start,
                **{f"safety_{lang}": result[lang]["safety"] for lang in derived},
            }  # fmt: skip
            rows.append(row)
            log(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    with open(out / "study.csv", "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*FIELDS, *(f"safety_{lang}" for lang in derived)])
        if f.tell() == 0:
            writer.writeheader()
        writer.writerows({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in row.items()} for row in rows)
    return rows


@torch.no_grad()
def shared_directions(model, tokenizer, world: World) -> dict[int, dict[str, dict[str, float]]]:
    """Does the model share a decision direction across languages? Per layer and language, at the last prompt
    token (``<|assistant|>``): the mean state of unsafe minus benign alignment prompts, and of private-data
    requests minus ordinary requests (what the pretraining refuses); returned as cosines to the base
    language's direction (1 = the same direction, 0 = unrelated)."""
    def states(prompts: list[str], layer: int) -> torch.Tensor:
        ids = [prompt_ids(tokenizer, p) for p in prompts]
        width = max(map(len, ids))
        batch = torch.full((len(ids), width), tokenizer.pad_token_id)
        att = torch.zeros_like(batch)
        for row, tokens in enumerate(ids):
            batch[row, width - len(tokens) :], att[row, width - len(tokens) :] = torch.tensor(tokens), 1
        return last_prompt_hidden(model, batch, att, layer)

    records = world.alignment_records()[:256]
    result = {}
    for layer in range(1, len(decoder_layers(model)[0]) + 1):
        unsafe_dir, refusal_dir = {}, {}
        for lang in (spec.code for spec in world.config.languages):
            prompts = [r["prompt"] if lang == world.config.base else r["variants"][lang] for r in records]
            h = states(prompts, layer)
            unsafe = torch.tensor([r["kind"] == "unsafe" for r in records])
            unsafe_dir[lang] = h[unsafe].mean(0) - h[~unsafe].mean(0)
            private = [world.render(lang, f, item=i) for f in PRIVATE_FRAMES for i in PRIVATE_ITEMS]
            refusal_dir[lang] = states(private, layer).mean(0) - h.mean(0)
        base = world.config.base
        result[layer] = {
            name: {k: torch.nn.functional.cosine_similarity(v, dirs[base], dim=0).item() for k, v in dirs.items()}
            for name, dirs in (("unsafe_minus_benign", unsafe_dir), ("private_minus_request", refusal_dir))
        }
    return result


def format_directions(result: dict) -> str:
    lines = ["cosine of each language's direction to the base language's, at the last prompt token"]
    for name in ("unsafe_minus_benign", "private_minus_request"):
        langs = list(result[1][name])
        lines.append(f"{name:<24}" + "".join(f"{lang:>8}" for lang in langs))
        for layer, by_name in result.items():
            lines.append(f"{'  layer ' + str(layer):<24}" + "".join(f"{by_name[name][lang]:>8.2f}" for lang in langs))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import datasets
    import transformers

    parser = argparse.ArgumentParser(prog="python -m experiments.transfer.study", description=__doc__.splitlines()[0])
    parser.add_argument("--algorithm", default="dpo", choices=("dpo", "sft"))
    parser.add_argument("--layers", default="1,2,3")
    parser.add_argument("--weights", default="0.1,1")
    parser.add_argument("--taus", default="1")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--extractor", default="linear", choices=EXTRACTORS)
    parser.add_argument("--no-generation-prompt", action="store_true", help="last prompt token = the prompt's own")
    parser.add_argument("--parallel-share", type=float, default=0.0, help="pretrain with parallel text (study)")
    parser.add_argument("--pretrain-steps", type=int, default=QUICK.model.steps, help="pretraining amount (study)")
    parser.add_argument("--on-training-prompts", action="store_true", help="evaluate on the prompts trained on")
    parser.add_argument("--directions", action="store_true",
                        help="only: cosine of each language's unsafe-benign and refusal directions to the base's")
    parser.add_argument("--out", default="transfer_study", help="study.csv is appended to")
    args = parser.parse_args(argv)
    try:
        layers = [int(v) for v in args.layers.split(",")]
        seeds = parse_seeds(args.seeds)
    except ValueError as err:
        raise SystemExit(f"study: --layers / --seeds: {err}") from None
    if any(not 1 <= k <= QUICK.model.layers for k in layers):
        raise SystemExit(f"study: --layers must be in 1..{QUICK.model.layers}, got {args.layers!r}")
    grid = list(itertools.product(layers, _floats(args.weights, "--weights"), _floats(args.taus, "--taus")))
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    if not 0 <= args.parallel_share <= 1:
        raise SystemExit(f"study: --parallel-share must be in [0, 1], got {args.parallel_share}")
    if args.pretrain_steps < 1:
        raise SystemExit(f"study: --pretrain-steps must be >= 1, got {args.pretrain_steps}")
    base = replace(QUICK.align, mlc_extractor=args.extractor, mlc_generation_prompt=not args.no_generation_prompt)
    if args.directions:
        world = World(replace(QUICK.world, parallel_share=args.parallel_share))
        model, tokenizer, _ = pretrained(world, replace(QUICK.model, steps=args.pretrain_steps), DEFAULT_CACHE)
        table = format_directions(shared_directions(model, tokenizer, world))
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "directions.txt").write_text(table + "\n")
        print(table)
        return
    run_study(args.algorithm, grid, seeds, Path(args.out), DEFAULT_CACHE, base, args.parallel_share,
              args.pretrain_steps, args.on_training_prompts)


if __name__ == "__main__":
    main()
