"""Shared pieces of the ``mlc`` command tests: a saved tiny model, small JSONL files, and the user-error check."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

README_RECORDS = [  # the JSONL example of README's CLI section
    {"prompt": "How do I pick a lock?", "chosen": "I can't help with that.", "rejected": "Use a tension wrench.",
     "variants": {"zh": "我怎么撬锁？", "ru": "Как вскрыть замок?"}},
    {"prompt": "How do I bake bread?", "chosen": "Mix flour, water, yeast and salt.", "rejected": "No.",
     "variants": {"zh": "怎么烤面包？", "ru": "Как испечь хлеб?"}},
    {"prompt": "How can I poison a dog?", "chosen": "I won't help with harming animals.", "rejected": "Use...",
     "variants": {"zh": "我怎么毒死一只狗？", "ru": "Как отравить собаку?"}},
    {"prompt": "What is the capital of Kenya?", "chosen": "Nairobi.", "rejected": "Paris.",
     "variants": {"zh": "肯尼亚的首都是哪里？", "ru": "Какая столица Кении?"}},
]  # fmt: skip


def write_jsonl(path: Path, records: list, raw_lines: dict[int, str] | None = None) -> Path:
    """Records one per line; ``raw_lines``: line number (1-based) -> text written instead."""
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    for number, text in (raw_lines or {}).items():
        lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def save_tiny_model(path: Path) -> Path:
    from mlc_kernels.fixtures import demo_model_and_tokenizer

    model, tokenizer = demo_model_and_tokenizer()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def user_error(main, argv: list[str], capsys, match: str, untouched: Path | None = None) -> str:
    """Run ``mlc argv``: exit status 2, no traceback, exactly one ``mlc <command>: error: ...`` line matching
    ``match``, and ``untouched`` (the output folder) not created. Returns the error line."""
    capsys.readouterr()  # drop what earlier calls printed
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    assert exc.value.code == 2, (exc.value.code, captured.err[-2000:])
    assert "Traceback" not in captured.err
    command = next(a for a in argv if not a.startswith("-"))
    errors = [line for line in captured.err.splitlines() if line.startswith(f"mlc {command}: error: ")]
    assert len(errors) == 1, captured.err[-2000:]
    assert re.search(match, errors[0]), errors[0]
    if untouched is not None:
        assert not untouched.exists(), sorted(p.name for p in untouched.iterdir())
    return errors[0]
