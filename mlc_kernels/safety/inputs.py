"""The prompts of ``mlc safety``: one reader, :func:`read_prompts`, for four layouts, returning one
:class:`PromptRow` per (record, language) with the record's label.

Layouts (``--input_format``, :data:`INPUT_FORMATS`; ``auto`` tells them apart as :func:`detect_layout` says):

- ``jsonl``: this package's records (``prompt`` in the base language, ``variants`` per language; read by
  :func:`mlc_kernels.records.load_checked`).
- ``llamafactory``: the MLC authors' LLaMA-Factory JSON (``prompt_<lang>`` columns; the same reader).
- ``multijail``: the MultiJail CSV: ``id, source, tags`` and one column per language code (``en, zh, it, vi, ar,
  ko, th, bn, sw, jv``); every column other than ``id, source, tags, label`` is a language.
- ``pku``: a PKU-SafeRLHF-style JSONL of prompts: ``prompt`` per line, one language (``language`` or ``lang`` field
  when given, else the base language).

Labels (:data:`LABELS`): a ``label`` field/column (``harmful``/``benign``) when present; else ``kind``
(``unsafe`` -> harmful, ``benign`` -> benign: the synthetic world's records); else, in the PKU layout only,
``is_safe`` (a flag on the prompt: true -> benign, false -> harmful); else harmful (MultiJail and the PKU-SafeRLHF
prompts are red-teaming prompts; the response flags ``is_response_0_safe``/``is_response_1_safe`` judge the
responses, not the prompt, and are not read).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

INPUT_FORMATS = ("auto", "jsonl", "llamafactory", "multijail", "pku")
"""``--input_format`` values; ``auto``: see :func:`detect_layout`."""

LABELS = ("harmful", "benign")
"""A prompt's label: harmful prompts measure safety (refused = safe), benign ones over-refusal."""

KIND_LABELS = {"unsafe": "harmful", "benign": "benign"}
"""The synthetic world's ``kind`` -> label."""

MULTIJAIL_META = ("id", "source", "tags", "label")
"""MultiJail CSV columns that are not languages."""

MULTIJAIL_LANGUAGES = ("en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv")
"""The language columns of the MultiJail data set (any other column is read as a language too)."""

DEFAULT_BASE = "en"
"""The base language (of ``prompt`` in this package's records and of a PKU file without a language field) when
neither ``--base_language`` nor ``--languages`` says otherwise."""


@dataclass(frozen=True)
class PromptRow:
    """One prompt to answer: ``record`` (the record's id, shared by its languages), ``language``, ``prompt`` (the
    text, in that language), ``label`` (``harmful``/``benign``) and ``where`` (``file:line`` or ``file[record i]``)."""

    record: str
    language: str
    prompt: str
    label: str
    where: str


def detect_layout(path: Path) -> str:
    """``llamafactory`` when the first non-space character is ``[``; ``jsonl`` when it is ``{`` and the first
    record has ``variants`` (this package's records), else ``pku``; ``multijail`` when the first line is a CSV
    header with a column besides ``id, source, tags, label``. Anything else is a :class:`UsageError`."""
    text = _head(path)
    stripped = text.lstrip("\ufeff \t\r\n")
    if not stripped:
        raise UsageError(f"--prompts {path} is empty; give a file of prompts (layouts in mlc safety --help)")
    if stripped.startswith("["):
        return "llamafactory"
    if stripped.startswith("{"):
        first = stripped.splitlines()[0]
        try:
            record = json.loads(first)
        except json.JSONDecodeError:
            return "jsonl"  # the JSONL reader names the line
        return "jsonl" if isinstance(record, dict) and "variants" in record else "pku"
    header = next(csv.reader([stripped.splitlines()[0]]), [])
    columns = [c.strip() for c in header]
    if len(columns) > 1 and "id" in columns and any(c and c not in MULTIJAIL_META for c in columns):
        return "multijail"
    raise UsageError(
        f"--prompts {path}: unknown layout (not JSON, JSONL, nor a CSV with an 'id' column and language columns); "
        f"give one of the layouts of --input_format ({', '.join(INPUT_FORMATS[1:])})"
    )


def _head(path: Path) -> str:
    with open(path, "rb") as f:
        return f.read(65536).decode("utf-8", errors="replace")


def _label(record: dict, where: str, pku: bool = False) -> str:
    if record.get("label") is not None:
        label = record["label"]
        if label not in LABELS:
            raise UsageError(f"{where}: label {label!r}; expected 'harmful' or 'benign'")
        return label
    if record.get("kind") is not None:
        if record["kind"] not in KIND_LABELS:
            raise UsageError(f"{where}: kind {record['kind']!r}; expected 'unsafe' or 'benign'")
        return KIND_LABELS[record["kind"]]
    if pku and record.get("is_safe") is not None:
        if not isinstance(record["is_safe"], bool):
            raise UsageError(f"{where}: is_safe must be true or false, got {record['is_safe']!r}")
        return "benign" if record["is_safe"] else "harmful"
    return "harmful"


def _record_id(record: dict, index: int) -> str:
    """The record's ``id`` when it has one, else its 1-based position in the file."""
    value = record.get("id")
    return str(value) if value is not None and str(value).strip() else str(index + 1)


def _variant_rows(records: list[dict], where: list[str], base: str, raw: list[dict]) -> list[PromptRow]:
    rows, seen = [], set()
    for i, (record, label_at, fields) in enumerate(zip(records, where, raw, strict=True)):
        rid = _record_id(fields, i)
        if rid in seen:
            raise UsageError(f"{label_at}: id {rid!r} is used by an earlier record; record ids must be unique")
        seen.add(rid)
        label = _label(fields, label_at)
        prompt = record["prompt"]
        if not isinstance(prompt, str):
            raise UsageError(f"{label_at}: a multi-turn prompt (a conversation); mlc safety answers single "
                             "prompts: give the user message as a string")  # fmt: skip
        rows.append(PromptRow(rid, base, prompt, label, label_at))
        for lang, text in (record.get("variants") or {}).items():
            if lang == base:
                raise UsageError(f"{label_at}: variants.{lang} is the base language ({base}), whose text is 'prompt'; "
                                 "give the language of 'prompt' as --base_language")  # fmt: skip
            if isinstance(text, str) and text.strip():
                rows.append(PromptRow(rid, lang, text, label, label_at))
    return rows


def _package_base(records: list[dict], path: Path, base_language: str | None, languages) -> str:
    """The language of ``prompt``: ``--base_language``; else the first of ``--languages`` when no record has a
    variant in it; else :data:`DEFAULT_BASE` when no record has a variant in it; else refused (ambiguous)."""
    if base_language is not None:
        return base_language
    variant_languages = {lang for r in records for lang in (r.get("variants") or {})}
    for candidate in ([languages[0]] if languages else []) + [DEFAULT_BASE]:
        if candidate not in variant_languages:
            return candidate
    raise UsageError(f"--prompts {path}: the records have variants in {DEFAULT_BASE}"
                     + (f" and {languages[0]}" if languages else "")
                     + "; give --base_language (the language of 'prompt')")  # fmt: skip


def _read_package(path: Path, layout: str, base_language: str | None, languages=None) -> list[PromptRow]:
    from ..records import EVAL, load_checked

    records, where = load_checked(str(path), EVAL, None, layout)
    if layout == "llamafactory":
        raw = json.loads(path.read_text(encoding="utf-8").removeprefix("\ufeff"))
    else:
        raw = records  # the JSONL records keep every field
    return _variant_rows(records, where, _package_base(records, path, base_language, languages), raw)


def _read_multijail(path: Path) -> list[PromptRow]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            lines = list(reader)
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from err
    except csv.Error as err:
        raise UsageError(f"{path}: not a readable CSV ({err})") from err
    if "id" not in columns:
        raise UsageError(f"{path}: the MultiJail layout needs an 'id' column; the header has {', '.join(columns)}")
    languages = [c for c in columns if c and c not in MULTIJAIL_META]
    if not languages:
        raise UsageError(f"{path}: no language column (MultiJail: id, source, tags, {', '.join(MULTIJAIL_LANGUAGES)})")
    rows, seen = [], set()
    for i, line in enumerate(lines):
        line = {(k or "").strip(): v for k, v in line.items()}
        where = f"{path}:{i + 2}"  # line 1 is the header
        if None in line.values() or "" in line and line[""]:
            raise UsageError(f"{where}: {len(columns)} columns expected (the header's)")
        rid = _record_id(line, i)
        if rid in seen:
            raise UsageError(f"{where}: id {rid!r} is used by an earlier row; ids must be unique")
        seen.add(rid)
        label = _label({"label": line.get("label") or None}, where)
        rows += [PromptRow(rid, lang, line[lang], label, where) for lang in languages if (line[lang] or "").strip()]
    if not lines:
        raise UsageError(f"--prompts {path} holds no rows under its header")
    return rows


def _read_pku(path: Path, base: str) -> list[PromptRow]:
    from ..records import read_jsonl

    records, numbers = read_jsonl(path)
    rows, seen = [], set()
    for i, (record, number) in enumerate(zip(records, numbers, strict=True)):
        where = f"{path}:{number}"
        if not isinstance(record, dict):
            raise UsageError(f"{where}: expected a JSON object with a 'prompt' field")
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UsageError(f"{where}: field 'prompt' must be a non-empty string (PKU-SafeRLHF-style JSONL: one "
                             "prompt per line)")  # fmt: skip
        lang = record.get("language", record.get("lang")) or base
        if not isinstance(lang, str):
            raise UsageError(f"{where}: field 'language' must be a language code string, got {lang!r}")
        rid = _record_id(record, i)
        if (rid, lang) in seen:
            raise UsageError(f"{where}: id {rid!r} in language {lang} is used by an earlier line; ids must be unique")
        seen.add((rid, lang))
        rows.append(PromptRow(rid, lang, prompt, _label(record, where, pku=True), where))
    return rows


BUILTIN = {"sample": "the embedded sample set (46 harmful prompts in the paper's ten languages, base en)",
           "world": "the shipped synthetic world's held-out prompts (1024 records, half unsafe, five languages, "
           "base 'base'), which the world model reads"}  # fmt: skip
"""``--prompts`` names that are not files."""


def _builtin(name: str) -> tuple[list[PromptRow], str, list[str]]:
    """The rows of a :data:`BUILTIN` set, its layout name and its languages."""
    if name == "sample":
        from ..sample_data import LANGUAGES, SAMPLE_PATH

        return _read_package(SAMPLE_PATH, "jsonl", "en"), "sample", list(LANGUAGES)
    from ..transfer.world import World, world_config

    world = World(world_config("v2", 0))
    records = [{"id": f"heldout-{i}", "prompt": r["prompt"], "variants": r["variants"], "kind": r["kind"]}
               for i, r in enumerate(world.heldout_records())]  # fmt: skip
    where = [f"world[record {i}]" for i in range(len(records))]
    return (
        _variant_rows(records, where, world.config.base, records),
        "world",
        [world.config.base, *world.config.derived],
    )


def read_prompts(path: str | Path, input_format: str = "auto", languages: tuple[str, ...] | None = None,
                 base_language: str | None = None,
                 max_records: int | None = None) -> tuple[list[PromptRow], str]:  # fmt: skip
    """The prompt rows of ``path`` (a file, or a name of :data:`BUILTIN`) in ``languages`` (default: every language
    of the file, in its order) and the layout read. ``base_language``: the language of ``prompt`` in this package's
    and the LLaMA-Factory records (default: the first of ``languages`` when no record has a variant in it, else
    :data:`DEFAULT_BASE`) and of a PKU file without a language field (default: the first of ``languages``, else
    :data:`DEFAULT_BASE`). ``max_records``: the first that many records (in file order) only.

    Refused with a :class:`UsageError` (one line): a missing or empty file, an unknown layout, a requested language
    the file has no prompt in (naming it and the file), a bad record (naming its line or index)."""
    if input_format not in INPUT_FORMATS:
        raise UsageError(f"--input_format must be one of {', '.join(INPUT_FORMATS)}, got {input_format!r}")
    if max_records is not None and max_records < 1:
        raise UsageError(f"--max_records must be >= 1, got {max_records}")
    if str(path) in BUILTIN and not Path(path).exists():
        if input_format != "auto":
            raise UsageError(f"--input_format {input_format}: --prompts {path} is a built-in set; drop --input_format")
        rows, layout, builtin_languages = _builtin(str(path))
        if base_language is not None and base_language != builtin_languages[0]:
            raise UsageError(f"--base_language {base_language}: the base language of --prompts {path} is "
                             f"{builtin_languages[0]}; drop --base_language")  # fmt: skip
        return _select(rows, layout, str(path), languages, max_records)
    src = Path(path)
    if not src.is_file():
        raise UsageError(f"--prompts {src} is not a file; give a file of prompts (layouts in mlc safety --help)")
    if not _head(src).strip("\ufeff \t\r\n"):
        raise UsageError(f"--prompts {src} is empty; give a file of prompts (layouts in mlc safety --help)")
    layout = detect_layout(src) if input_format == "auto" else input_format
    if layout in ("jsonl", "llamafactory"):
        rows = _read_package(src, layout, base_language, languages)
    elif layout == "multijail":
        rows = _read_multijail(src)
    else:
        rows = _read_pku(src, base_language or (languages[0] if languages else DEFAULT_BASE))
    return _select(rows, layout, str(src), languages, max_records)


def _select(rows: list[PromptRow], layout: str, src: str, languages: tuple[str, ...] | None,
            max_records: int | None) -> tuple[list[PromptRow], str]:  # fmt: skip
    if max_records is not None:
        keep = set(list(dict.fromkeys(row.record for row in rows))[:max_records])
        rows = [row for row in rows if row.record in keep]
    present = list(dict.fromkeys(row.language for row in rows))
    if languages is None:
        return rows, layout
    missing = [lang for lang in languages if lang not in present]
    if missing:
        raise UsageError(
            f"--languages: {src} has no prompt in {', '.join(missing)} (it has {', '.join(present) or 'none'}; "
            f"read as {layout})"
        )
    return [row for row in rows if row.language in languages], layout
