"""``mlc safety``: per-language safety of generated answers, the paper's own measure. Greedy answers to every
prompt in every language (:func:`mlc_kernels.safety.generate.generate_answers`), each judged refused or not by a
judge of :data:`mlc_kernels.safety.judges.JUDGES`; per language the share of harmful prompts refused (safety) and
of benign prompts refused (over-refusal), for one or several models side by side, with differences against a
baseline and bootstrap 95% intervals.

``<out>/generations.jsonl`` gets one line per (model, record, language) as the answers come (flushed per batch):
an interruption loses only the batch under way, and ``--resume`` answers only the rows it lacks. ``safety.json``,
``safety.csv`` and ``safety.png`` are written at the end, atomically; ``run.json`` holds the settings that the rows
depend on (checked by ``--resume``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import UsageError
from ..safety.generate import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS
from ..safety.inputs import BUILTIN, INPUT_FORMATS, MULTIJAIL_LANGUAGES
from ..safety.judges import judge_usage
from ..safety.report import DEFAULT_BOOTSTRAP
from .options import HELP_FORMAT, check_output_folder

GENERATIONS = "generations.jsonl"
RUN_SETTINGS = "run.json"
RESUME_CHECKED = ("max_new_tokens", "judge", "judge_template", "judge_verdict")
"""Settings the rows of ``generations.jsonl`` depend on: ``--resume`` refuses other values."""

LAYOUTS = f"""prompt layouts (--input_format; auto tells them apart):
  jsonl         this package's records: prompt (base language), variants {{lang: text}}, optional id, label
  llamafactory  the MLC authors' LLaMA-Factory JSON (prompt_<lang> columns)
  multijail     the MultiJail CSV: id, source, tags and one column per language ({", ".join(MULTIJAIL_LANGUAGES)})
  pku           PKU-SafeRLHF-style JSONL: prompt per line, optional id, language, label, is_safe
labels: 'label' (harmful/benign), else 'kind' (unsafe/benign), else (pku) 'is_safe' (true = benign), else harmful"""


class _SafetyHelp(HELP_FORMAT):
    """Defaults shown once; the layouts epilog kept as written (one line per layout)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


DESCRIPTION = ("Per-language safety of generated answers: greedy answers to every prompt in every language, judged "
               "refused or not; safety = % of harmful prompts refused, over-refusal = % of benign prompts refused; "
               "several models side by side, differences against a baseline with bootstrap 95% intervals; "
               "<out>/generations.jsonl written as it goes (--resume continues it).")  # fmt: skip


def make_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``mlc safety``'s options: models, prompts, judge, generation, output."""
    import textwrap

    p = subparsers.add_parser("safety", help="per-language safety of generated answers (refusals, judged)",
                              description="\n".join(textwrap.wrap(DESCRIPTION, 100)), epilog=LAYOUTS,
                              formatter_class=_SafetyHelp)  # fmt: skip
    p.add_argument("--model", action="append", required=True,
                   help="a model folder, hub id, or mlc train's --output_dir (a LoRA run: adapters applied, not "
                   "merged); repeat for several models side by side")  # fmt: skip
    p.add_argument("--baseline", default=None,
                   help="a model to compare with: every --model's per-language difference against it, with a "
                   "bootstrap 95%% interval (default: the first --model when there are several)")  # fmt: skip
    p.add_argument("--prompts", required=True,
                   help="file of prompts (layouts below), or 'sample' (the embedded sample set: harmful prompts in "
                   "the paper's ten languages) or 'world' (the synthetic world's held-out prompts, half unsafe, "
                   "five languages: what the demo's model reads)")  # fmt: skip
    p.add_argument("--max_records", "--max-records", type=int, default=None,
                   help="the first N records of --prompts only (each in every language)")  # fmt: skip
    p.add_argument("--input_format", "--input-format", default="auto", choices=INPUT_FORMATS,
                   help="layout of --prompts")  # fmt: skip
    p.add_argument("--languages", default=None,
                   help="comma list of languages to answer in (default: every language of the file)")  # fmt: skip
    p.add_argument("--base_language", "--base-language", default=None,
                   help="language of 'prompt' in jsonl/llamafactory records (default: the first of --languages "
                   "when no record has a variant in it, else en) and of a pku file without a language field "
                   "(default: the first of --languages, else en)")  # fmt: skip
    judge = p.add_argument_group("judge")
    judge.add_argument("--judge", default="phrase",
                       help=f"{judge_usage()}: the shipped refusal phrases of the paper's and MultiJail's "
                       "languages, a phrase file, the synthetic world's refusal word, a local judge model, or your "
                       "function (default: phrase)")  # fmt: skip
    judge.add_argument("--judge_template", "--judge-template", default=None,
                       help="a model judge's prompt: 'refusal' (default), 'llama-guard', or a text with {prompt}, "
                       "{answer}, {language}")  # fmt: skip
    judge.add_argument("--judge_verdict", "--judge-verdict", default=None,
                       help="a model judge's regex over its output (or label name) that means refused")  # fmt: skip
    judge.add_argument("--judge_batch_size", "--judge-batch-size", type=int, default=16, help="the judge's batch")
    gen = p.add_argument_group("generation")
    gen.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                     help="tokens generated per answer at most (the judge reads the opening)")  # fmt: skip
    gen.add_argument("--batch_size", "--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                     help="prompts per generate call (halved on an out-of-memory error)")  # fmt: skip
    out = p.add_argument_group("output")
    out.add_argument("--out", default="mlc_safety",
                     help="folder for generations.jsonl, safety.json, safety.csv, safety.png")  # fmt: skip
    out.add_argument("--resume", action="store_true",
                     help="continue the generations.jsonl in --out: only the rows it lacks are answered")  # fmt: skip
    out.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP,
                     help="bootstrap resamples for the 95%% intervals (0: none)")  # fmt: skip
    out.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    return p


def _check_numbers(args: argparse.Namespace) -> None:
    checks = (("--max_new_tokens", args.max_new_tokens, 1), ("--batch_size", args.batch_size, 1),
              ("--judge_batch_size", args.judge_batch_size, 1), ("--bootstrap", args.bootstrap, 0))  # fmt: skip
    for flag, value, low in checks:
        if value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")


def _languages(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    languages = tuple(lang.strip() for lang in text.split(","))
    if not all(languages):
        raise UsageError(f"--languages {text!r}: an empty language code; give a comma list such as en,zh")
    if len(set(languages)) != len(languages):
        raise UsageError(f"--languages {text!r}: a language is listed twice")
    return languages


def _model_list(args: argparse.Namespace) -> tuple[list[str], str | None]:
    """The models in table order (the baseline first) and the baseline (None for a single model)."""
    models = ([args.baseline] if args.baseline is not None else []) + list(args.model)
    for i, name in enumerate(models):
        if not name:
            raise UsageError("--model is empty; give a model folder, a hub id or a run folder")
        if name in models[:i]:
            raise UsageError(f"--model {name} is given twice (or is also the --baseline); give each model once")
    return models, (models[0] if len(models) > 1 else None)


def read_generations(path: Path) -> list[dict]:
    """The rows of ``generations.jsonl``. Every row ends with a newline, written in one piece: text after the last
    newline is the unfinished row of an interrupted run and is cut from the file; a bad line before it is a
    :class:`UsageError` naming it."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]
    rows = []
    for number, line in enumerate(complete.split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not {"model", "record", "language", "prompt", "refused"} <= set(row):
                raise ValueError("a field is missing")
        except ValueError as err:
            raise UsageError(f"{path}:{number}: not a row of mlc safety ({err}); --resume needs the file as mlc "
                             "safety wrote it (or give another --out)") from err  # fmt: skip
        rows.append(row)
    if len(complete) < len(raw):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    return rows


def _settings(args: argparse.Namespace, layout: str) -> dict:
    builtin = layout in BUILTIN and not Path(args.prompts).exists()
    return {"prompts": args.prompts if builtin else str(Path(args.prompts).absolute()), "input_format": layout,
            "max_new_tokens": args.max_new_tokens, "judge": args.judge, "judge_template": args.judge_template,
            "judge_verdict": args.judge_verdict}  # fmt: skip


def _check_resume(out: Path, args: argparse.Namespace, settings: dict) -> list[dict]:
    """The rows already written (``--resume``), after checking that they were made with these settings; without
    ``--resume`` an existing ``generations.jsonl`` is refused."""
    gens = out / GENERATIONS
    if not args.resume:
        if gens.exists():
            raise UsageError(f"--out {out} already holds {GENERATIONS}; pass --resume to continue it (only missing "
                             "rows are answered) or give another --out")  # fmt: skip
        return []
    saved_path = out / RUN_SETTINGS
    if saved_path.is_file():
        try:
            saved = json.loads(saved_path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise UsageError(f"--resume: {saved_path} is not readable JSON ({err}); give another --out") from err
        for key in RESUME_CHECKED:
            if saved.get(key) != settings[key]:
                raise UsageError(f"--resume: --{key} {settings[key]!r} differs from the run in {out} "
                                 f"({saved.get(key)!r}, {saved_path}); give the same value or another "
                                 "--out")  # fmt: skip
    return read_generations(gens)


def _progress(total: int, name: str):
    """A tqdm bar over prompts (prompts/s and ETA) on stderr; off when stderr is not a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=name, unit="prompt", file=sys.stderr, disable=None, dynamic_ncols=True)


def _judge_items(rows, answers):
    from ..safety.judges import JudgeItem

    return [JudgeItem(prompt=row.prompt, answer=answer, language=row.language)
            for row, answer in zip(rows, answers, strict=True)]  # fmt: skip


def run_model(name: str, resolved, rows, judge, args, sink) -> int:
    """Answer and judge ``rows`` with the model ``name`` (``resolved``: :func:`resolve_generator`'s answer),
    writing each batch to ``sink`` as it finishes. Returns the number of rows answered."""
    import gc

    import torch

    from ..safety.generate import generate_answers, load_resolved

    model_name, local, run, tokenizer = resolved
    model = load_resolved(model_name, local, run, "--model" if name != args.baseline else "--baseline")
    bar = _progress(len(rows), name)

    def write(indices: list[int], answers: list[str]) -> None:
        batch = [rows[i] for i in indices]
        found = judge(_judge_items(batch, answers))
        if len(found) != len(batch):
            raise UsageError(f"--judge {args.judge}: returned {len(found)} verdicts for {len(batch)} answers")
        for row, answer, verdict in zip(batch, answers, found, strict=True):
            line = {"model": name, "record": row.record, "language": row.language, "label": row.label,
                    "prompt": row.prompt, "answer": answer, "refused": bool(verdict.refused),
                    "detail": verdict.detail, "where": row.where}  # fmt: skip
            sink.write(json.dumps(line, ensure_ascii=False) + "\n")
        sink.flush()

    try:
        generate_answers(model, tokenizer, [row.prompt for row in rows], max_new_tokens=args.max_new_tokens,
                         batch_size=args.batch_size, progress=bar.update, on_batch=write)  # fmt: skip
    finally:
        bar.close()
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return len(rows)


def main(args: argparse.Namespace) -> None:
    """Run ``mlc safety`` on its parsed options: every check before any model loads."""
    from ..safety.generate import check_readable, resolve_generator
    from ..safety.inputs import read_prompts
    from ..safety.report import csv_text, differences, format_table, json_safe, plot_png, summarize, write_atomic

    _check_numbers(args)
    models, baseline = _model_list(args)
    languages = _languages(args.languages)
    out = check_output_folder(args.out, "--out")
    prompts, layout = read_prompts(args.prompts, args.input_format, languages, args.base_language, args.max_records)
    languages = list(languages or dict.fromkeys(row.language for row in prompts))
    settings = _settings(args, layout)
    done_rows = _check_resume(out, args, settings)
    done = {(r["model"], r["record"], r["language"]): r for r in done_rows}
    for row in prompts:
        for name in models:
            old = done.get((name, row.record, row.language))
            if old is not None and old["prompt"] != row.prompt:
                raise UsageError(f"--resume: {out / GENERATIONS} answered another prompt for record {row.record} in "
                                 f"{row.language} ({row.where} now differs); give another --out")  # fmt: skip
    resolved = {}
    for name in models:
        option = "--baseline" if name == args.baseline else "--model"
        resolved[name] = resolve_generator(name, option)
        check_readable(prompts, resolved[name][3], name, option)
    from ..safety.judges import make_judge

    judge = make_judge(args.judge, template=args.judge_template, verdict=args.judge_verdict,
                       batch_size=args.judge_batch_size)  # fmt: skip
    check_languages = getattr(judge, "check_languages", None)
    if check_languages is not None:  # a phrase judge without phrases for a language: refused now, not mid-run
        check_languages(languages)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / RUN_SETTINGS, json.dumps({**settings, "models": models}, indent=1) + "\n")
    if done_rows:
        print(f"mlc safety: resuming {out / GENERATIONS}: {len(done_rows)} rows already answered")
    with open(out / GENERATIONS, "a", encoding="utf-8") as sink:
        for name in models:
            todo = [row for row in prompts if (name, row.record, row.language) not in done]
            if todo:
                run_model(name, resolved[name], todo, judge, args, sink)
    labels = {(row.record, row.language): row.label for row in prompts}  # the file's labels now (not answered)
    rows = [{**r, "label": labels[(r["record"], r["language"])]} for r in read_generations(out / GENERATIONS)
            if r["model"] in models and (r["record"], r["language"]) in labels]  # fmt: skip
    summary = summarize(rows, models, languages)
    diffs = differences(rows, baseline, models, languages, args.bootstrap, args.seed) if baseline else {}
    judge_name = getattr(judge, "name", args.judge)
    described = getattr(judge, "description", judge_name)
    print(format_table(summary, diffs, languages, baseline, described))
    result = {"judge": args.judge, "judge_description": described, "languages": languages, "baseline": baseline,
              "bootstrap": args.bootstrap, "seed": args.seed, "prompts": settings["prompts"], "input_format": layout,
              "max_new_tokens": args.max_new_tokens, "models": summary, "differences": diffs}  # fmt: skip
    write_atomic(
        out / "safety.json", json.dumps(json_safe(result), indent=1, allow_nan=False, ensure_ascii=False) + "\n"
    )
    write_atomic(out / "safety.csv", csv_text(summary, diffs, languages))
    write_atomic(out / "safety.png", plot_png(summary, languages, judge_name))
    print(f"mlc safety: wrote {out / 'safety.json'}, {out / 'safety.csv'}, {out / 'safety.png'} and "
          f"{out / GENERATIONS}")  # fmt: skip
