"""The wheel: built offline without pulling torch (no build isolation) from the tracked files alone, it holds exactly
the library, the user commands and the data they need (an explicit allow-list): no tests, no maintainer tools
(benchmarks/, the AOT check, the tuning sweep), no experiment history (experiments/)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

WORLD_V2 = ("chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "recipe.json",
            "tokenizer.json", "tokenizer_config.json")  # fmt: skip
ALLOWED = {
    *(f"mlc_kernels/{name}.py" for name in (
        "__init__", "checks", "errors", "fixtures", "fused_linear", "guards", "head", "hf", "loss", "metrics",
        "mlc_term", "recipes", "records", "sample_data", "trainers", "trl_trainers")),
    *(f"mlc_kernels/ops/{name}.py" for name in ("__init__", "common", "gram_torch", "native", "reference")),
    *(f"mlc_kernels/ops/triton/{name}.py" for name in ("__init__", "configs", "kernels", "launch", "op", "tuned")),
    "mlc_kernels/csrc/mlc_native.cpp",
    *(f"mlc_kernels/cli/{name}.py" for name in (
        "__init__", "__main__", "bench", "demo", "eval", "main", "options", "safety", "train", "train_args",
        "transfer")),
    *(f"mlc_kernels/safety/{name}.py" for name in ("__init__", "generate", "inputs", "judges", "report")),
    *(f"mlc_kernels/bench/{name}.py" for name in (
        "__init__", "counting", "fused_linear", "hf_capture", "loss", "runner", "train_step", "utils")),
    *(f"mlc_kernels/transfer/{name}.py" for name in (
        "__init__", "align", "demo", "evaluation", "gate", "options", "pretrain", "protocol", "report", "runs", "v2",
        "v3", "world")),
    *(f"mlc_kernels/transfer/data/world_v2/{name}" for name in WORLD_V2),
    "mlc_kernels/data/DATA_CARD.md", "mlc_kernels/data/ds_zero2.json", "mlc_kernels/data/safety_sample.jsonl",
    "mlc_kernels/data/refusal_phrases.json",
}  # fmt: skip


def _tracked_copy(dest: Path) -> Path:
    """The files git tracks (plus untracked, not ignored ones), copied to ``dest``: no stale ``build/`` folder."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.splitlines()  # fmt: skip
    for name in listed:
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


@pytest.mark.slow
def test_wheel_contents_match_the_allow_list(tmp_path):
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    source = _tracked_copy(tmp_path / "src")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", str(source),
         "-w", str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("mlc_kernels-*.whl")
    files = {n for n in zipfile.ZipFile(wheel).namelist() if ".dist-info/" not in n}
    assert not files - ALLOWED, f"in the wheel but not allowed: {sorted(files - ALLOWED)}"
    assert not ALLOWED - files, f"allowed but missing from the wheel: {sorted(ALLOWED - files)}"
