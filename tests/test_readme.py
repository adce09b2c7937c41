"""README's usage snippet runs as written (on CPU here; the same code picks CUDA where there is one)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_usage_snippet_runs_and_trains_the_extractor():
    text = README.read_text()
    code = re.search(r"```python\n(.*?)```", text[text.index("## Usage") :], re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md (Usage)", "exec"), scope)
    assert torch.isfinite(scope["loss"])
    assert scope["head"].weight.grad is not None and scope["head"].weight.grad.abs().sum() > 0
    assert {"s1_share", "signed_between_prompt_cosine"} <= set(scope["stats"])
