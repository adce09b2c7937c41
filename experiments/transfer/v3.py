"""World v3's research steps (the record: ``WORLD_CARD.md`` next to this file, section "World v3")::

    python -m experiments.transfer.v3 search --manipulation M1 --world-seeds 0-3 --budgets 120@1e-3,40@3e-4 \
        --out DIR [--workers 2] [--cache-dir DIR]

``search``: DPO-only regime search (no MLC run of any kind): per world seed, pretrain (cached) the world of the
manipulation, measure the representation (probe transfer and direction cosine per layer, the unaligned model's
behaviour) and run base-only DPO at each budget (``steps@lr``) for alignment seeds 0, 1, 2; writes
``search_<manipulation>_w<seed>.json`` per world seed and ``search_<manipulation>.txt`` (the v3 gate per world seed
and budget).

    python -m experiments.transfer.v3 summary --dir DIR [--budget 20@0.001@0.01]

``summary``: every manipulation searched so far (``search_<M>_w<seed>.json`` in DIR) at one DPO budget: the v3 gate
per manipulation (world seeds measured, passed, which check failed), and the trade-off between the two
requirements over all (manipulation, world seed) pairs: cal1's DPO discrimination where its representation is
shared vs where it is not, and the rank correlation of cal1's best direction cosine with it. Writes
``search_summary.txt`` to DIR.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

from mlc_kernels.transfer.pretrain import DEFAULT_CACHE


def parse_budgets(text: str) -> list[tuple[int, float, float]]:
    """``"120@1e-3,40@1e-3@0.01"`` -> ``[(120, 0.001, 0.1), (40, 0.001, 0.01)]`` (DPO steps @ learning rate [@ beta,
    default v2's 0.1]); ``""`` -> ``[]`` (pretraining and representation only)."""
    budgets = []
    for part in filter(None, text.split(",")):
        steps, lr, *beta = part.split("@")
        budgets.append((int(steps), float(lr), float(beta[0]) if beta else 0.1))
    return budgets


def parse_range(text: str) -> tuple[int, ...]:
    """``"0-3"`` -> ``(0, 1, 2, 3)``; ``"0,2"`` -> ``(0, 2)``."""
    if "-" in text:
        low, high = text.split("-")
        return tuple(range(int(low), int(high) + 1))
    return tuple(int(p) for p in text.split(","))


def search_world(manipulation: str, world_seed: int, budgets: list[tuple[int, float, float]], seeds: tuple[int, ...],
                 cache_dir: str, eval_per_kind: int = 64) -> dict:  # fmt: skip
    """One world seed of the search: pretraining (cached), the gate's measurements, base-only DPO per budget."""
    import datasets
    import torch
    import transformers

    from mlc_kernels.transfer.gate import measure
    from mlc_kernels.transfer.pretrain import pretrained
    from mlc_kernels.transfer.protocol import MODEL
    from mlc_kernels.transfer.runs import align_and_evaluate
    from mlc_kernels.transfer.v3 import ALIGN_V3
    from mlc_kernels.transfer.world import World, v3_config

    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    warnings.simplefilter("ignore")
    start = time.time()
    world = World(v3_config(world_seed, manipulation))
    model_config = replace(MODEL, seed=world_seed)
    model, tokenizer, cached = pretrained(world, model_config, Path(cache_dir), lambda *a: None)
    t_pre = time.time() - start
    gate = measure(model, tokenizer, world, 512, 256)
    dpo = {}
    for steps, lr, beta in budgets:
        align = replace(ALIGN_V3, dpo_steps=steps, learning_rate=lr, beta=beta, eval_per_kind=eval_per_kind)
        dpo[f"{steps}@{lr:g}@{beta:g}"] = [align_and_evaluate(model, tokenizer, world, model_config, "dpo", align, seed,
                                                     Path(cache_dir) / "runs") for seed in seeds]  # fmt: skip
    return {"manipulation": manipulation, "world_seed": world_seed, "gate": gate, "dpo": dpo,
            "pretrain_s": t_pre, "pretrain_cached": cached, "total_s": time.time() - start}  # fmt: skip


def summary_lines(result: dict) -> list[str]:
    """The v3 gate of one world seed per budget, plus cal1's probe/cosine per layer and the final DPO loss."""
    from mlc_kernels.transfer.gate import v3_gate
    from mlc_kernels.transfer.report import discrimination

    gate = result["gate"]
    centred = gate.get("probe_centred", gate["probe"])
    per_layer = " ".join(f"L{layer} {gate['probe'][layer]['cal1']:.2f}/{centred[layer]['cal1']:.2f}/"
                         f"{gate['cosine'][layer]['cal1']:.2f}" for layer in gate["probe"])  # fmt: skip
    base_model = gate["behaviour"]
    lines = [f"{result['manipulation']} world {result['world_seed']}: cal1 probe/centred probe/cosine per layer "
             f"{per_layer}; "
             f"unaligned safety max {max(b['safety'] for b in base_model.values()):.1f}, cal1 private refusal "
             f"{base_model['cal1']['private_refusal']:.1f} ({result['total_s']:.0f} s)"]  # fmt: skip
    for budget, runs in result["dpo"].items():
        beh = [r["behaviour"] for r in runs]
        g = v3_gate(gate, beh)
        losses = [r["curve"][-1]["loss"] for r in runs if r["curve"]]
        langs = " ".join(f"{lang} {sum(discrimination(b[lang]) for b in beh) / len(beh):.1f}" for lang in beh[0])
        lines.append(f"  DPO {budget}: gate={'pass' if g['passed'] else 'fail'} cal1 dpo discr "
                     f"{g['dpo_discrimination']:.1f} (seeds " + ", ".join(f"{discrimination(b['cal1']):.1f}"
                     for b in beh) + f"), base {g['base_discrimination']:.1f}; final DPO loss "
                     + ", ".join(f"{v:.3f}" for v in losses) + f"; all: {langs}")  # fmt: skip
    return lines


def _ranks(values: list[float]) -> list[float]:
    """Average ranks (1-based; ties share their mean rank)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (Pearson's on average ranks); NaN when either side is constant."""
    import statistics

    rx, ry = _ranks(x), _ranks(y)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / (sxx * syy) ** 0.5 if sxx and syy else float("nan")


def summarise(results: list[dict], budget: str) -> list[str]:
    """The lines of ``summary`` (see the module docstring) from search results that ran ``budget``."""
    import statistics

    from mlc_kernels.transfer.gate import v3_gate

    by_manipulation: dict[str, list[dict]] = {}
    pairs = []
    for result in sorted(results, key=lambda r: (r["manipulation"], r["world_seed"])):
        if budget not in result["dpo"]:
            continue
        g = v3_gate(result["gate"], [r["behaviour"] for r in result["dpo"][budget]])
        g["world_seed"] = result["world_seed"]
        by_manipulation.setdefault(result["manipulation"], []).append(g)
        pairs.append((g["checks"]["shared_representation"], g["cosine"], g["dpo_discrimination"]))
    lines = [f"v3 regime search at DPO budget {budget} (steps@lr@beta): the gate per manipulation"]
    for name, gates in by_manipulation.items():
        fails = {k: sum(not g["checks"][k] for g in gates) for k in gates[0]["checks"]}
        lines.append(f"{name}: world seeds {[g['world_seed'] for g in gates]}, gate passed in "
                     f"{sum(g['passed'] for g in gates)} of {len(gates)}; failed checks "
                     + ", ".join(f"{k} {v}" for k, v in fails.items()) + "; cal1 DPO discrimination mean "
                     f"{statistics.mean(g['dpo_discrimination'] for g in gates):.1f}")  # fmt: skip
    shared = [d for s, _, d in pairs if s]
    apart = [d for s, _, d in pairs if not s]
    lines.append(f"over {len(pairs)} (manipulation, world seed) pairs: cal1 DPO discrimination where the "
                 f"representation is shared {statistics.mean(shared) if shared else float('nan'):.1f} "
                 f"(n={len(shared)}), where it is not {statistics.mean(apart) if apart else float('nan'):.1f} "
                 f"(n={len(apart)}); Spearman(cal1 best cosine, cal1 DPO discrimination) = "
                 f"{spearman([c for _, c, _ in pairs], [d for _, _, d in pairs]):.2f}")  # fmt: skip
    return lines


def _job(args: tuple) -> dict:
    return search_world(*args)


def main(argv: list[str] | None = None) -> None:
    """``python -m experiments.transfer.v3 search`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m experiments.transfer.v3", description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("search", "summary"))
    parser.add_argument("--dir", default=None, help="summary: the folder of search_<M>_w<seed>.json")
    parser.add_argument("--budget", default="20@0.001@0.01", help="summary: the DPO budget key")
    parser.add_argument("--manipulation", default="M1")
    parser.add_argument("--world-seeds", default="0-3")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budgets", default="120@1e-3")
    parser.add_argument("--out", default="transfer_v3_out")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if args.step == "summary":
        folder = Path(args.dir or args.out)
        results = [json.loads(p.read_text()) for p in sorted(folder.glob("search_M*_w*.json"))]
        lines = summarise(results, args.budget)
        print("\n".join(lines))
        (folder / "search_summary.txt").write_text("\n".join(lines) + "\n")
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = str(Path(args.cache_dir).expanduser() if args.cache_dir else DEFAULT_CACHE)
    budgets, seeds = parse_budgets(args.budgets), parse_range(args.seeds)
    jobs = [(args.manipulation, w, budgets, seeds, cache) for w in parse_range(args.world_seeds)]
    start = time.time()
    lines = []
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=context) as pool:
        for result in pool.map(_job, jobs):
            (out / f"search_{args.manipulation}_w{result['world_seed']}.json").write_text(
                json.dumps(result, indent=1, default=str)
            )
            new = summary_lines(json.loads(json.dumps(result, default=str)))
            print("\n".join(new), flush=True)
            lines += new
    lines.append(f"({time.time() - start:.0f} s wall, {args.workers} workers of one thread)")
    (out / f"search_{args.manipulation}.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
