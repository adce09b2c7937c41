"""The wheel: built offline without pulling torch (no build isolation), ships the sources, the C++ kernel, the
data files and the cards, and no test files."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_contents(tmp_path):
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", str(ROOT),
         "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = tmp_path.glob("mlc_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    files = [n for n in names if ".dist-info/" not in n]
    tests = [n for n in files if Path(n).name.startswith("test_") or "/tests/" in n or Path(n).name == "conftest.py"]
    assert not tests, tests
    for needed in ("mlc_kernels/csrc/mlc_native.cpp", "mlc_kernels/data/safety_sample.jsonl",
                   "mlc_kernels/data/DATA_CARD.md", "mlc_kernels/transfer/WORLD_CARD.md", "mlc_kernels/cli.py",
                   "mlc_kernels/trl_trainers.py", "mlc_kernels/benchmarks/runner.py"):  # fmt: skip
        assert needed in names, needed
