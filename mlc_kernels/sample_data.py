"""The MLC data format, its validation, and the embedded sample set (``data/safety_sample.jsonl``).

A record: ``prompt`` (a string, or a conversation whose last user message is the prompt), the
alignment fields of the algorithm (``chosen``/``rejected`` for preference methods, ``completion`` for
SFT) and ``variants``: language code -> translated prompt (missing languages allowed; they become the
mask of the loss). See ``data/DATA_CARD.md`` for the sample set.
"""

from __future__ import annotations

import json
from pathlib import Path

LANGUAGES: tuple[str, ...] = ("en", "zh", "ru", "ja", "ar", "bn", "sw", "ur", "ps", "ku")
"""The ten languages of the paper's evaluation; ``en`` is the base language of the sample set."""

SAMPLE_PATH = Path(__file__).resolve().parent / "data" / "safety_sample.jsonl"
PREFERENCE_ALGORITHMS = ("dpo", "orpo", "cpo", "simpo")
ALGORITHMS = (*PREFERENCE_ALGORITHMS, "sft")


def required_fields(algorithm: str) -> tuple[str, ...]:
    """The fields a record needs for ``algorithm``; ``"eval"``: the prompts only (``mlc eval``)."""
    if algorithm == "eval":
        return ("prompt", "variants")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    return ("prompt", "variants", "completion") if algorithm == "sft" else ("prompt", "variants", "chosen", "rejected")


def validate_records(records: list[dict], algorithm: str) -> list[dict]:
    """Raise ``ValueError`` naming the record (index and id) and the field when a record is malformed."""
    fields = required_fields(algorithm)
    if not records:
        raise ValueError("the dataset has no records")
    for i, record in enumerate(records):
        where = f"record {i}" + (f" ({record['id']})" if isinstance(record, dict) and "id" in record else "")
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for name in fields:
            if name not in record:
                raise ValueError(f"{where}: missing field '{name}' (needed for {algorithm})")
        for name in fields:
            value = record[name]
            if name == "variants":
                if not isinstance(value, dict):
                    raise ValueError(f"{where}: field 'variants' must map language codes to prompts")
                for lang, text in value.items():
                    if text is not None and not isinstance(text, str):
                        raise ValueError(f"{where}: field 'variants.{lang}' must be a string or null")
            elif not isinstance(value, (str, list)) or not value:
                raise ValueError(f"{where}: field '{name}' must be a non-empty string or conversation")
    return records


def load_records(path: str | Path, algorithm: str) -> list[dict]:
    """Records of a JSONL file, validated for ``algorithm``."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from err
    return validate_records(records, algorithm)


def load_sample(split: str = "train", algorithm: str = "dpo") -> list[dict]:
    """The embedded sample set: ``split`` is ``"train"`` (40 prompts) or ``"heldout"`` (6)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return [r for r in load_records(SAMPLE_PATH, algorithm) if r["split"] == split]


def to_dataset(records: list[dict], algorithm: str, languages: tuple[str, ...] = LANGUAGES, base_language: str = "en"):
    """A Hugging Face ``datasets.Dataset`` in TRL's conversational format, with ``variants`` holding every
    language of ``languages`` (None where missing)."""
    import datasets

    validate_records(records, algorithm)

    def conv(role: str, content):
        return content if isinstance(content, list) else [{"role": role, "content": content}]

    rows = []
    for r in records:
        row = {
            "prompt": conv("user", r["prompt"]),
            "variants": {lang: r["variants"].get(lang) for lang in languages if lang != base_language},
        }
        if algorithm == "sft":
            row["completion"] = conv("assistant", r["completion"])
        else:
            row["chosen"], row["rejected"] = conv("assistant", r["chosen"]), conv("assistant", r["rejected"])
        rows.append(row)
    return datasets.Dataset.from_list(rows)
