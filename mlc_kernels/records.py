"""Reading and checking MLC records for the ``mlc`` command: this package's JSONL (with line numbers) or the MLC
authors' LLaMA-Factory JSON (``multilingual_dpo``/``multilingual_sft``, with record indices), per-language
coverage, empty variants, unknown language codes, languages without data. Every problem is a
:class:`UsageError` naming the file and the line or record."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from .errors import UsageError
from .sample_data import PREFERENCE_ALGORITHMS, SAMPLE_PATH, validate_records

DATASET_FORMATS = ("auto", "jsonl", "llamafactory")
"""``--dataset_format``: ``auto`` (a file whose first non-space character is ``[`` is LLaMA-Factory JSON, any other
JSONL), ``jsonl`` (this package's records, one per line) or ``llamafactory`` (one JSON array of records)."""

EVAL = "eval"
"""``load_checked``'s algorithm for ``mlc eval``: only ``prompt`` and ``variants`` are read and checked."""

EVAL_PLACEHOLDER = "(not read by mlc eval)"
"""What ``chosen``/``rejected`` hold in the records of :data:`EVAL`: the dataset builder that ``mlc eval`` shares
with training wants them, and eval reads only the prompts."""

FORMATTINGS = {"dpo": "multilingual_dpo", "sft": "multilingual_sft"}
"""The MLC authors' LLaMA-Factory formattings (their ``data/dataset_info.json``): ``multilingual_dpo``: ``prompt``
(a sharegpt conversation), ``chosen``/``rejected`` (sharegpt assistant messages) and ``prompt_<lang>``;
``multilingual_sft``: ``instruction``, ``input``, ``output`` and ``prompt_<lang>`` (strings)."""

_VARIANT_COLUMN = re.compile(r"prompt_(.+)")
# LLaMA-Factory's default sharegpt tags (DatasetAttr in llamafactory/data/parser.py) and OpenAI-style roles
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_TOOL_ROLES = ("observation", "function_call", "function", "tool")
_TAGS = {"user": "'human'", "assistant": "'gpt'", "system": "'system'"}
_A = {"user": "a user", "assistant": "an assistant", "system": "a system"}


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


def _read_text(src: Path) -> str:
    try:
        return src.read_text(encoding="utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        raise UsageError(f"{src}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from err


def detect_format(path: str | Path) -> str:
    """``llamafactory`` when the file's first non-space character is ``[`` (one JSON array), else ``jsonl``."""
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    return "llamafactory" if head.startswith("[") else "jsonl"


# ---------------------------------------------------------------------------------------------------------------
# LLaMA-Factory JSON (the MLC authors' data: github.com/Yuyan-B/MLC, data/dataset_info.json)


def _kind(value) -> str:
    names = {type(None): "null", dict: "object", list: "array", str: "string", bool: "boolean"}
    return names.get(type(value), type(value).__name__)


def _message(message, name: str, label: str) -> tuple[str, str]:
    """``(role, content)`` of a sharegpt ``{"from", "value"}`` or OpenAI ``{"role", "content"}`` message."""
    if not isinstance(message, dict):
        raise UsageError(f"{label}: field '{name}' must be a message {{\"from\": ..., \"value\": ...}}, "
                         f"got {_kind(message)}")  # fmt: skip
    role_key, content_key = ("from", "value") if "from" in message else ("role", "content")
    if role_key not in message:
        raise UsageError(f"{label}: field '{name}' is not a message: it has neither 'from'/'value' (sharegpt) "
                         "nor 'role'/'content'")  # fmt: skip
    tag, content = message[role_key], message.get(content_key)
    if tag in _TOOL_ROLES:
        raise UsageError(f"{label}: field '{name}' is a tool turn ({role_key} {tag!r}); MLC records take user, "
                         "assistant and system messages only")  # fmt: skip
    if tag not in _ROLES:
        raise UsageError(f"{label}: field '{name}.{role_key}' is {tag!r}; expected 'human' (user), 'gpt' "
                         "(assistant) or 'system'")  # fmt: skip
    if not isinstance(content, str):
        raise UsageError(f"{label}: field '{name}.{content_key}' must be a string, got {_kind(content)}")
    return _ROLES[tag], content


def _conversation(value: list, name: str, label: str) -> list[dict]:
    """A prompt conversation as OpenAI-style messages: an optional system message, then user and assistant turns
    alternating, ending with the user's."""
    messages = [dict(zip(("role", "content"), _message(m, f"{name}[{i}]", label), strict=True))
                for i, m in enumerate(value)]  # fmt: skip
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    offset = len(messages) - len(turns)
    for i, message in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if message["role"] != want:
            raise UsageError(
                f"{label}: field '{name}[{i + offset}]' is {_A[message['role']]} message where {_A[want]} message "
                f"({_TAGS[want]}) is expected; a prompt is [system,] human, gpt, human, ..., human"
            )
    if not turns or turns[-1]["role"] != "user":
        last = f"its last message is {_A[messages[-1]['role']]} message" if messages else "it has no message"
        raise UsageError(f"{label}: field '{name}' must end with a user message ('from': 'human'); {last}")
    return messages


def _prompt(value, name: str, label: str):
    """The base-language prompt: a string, or a conversation (a single user message becomes its text)."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        messages = _conversation(value, name, label)
        if not messages[-1]["content"].strip():
            raise UsageError(f"{label}: field '{name}[{len(messages) - 1}]' is an empty user message; give the prompt")
        return messages[0]["content"] if len(messages) == 1 else messages
    if not isinstance(value, str):
        raise UsageError(f"{label}: field '{name}' must be a string or a conversation "
                         f"[{{\"from\": \"human\", \"value\": ...}}], got {_kind(value)}")  # fmt: skip
    if not value.strip():
        raise UsageError(f"{label}: field '{name}' is empty; give the prompt")
    return value


def _variant(value, name: str, label: str) -> str | None:
    """A translated prompt's text (the last user message of a conversation); None when missing or empty, as in
    the authors' converter."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        if not value:
            return None
        value = _conversation(value, name, label)[-1]["content"]
    if not isinstance(value, str):
        raise UsageError(f"{label}: field '{name}' must be a string, a message or a conversation, "
                         f"got {_kind(value)}")  # fmt: skip
    return value if value.strip() else None


def _response(value, name: str, label: str) -> str:
    """``chosen``/``rejected``: an assistant message (``{"from": "gpt", "value": ...}``, or a list of one) or a
    string."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        role, value = _message(value, name, label)
        if role != "assistant":
            raise UsageError(f"{label}: field '{name}' is {_A[role]} message; it must be the assistant's "
                             "('from': 'gpt')")  # fmt: skip
    if not isinstance(value, str):
        raise UsageError(f"{label}: field '{name}' must be an assistant message {{\"from\": \"gpt\", \"value\": ...}} "
                         f"or a string, got {_kind(value)}")  # fmt: skip
    if not value.strip():
        raise UsageError(f"{label}: field '{name}' is empty; give the response")
    return value


def _text(record: dict, name: str, label: str, required: bool) -> str:
    if name not in record or record[name] is None:
        if required:
            raise UsageError(f"{label}: missing field '{name}' (the multilingual_sft formatting: instruction, "
                             "input, output, prompt_<lang>)")  # fmt: skip
        return ""
    if not isinstance(record[name], str):
        raise UsageError(f"{label}: field '{name}' must be a string, got {_kind(record[name])}")
    return record[name]


def _formatting(record: dict, src: Path) -> str:
    if "chosen" in record or "rejected" in record:
        return "dpo"
    if "instruction" in record or "output" in record:
        return "sft"
    raise UsageError(
        f"{src}[record 0]: neither LLaMA-Factory formatting: multilingual_dpo has prompt, chosen, rejected, "
        f"multilingual_sft has instruction, input, output; the record has {', '.join(map(repr, record)) or 'no field'}"
    )


def _check_fit(formatting: str, algorithm: str, src: Path) -> None:
    if formatting == "sft" and algorithm in PREFERENCE_ALGORITHMS:
        raise UsageError(
            f"{src}: the multilingual_sft formatting (instruction, input, output) has no chosen/rejected, which "
            f"--algorithm {algorithm} needs; give the multilingual_dpo formatting or use --algorithm sft"
        )
    if formatting == "dpo" and algorithm == "sft":
        raise UsageError(
            f"{src}: the multilingual_dpo formatting (prompt, chosen, rejected) has no output, which --algorithm sft "
            "needs; give the multilingual_sft formatting (instruction, input, output) or a preference algorithm"
        )


def _convert(record: dict, formatting: str, algorithm: str, label: str) -> dict:
    if formatting == "dpo":
        if "prompt" not in record:
            raise UsageError(f"{label}: missing field 'prompt' (the multilingual_dpo formatting: prompt, chosen, "
                             "rejected, prompt_<lang>)")  # fmt: skip
        out = {"prompt": _prompt(record["prompt"], "prompt", label)}
        if algorithm != EVAL:
            for name in ("chosen", "rejected"):
                if name not in record:
                    raise UsageError(f"{label}: missing field '{name}' (the multilingual_dpo formatting: prompt, "
                                     "chosen, rejected, prompt_<lang>)")  # fmt: skip
                out[name] = _response(record[name], name, label)
    else:  # the converter's "instruction\ninput" (each only when non-empty)
        instruction = _text(record, "instruction", label, required=True)
        query = _text(record, "input", label, required=False)
        text = "\n".join(part for part in (instruction, query) if part)
        if not text.strip():
            raise UsageError(f"{label}: fields 'instruction' and 'input' are both empty; give the prompt")
        out = {"prompt": text}
        if algorithm != EVAL:
            output = _text(record, "output", label, required=True)
            if not output.strip():
                raise UsageError(f"{label}: field 'output' is empty; give the response (or drop the record)")
            out["completion"] = output
    out["variants"] = {
        match.group(1): _variant(value, name, label)
        for name, value in record.items()
        if (match := _VARIANT_COLUMN.fullmatch(name))
    }
    return out


def read_llamafactory(path: str | Path, algorithm: str) -> tuple[list[dict], list[str]]:
    """This package's records from the MLC authors' LLaMA-Factory JSON (one array of records, ``multilingual_dpo``
    or ``multilingual_sft``, told apart by record 0's fields), and a ``file[record i]`` label for each.

    ``prompt`` (dpo) is a sharegpt conversation ``[{"from": "human", "value": ...}]`` (tags human/gpt/system), or
    an OpenAI-style one (``role``/``content``), or a string; a single user message becomes a string prompt.
    ``chosen``/``rejected`` are assistant messages ``{"from": "gpt", "value": ...}`` or strings. The sft prompt is
    ``instruction + "\\n" + input`` (input only when non-empty), ``output`` the completion. Every ``prompt_<lang>``
    column is a variant in ``<lang>`` (any code, not only the paper's ten): a string, a message or a conversation
    (its last user message); null, empty and whitespace-only translations are missing (null), as in the
    authors' converter. Other columns are ignored."""
    src = Path(path)
    text = _read_text(src)
    if not text.lstrip().startswith("["):
        start = text.lstrip()[:1]
        raise UsageError(
            f"{src}: --dataset_format llamafactory expects one JSON array of records [{{...}}, ...]; the file "
            + (f"starts with {start!r} (JSONL? use --dataset_format jsonl or auto)" if start else "is empty")
        )
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(
            f"{src}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); fix the file"
        ) from err
    if not isinstance(data, list):  # "[1] x": a parse error above; kept for safety
        raise UsageError(f"{src}: expected one JSON array of records, got {_kind(data)}")
    if not data:
        raise UsageError(f"{src} holds no records (an empty JSON array)")
    where = [f"{src}[record {i}]" for i in range(len(data))]
    for item, label in zip(data, where, strict=True):
        if not isinstance(item, dict):
            raise UsageError(f"{label}: expected a JSON object (a record), got {_kind(item)}")
    formatting = _formatting(data[0], src)
    _check_fit(formatting, algorithm, src)
    return [_convert(r, formatting, algorithm, label) for r, label in zip(data, where, strict=True)], where


# ---------------------------------------------------------------------------------------------------------------


def load_checked(
    source: str, algorithm: str, split: str | None = None, dataset_format: str = "auto"
) -> tuple[list[dict], list[str]]:
    """Records of ``source`` (a JSONL or LLaMA-Factory JSON path, or ``sample`` with ``split``) validated for
    ``algorithm`` (or :data:`EVAL`: prompts only), and a ``file:line`` or ``file[record i]`` label for each."""
    if dataset_format not in DATASET_FORMATS:
        raise UsageError(f"--dataset_format must be one of {', '.join(DATASET_FORMATS)}, got {dataset_format!r}")
    if source == "sample":
        if dataset_format == "llamafactory":
            raise UsageError("--dataset_format llamafactory: 'sample' is the embedded JSONL set; give a file")
        path, kind = SAMPLE_PATH, "jsonl"
    else:
        path = Path(source)
        if not path.is_file():
            raise UsageError(
                f"the dataset {path} is not a file; give a JSONL file of records, a LLaMA-Factory JSON file or 'sample'"
            )
        kind = detect_format(path) if dataset_format == "auto" else dataset_format
        if dataset_format == "jsonl" and detect_format(path) == "llamafactory":
            raise UsageError(f"{path}: --dataset_format jsonl, but the file is one JSON array (LLaMA-Factory JSON?); "
                             "use --dataset_format llamafactory or auto")  # fmt: skip
    if kind == "llamafactory":
        records, where = read_llamafactory(path, algorithm)
    else:
        records, lines = read_jsonl(path)
        where = [f"{path}:{line}" for line in lines]
    if source == "sample" and split is not None:
        keep = [i for i, r in enumerate(records) if r.get("split") == split]
        records, where = [records[i] for i in keep], [where[i] for i in keep]
    for i, (record, label) in enumerate(zip(records, where, strict=True)):
        try:
            validate_records([record], algorithm)
        except ValueError as err:
            detail = str(err).split(": ", 1)[-1]
            raise UsageError(f"{label}: {detail}; fix the record (format in README)") from err
        if algorithm == EVAL:
            records[i] = {**record, "chosen": EVAL_PLACEHOLDER, "rejected": EVAL_PLACEHOLDER}
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
