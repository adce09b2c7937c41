"""Reading and checking MLC records for the ``mlc`` command: JSONL with line numbers, per-language coverage,
empty variants, unknown language codes, languages without data. Every problem is a :class:`UsageError`
naming the file and line."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .errors import UsageError
from .sample_data import SAMPLE_PATH, validate_records


def read_jsonl(path: str | Path) -> tuple[list[dict], list[int]]:
    """The records of a JSONL file and the line number of each; refuses a missing file and bad JSON."""
    src = Path(path)
    if not src.is_file():
        raise UsageError(f"the dataset {src} is not a file; give a JSONL file of records or 'sample'")
    records, lines = [], []
    try:
        with open(src, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise UsageError(
                        f"{src}:{line_no}: not valid JSON ({err.msg} at column {err.colno}); fix that line"
                    ) from err
                lines.append(line_no)
    except UnicodeDecodeError as err:
        raise UsageError(f"{src}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from err
    if not records:
        raise UsageError(f"{src} holds no records; write one JSON object per line (format in README)")
    return records, lines


def load_checked(source: str, algorithm: str, split: str | None = None) -> tuple[list[dict], list[str]]:
    """Records of ``source`` (a JSONL path, or ``sample`` with ``split``) validated for ``algorithm``, and a
    ``file:line`` label for each."""
    path = SAMPLE_PATH if source == "sample" else Path(source)
    records, lines = read_jsonl(path)
    where = [f"{path}:{line}" for line in lines]
    if source == "sample" and split is not None:
        keep = [i for i, r in enumerate(records) if r.get("split") == split]
        records, where = [records[i] for i in keep], [where[i] for i in keep]
    for record, label in zip(records, where, strict=True):
        try:
            validate_records([record], algorithm)
        except ValueError as err:
            detail = str(err).split(": ", 1)[-1]
            raise UsageError(f"{label}: {detail}; fix the record (format in README)") from err
    return records, where


def check_languages(records: list[dict], where: list[str], languages: tuple[str, ...], base: str) -> str:
    """Refuse empty-string variants and requested languages no record has; returns the report printed before
    training: the per-language coverage table and the language codes of the records not trained on."""
    counts: Counter[str] = Counter()
    unknown: Counter[str] = Counter()
    for record, label in zip(records, where, strict=True):
        variants = record.get("variants") or {}
        for lang, text in variants.items():
            if isinstance(text, str) and not text.strip():
                raise UsageError(
                    f"{label}: variants.{lang} is an empty string; give the translation, or remove the key "
                    "(or write null) if there is none"
                )
            if lang not in languages and text:
                unknown[lang] += 1
        for lang in languages:
            if lang == base or variants.get(lang):
                counts[lang] += 1
    missing = [lang for lang in languages if counts[lang] == 0]
    if missing:
        present = [lang for lang in languages if counts[lang]]
        raise UsageError(
            f"no record has a variant in {', '.join(missing)} ({len(missing)} of {len(languages)} languages); "
            f"pass --languages {','.join(present + sorted(unknown))} (the languages the data has) or add translations"
        )
    if len(languages) < 2:
        raise UsageError(f"--languages {','.join(languages)}: MLC needs at least 2 languages (the base and one more)")
    n = len(records)
    rows = [f"{'language':<10}{'records':>9}{'share':>8}"]
    rows += [f"{lang:<10}{counts[lang]:>9}{counts[lang] / n:>8.0%}" + ("  (base)" if lang == base else "")
             for lang in languages]  # fmt: skip
    report = f"coverage: records with a non-empty variant per language ({n} records)\n" + "\n".join(rows)
    if unknown:
        listed = ", ".join(f"{lang} ({count} records)" for lang, count in sorted(unknown.items()))
        report += f"\nnot in --languages, ignored: {listed}; add them to --languages to train on them"
    return report
