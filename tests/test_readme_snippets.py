"""Every Python snippet of README.md runs as written (offline: the snippets that need a model use the mini model
of ``mlc_kernels.fixtures``), in a fresh namespace and an empty working folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_its_snippets():
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("index", range(len(SNIPPETS)), ids=lambda i: SNIPPETS[i].splitlines()[0][:40])
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
    code = SNIPPETS[index]
    if "trl" in code:
        pytest.importorskip("trl")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md snippet {index}", "exec"), {"__name__": f"readme_snippet_{index}"})
