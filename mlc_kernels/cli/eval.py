"""``mlc eval``: per-language cosine of each variant to its prompt's consensus direction, the s1 share and the
between-prompt cosine of a model (and its trained extractor), printed, plotted (``eval.png``) and saved
(``eval.json``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..errors import UsageError
from ..mlc_term import check_tokenisation
from ..trainers import MLCArguments
from .options import (
    HELP_FORMAT,
    add_mlc_options,
    check_layer,
    check_output_folder,
    load_model,
    load_tokenizer,
    mlc_arguments_from,
    resolve_model_path,
)


def make_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``mlc eval``'s options: the model, its extractor, the prompts, the output folder, the MLC options."""
    p = subparsers.add_parser("eval", help="per-language consistency table", formatter_class=HELP_FORMAT)
    p.add_argument("--model", required=True, help="a saved model folder (e.g. mlc train's --output_dir) or hub id")
    p.add_argument("--extractor", default=None, help="an MLCHead folder (<output_dir>/mlc_head of mlc train)")
    p.add_argument("--prompts", default="sample",
                   help="JSONL file of records, LLaMA-Factory JSON (format in README), or 'sample'")  # fmt: skip
    p.add_argument("--dataset_format", "--dataset-format", default="auto", choices=["auto", "jsonl", "llamafactory"],
                   help="auto: a file starting with '[' is LLaMA-Factory JSON, else JSONL")  # fmt: skip
    p.add_argument("--split", default="heldout", choices=["train", "heldout"], help="split of 'sample'")
    p.add_argument("--out", default=".", help="folder for eval.json and eval.png")
    add_mlc_options(p)
    return p


@torch.no_grad()
def evaluate(model, tokenizer, records, mlc: MLCArguments, head=None) -> dict:
    """Per-language mean cosine to the prompt's consensus direction, mean s1 share and between-prompt cosine."""
    from ..metrics import consistency_metrics
    from ..trainers import record_variant_states

    layer = mlc.check(model)
    was_training = model.training
    model.eval()
    reps, mask = record_variant_states(model, tokenizer, records, mlc, layer)
    model.train(was_training)
    if head is not None:
        reps = head.to(reps.device)(reps)
    stats = consistency_metrics(reps.float(), mask)
    per_lang = {}
    for j, lang in enumerate(mlc.languages):
        cos = stats["cosine_to_consensus"][:, j]
        cos = cos[~torch.isnan(cos)]
        per_lang[lang] = cos.mean().item() if cos.numel() else float("nan")
    valid = stats["valid"]
    return {
        "cosine_to_consensus": per_lang,
        "s1_share": stats["s1_share"][valid].mean().item(),
        "between_prompt_cosine": float(stats["between_prompt_cosine"]),
        "layer": layer,
    }


def format_eval(results: dict[str, dict]) -> str:
    """A table: one row per language (mean cosine of the variant to its prompt's consensus direction), then
    the mean s1 share and the between-prompt cosine; one column per result set (e.g. before / after)."""
    names = list(results)
    langs = list(next(iter(results.values()))["cosine_to_consensus"])

    def cell(value) -> str:
        return f"{value:>12.4f}" if value is not None and value == value else f"{'n/a':>12}"

    lines = [f"{'row':<24}" + "".join(f"{n:>12}" for n in names)]
    for lang in langs:
        lines.append(f"{'cos to consensus ' + lang:<24}" + "".join(cell(results[n]['cosine_to_consensus'][lang])
                                                                  for n in names))  # fmt: skip
    lines.append(f"{'s1 share':<24}" + "".join(cell(results[n]["s1_share"]) for n in names))
    lines.append(f"{'between-prompt cosine':<24}" + "".join(cell(results[n]["between_prompt_cosine"]) for n in names))
    return (
        "per-language cosine to the prompt's consensus (1 = the variant reads like the consensus); s1 share "
        "(1 = all variants collinear); between-prompt cosine (near 1 = prompts collapsed); n/a = no data\n"
        + "\n".join(lines)
    )


def plot_eval(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = list(next(iter(results.values()))["cosine_to_consensus"])
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(results)
    for i, (name, res) in enumerate(results.items()):
        ax.bar(
            [j + i * width for j in range(len(langs))],
            [res["cosine_to_consensus"][lang] for lang in langs],
            width,
            label=name,
        )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(langs))], langs)
    ax.set_ylabel("cosine to consensus")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_extractor(directory: str, hidden_size: int):
    from ..head import MLCHead

    try:
        head = MLCHead.from_pretrained(directory)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise UsageError(f"--extractor: {str(err).removeprefix('MLCHead.from_pretrained: ')}") from err
    if head.hidden_size != hidden_size:
        raise UsageError(
            f"--extractor {directory}: its hidden_size is {head.hidden_size} but the model's is {hidden_size}; "
            "give the extractor trained with this model (<output_dir>/mlc_head)"
        )
    return head


def _json_safe(value):
    """NaN/inf -> None (JSON null), recursively."""
    import math

    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def main(args: argparse.Namespace) -> None:
    """Run ``mlc eval`` on its parsed options."""
    from ..records import EVAL, load_checked

    out = check_output_folder(args.out, "--out")
    records, where = load_checked(args.prompts, EVAL, args.split if args.prompts == "sample" else None,
                                  args.dataset_format)  # fmt: skip
    mlc = mlc_arguments_from(args)
    name, local = resolve_model_path(args.model)
    tokenizer = load_tokenizer(name, local)
    check_tokenisation(records, where, tokenizer, mlc)  # before the model loads
    model = load_model(name, local, ignore_extractor=True)
    check_layer(mlc, model)
    head = load_extractor(args.extractor, model.config.hidden_size) if args.extractor else None
    result = evaluate(model, tokenizer, records, mlc, head)
    result["model"], result["extractor"] = str(args.model), args.extractor
    print(format_eval({"model": result}))
    out.mkdir(parents=True, exist_ok=True)
    plot_eval({"model": result}, out / "eval.png")
    (out / "eval.json").write_text(json.dumps(_json_safe(result), indent=1, allow_nan=False) + "\n")
    print(f"mlc eval: wrote {out / 'eval.json'} and {out / 'eval.png'}")
