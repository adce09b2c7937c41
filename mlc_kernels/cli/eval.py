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
from ..safety.report import json_safe
from ..trainers import MLCArguments
from .options import (
    HELP_FORMAT,
    _boolean,
    check_layer,
    check_output_folder,
    first_line,
    load_model,
    load_tokenizer,
    mlc_arguments_from,
    mlc_options_dataclass,
    resolve_model_path,
)

EVAL_MLC_OPTIONS = ("languages", "mlc_base_language", "mlc_layer", "mlc_generation_prompt")
"""The MLC options ``mlc eval`` uses (where and how the states are read); the training-only ones are not listed."""

EXTRACTOR_OPTIONS = {"mlc_layer": "layer", "mlc_objective": "objective", "mlc_tau": "tau", "mlc_guard": "guard",
                     "mlc_rep_size": "rep_size", "mlc_base_language": "base_language"}  # fmt: skip
"""Options checked against the settings saved with the extractor (option dest -> key of its config); ``--languages``
defaults to the saved languages but may differ (evaluating other languages is meaningful)."""

NO_EXTRACTOR = "none"


class _EvalHelp(HELP_FORMAT):
    """Defaults shown once: not added to a help text that states its own."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        return text if "(default:" in text or action.required else super()._get_help_string(action)


class _Default:
    """An option's default, told apart from the same value given on the command line."""

    def __init__(self, value) -> None:
        self.value = value

    def __str__(self) -> str:
        return str(self.value)


def make_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``mlc eval``'s options: the model, its extractor, the prompts, the output folder, the MLC options."""
    p = subparsers.add_parser("eval", help="per-language consistency table", formatter_class=_EvalHelp)
    p.add_argument("--model", required=True,
                   help="a saved model folder or hub id, or mlc train's --output_dir (a full run or a LoRA run "
                   "(--use_peft): its adapters on the base model named in adapter_config.json)")  # fmt: skip
    p.add_argument("--extractor", default=None,
                   help=f"an MLCHead folder (default: <model>/mlc_head when there, as mlc train writes it; "
                   f"'{NO_EXTRACTOR}': the hidden states themselves); its saved layer, objective, tau, guard, rep "
                   "size, base language and languages apply")  # fmt: skip
    p.add_argument("--prompts", default="sample",
                   help="JSONL file of records, LLaMA-Factory JSON (format in README), or 'sample'")  # fmt: skip
    p.add_argument("--dataset_format", "--dataset-format", default="auto", choices=["auto", "jsonl", "llamafactory"],
                   help="auto: a file starting with '[' is LLaMA-Factory JSON, else JSONL")  # fmt: skip
    p.add_argument("--split", default="heldout", choices=["train", "heldout"], help="split of 'sample'")
    p.add_argument("--out", default=".", help="folder for eval.json and eval.png")
    _add_eval_mlc_options(p)
    return p


def _add_eval_mlc_options(p: argparse.ArgumentParser) -> None:
    """The MLC options of :data:`EVAL_MLC_OPTIONS` and :data:`EXTRACTOR_OPTIONS`, named as in ``mlc train``; their
    defaults are marked (:class:`_Default`) so that an option given on the command line is told apart."""
    import dataclasses
    import typing

    options = mlc_options_dataclass()
    hints = typing.get_type_hints(options)
    group = p.add_argument_group("MLC options (as in mlc train; the extractor's saved settings apply by default)")
    for f in dataclasses.fields(options):
        if f.name not in EVAL_MLC_OPTIONS and f.name not in EXTRACTOR_OPTIONS:
            continue  # training only
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        text = f.metadata["help"].replace("%", "%%")
        if f.name in EXTRACTOR_OPTIONS and f.name != "mlc_base_language":
            text += " (checked against the extractor's saved value)"
        typ = hints[f.name]
        if typ is bool:
            kind, choices, metavar = _boolean, None, "{true,false}"
        else:
            kind = {int: int, float: float}.get(typ, int if typ == int | None else str)
            choices, metavar = f.metadata.get("choices"), None
        group.add_argument(*flags, type=kind, default=_Default(f.default), choices=choices, metavar=metavar,
                           help=text)  # fmt: skip


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
    """Bars: per language, the mean cosine of the variant to its prompt's consensus direction, one bar per result
    set; titled, both axes labelled, no offset notation on the y axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(results.values()))
    langs = list(first["cosine_to_consensus"])
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(results)
    for i, (name, res) in enumerate(results.items()):
        values = [res["cosine_to_consensus"][lang] for lang in langs]
        ax.bar([j + i * width for j in range(len(langs))], [v if v == v else 0.0 for v in values], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(langs))], langs)
    ax.set_xlabel("language of the variant prompt")
    ax.set_ylabel("cosine to the prompt's consensus\n(dimensionless, -1 to 1)")
    ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    layer = first.get("layer")
    where = f"layer {layer}" + (", through the extractor" if first.get("extractor") else ", hidden states")
    ax.set_title(f"mlc eval: per-language consistency ({where}; 1 = reads like the consensus)", fontsize=10)
    if len(results) > 1:  # one result set: no legend over the bars
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_extractor(directory: str, hidden_size: int):
    from ..head import MLCHead

    try:
        head = MLCHead.from_pretrained(directory)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise UsageError(f"--extractor: {str(err).removeprefix('MLCHead.from_pretrained: ')}") from err
    if hidden_size is not None and head.hidden_size != hidden_size:
        raise UsageError(
            f"--extractor {directory}: its hidden_size is {head.hidden_size} but the model's is {hidden_size}; "
            "give the extractor trained with this model (<output_dir>/mlc_head)"
        )
    return head


def _explicit(args: argparse.Namespace) -> set[str]:
    """The options given on the command line; their defaults are unwrapped in ``args``."""
    given = set()
    for dest, value in vars(args).items():
        if isinstance(value, _Default):
            setattr(args, dest, value.value)
        else:
            given.add(dest)
    return given


def _same(option: str, given, saved) -> bool:
    if option == "mlc_layer":
        given = int(given) if isinstance(given, str) and given.strip().lstrip("-").isdigit() else given
    if option == "mlc_tau":
        return isinstance(saved, (int, float)) and abs(float(given) - float(saved)) <= 1e-9 * max(1.0, abs(saved))
    return given == saved


def apply_extractor_settings(args: argparse.Namespace, given: set[str], head, directory: str) -> str | None:
    """Take the settings saved with ``head`` for the options not given; refuse a given option that contradicts
    one (one line naming both). Returns a note for a head saved without settings (the options apply)."""
    from ..head import CONFIG_NAME

    saved = dict(head.settings, rep_size=head.rep_size)
    for option, key in EXTRACTOR_OPTIONS.items():
        if key not in saved:
            continue
        flag = "--" + option
        if option in given and not _same(option, getattr(args, option), saved[key]):
            raise UsageError(
                f"{flag} {getattr(args, option)} contradicts the extractor's saved {key} {saved[key]!r} "
                f"({Path(directory) / CONFIG_NAME}); drop {flag} (the saved value applies) or give the extractor "
                f"trained with {flag} {getattr(args, option)}"
            )
        setattr(args, option, saved[key])
    if "languages" in saved and "languages" not in given:
        args.languages = ",".join(saved["languages"])
    if not head.settings:
        return (f"mlc eval: the extractor {directory} was saved without its training settings (an older mlc_head); "
                f"using the options: layer {args.mlc_layer}, base language {args.mlc_base_language or 'the first'}, "
                f"languages {args.languages}")  # fmt: skip
    return None


def _adapter_base(run: Path) -> str | None:
    """The base model of a LoRA run (``adapter_config.json``'s ``base_model_name_or_path``), or None for a folder
    that is not one."""
    config = run / "adapter_config.json"
    if not run.is_dir() or not config.is_file():
        return None
    try:
        base = json.loads(config.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as err:
        raise UsageError(f"--model {run}: {config} is not a readable adapter config ({err})") from err
    if not isinstance(base, str) or not base:
        raise UsageError(f"--model {run}: {config} names no base_model_name_or_path; the adapters need their base")
    return base


def _extractor_folder(args: argparse.Namespace) -> str | None:
    """``--extractor``; by default ``<model>/mlc_head`` when the model folder has one (mlc train writes it)."""
    if args.extractor == NO_EXTRACTOR:
        return None
    if args.extractor is not None:
        return args.extractor
    found = Path(args.model).expanduser() / "mlc_head"
    return str(found) if (found / "mlc_head_config.json").is_file() else None


def main(args: argparse.Namespace) -> None:
    """Run ``mlc eval`` on its parsed options."""
    from ..records import EVAL, load_checked

    given = _explicit(args)
    out = check_output_folder(args.out, "--out")
    records, where = load_checked(args.prompts, EVAL, args.split if args.prompts == "sample" else None,
                                  args.dataset_format)  # fmt: skip
    extractor = _extractor_folder(args)
    head, note = None, None
    if extractor is not None:
        head = load_extractor(extractor, None)
        note = apply_extractor_settings(args, given, head, extractor)
    mlc = mlc_arguments_from(args)
    run = Path(args.model).expanduser()
    base = _adapter_base(run)
    option = f"--model {run}: adapter_config.json's base_model_name_or_path" if base is not None else "--model"
    name, local = resolve_model_path(base if base is not None else args.model, option)
    own_tokenizer = base is not None and (run / "tokenizer_config.json").is_file()  # mlc train saves it in the run
    tokenizer = load_tokenizer(str(run), True) if own_tokenizer else load_tokenizer(name, local)
    check_tokenisation(records, where, tokenizer, mlc)  # before the model loads
    if note:
        print(note)
    model = load_model(name, local, ignore_extractor=True)
    if base is not None:
        model = _with_adapters(model, run)
    check_layer(mlc, model)
    if head is not None and head.hidden_size != model.config.hidden_size:
        load_extractor(extractor, model.config.hidden_size)  # the one-line refusal
    result = evaluate(model, tokenizer, records, mlc, head)
    result["model"], result["extractor"] = str(args.model), extractor
    result["settings"] = {"objective": mlc.objective, "tau": mlc.tau, "guard": mlc.guard,
                          "base_language": mlc.base_language, "languages": list(mlc.languages)}  # fmt: skip
    print(format_eval({"model": result}))
    out.mkdir(parents=True, exist_ok=True)
    plot_eval({"model": result}, out / "eval.png")
    (out / "eval.json").write_text(json.dumps(json_safe(result), indent=1, allow_nan=False) + "\n")
    print(f"mlc eval: wrote {out / 'eval.json'} and {out / 'eval.png'}")


def _with_adapters(model, run: Path):
    """``model`` with the LoRA adapters of ``run`` applied through peft (not merged)."""
    try:
        from peft import PeftModel
    except ImportError as err:
        raise UsageError(f"--model {run} is a LoRA run: reading it needs peft (pip install peft)") from err
    try:
        return PeftModel.from_pretrained(model, str(run))
    except Exception as err:  # noqa: BLE001 - a damaged or mismatched adapter folder is the input's problem
        raise UsageError(f"--model {run}: cannot apply its LoRA adapters ({first_line(err)})") from err
