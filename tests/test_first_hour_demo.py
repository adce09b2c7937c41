"""Issue 20 (a new user's first hour), the demo's part: its table reproduces the recorded one (finding 6) and its
figures say what they show (finding 8)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from mlc_kernels.transfer import report

EXPECTED = Path(__file__).parent / "demo_expected.json"
"""The recorded ``mlc demo`` table (default settings); recorded by ``python tests/test_first_hour_demo.py``."""
NUMBER = re.compile(r"-?\d+\.\d+")


def demo_table(out: str) -> dict:
    """The parts of ``mlc demo``'s output that are its result: the per-language table, the collapse lines and the
    verdict with the headline gain (up to its explanation in brackets)."""
    lines = out.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("per language, held-out prompts")))
    gap = lines.index("", start)
    verdict = next(line for line in lines if line.startswith("MLC "))
    collapse = [line for line in lines[gap + 2 : lines.index(verdict)] if line.strip()]
    return {"rows": lines[start + 1 : gap], "collapse": collapse, "verdict": verdict.split(" (")[0]}


def run_the_demo(out_dir: Path, capsys) -> str:
    from mlc_kernels.cli import main

    capsys.readouterr()
    main(["demo", "--out", str(out_dir)])
    return capsys.readouterr().out


def saved_figures(monkeypatch) -> list:
    """Every matplotlib figure saved from now on (as it was when saved)."""
    from matplotlib.figure import Figure

    saved, original = [], Figure.savefig

    def savefig(self, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


def check_axes(ax) -> None:
    """A title, both axes labelled, a unit on the value axis, no offset notation ("1e-7+1")."""
    ax.figure.canvas.draw()
    assert ax.get_title(), "no title"
    assert ax.get_xlabel() and ax.get_ylabel(), (ax.get_xlabel(), ax.get_ylabel())
    assert "(" in ax.get_ylabel(), f"no unit: {ax.get_ylabel()!r}"
    assert ax.yaxis.get_offset_text().get_text() == "" and ax.xaxis.get_offset_text().get_text() == ""


def curve(values: list[float]) -> list[dict]:
    return [{"step": 10 * (i + 1), "loss": v, "mlc/loss": 1 + v * 1e-7, "mlc/between_prompt_cosine": 1 - v * 1e-7}
            for i, v in enumerate(values)]  # fmt: skip


def results_of(runs: int) -> dict:
    languages = ["base", "high1", "low1"]
    row = {lang: {"safety": 90.0 + k, "helpfulness": 50.0, "private_refusal": 100.0} for k, lang in
           enumerate(languages)}  # fmt: skip
    rows = {name: {f"s{seed}": {lang: {**v, "safety": v["safety"] - seed} for lang, v in row.items()}
                   for seed in range(runs)} for name in ("DPO", "DPO+MLC")}  # fmt: skip
    return {"languages": languages, "rows": rows}


@pytest.mark.parametrize("runs", [1, 3])
def test_figures_have_titles_units_and_spread_only_where_there_is_one(tmp_path, monkeypatch, runs):
    """Finding 8: the demo's steps PNG said "mean over seeds" and drew error bars for one seed."""
    from matplotlib.collections import PolyCollection

    saved = saved_figures(monkeypatch)
    curves = {name: {f"s{seed}": curve([0.7 - 0.1 * i + 0.01 * seed for i in range(4)]) for seed in range(runs)}
              for name in ("DPO", "DPO+MLC")}  # fmt: skip
    report.plot_curves(curves, tmp_path / "steps.png")
    report.plot_bars(results_of(runs), tmp_path / "bars.png", title="mlc demo: discrimination per language")
    steps, bars = saved
    title = steps._suptitle.get_text()
    assert ("one seed" in title) == (runs == 1) and ("over 3 seeds" in title) == (runs == 3), title
    for ax in steps.axes:
        check_axes(ax)
        assert any(isinstance(c, PolyCollection) for c in ax.collections) == (runs > 1)  # the ± std band
    (ax,) = bars.axes
    check_axes(ax)
    from matplotlib.container import ErrorbarContainer

    assert any(isinstance(c, ErrorbarContainer) for c in ax.containers) == (runs > 1)
    assert ("one seed" in ax.get_title()) == (runs == 1)
    for name in ("steps.png", "bars.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_the_demo_reproduces_its_recorded_table(tmp_path, capsys):
    """Finding 6: README's demo numbers moved with a transformers patch release (bf16 autocast on CPU, sdpa);
    the demo now computes in fp32 with eager attention on one thread per run, and its table is the recorded one.
    Also what a user gets: the PNGs, the starting model, no per-step dicts."""
    pytest.importorskip("trl")
    from mlc_kernels.transfer.pretrain import SHIPPED

    if not (SHIPPED / "model.safetensors").is_file():
        pytest.skip("no shipped checkpoint")
    out = run_the_demo(tmp_path, capsys)
    got, expected = demo_table(out), json.loads(EXPECTED.read_text())
    assert got["rows"] == expected["rows"], "\n".join(["got:", *got["rows"], "recorded:", *expected["rows"]])
    assert got["verdict"] == expected["verdict"]
    assert len(got["collapse"]) == len(expected["collapse"])
    for line, recorded in zip(got["collapse"], expected["collapse"], strict=True):  # AVX2 vs AVX-512: 5.324 vs 5.331
        assert NUMBER.sub("#", line) == NUMBER.sub("#", recorded)
        assert [float(v) for v in NUMBER.findall(line)] == pytest.approx(
            [float(v) for v in NUMBER.findall(recorded)], rel=3e-3, abs=3e-3), (line, recorded)  # fmt: skip
    for name in ("mlc_demo_languages.png", "mlc_demo_steps.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert (tmp_path / "model" / "config.json").is_file()
    assert "{'" not in out  # no per-step dicts


def record(path: Path = EXPECTED) -> None:
    """Run ``mlc demo`` (default settings) and record its table in ``path`` with the library versions."""
    import contextlib
    import io
    import tempfile
    from importlib.metadata import version

    from mlc_kernels.cli import main

    buffer = io.StringIO()
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(buffer):
        main(["demo", "--out", out])
    table = demo_table(buffer.getvalue())
    table["recorded_with"] = {name: version(name) for name in ("torch", "transformers", "trl", "accelerate")}
    table["command"] = "python tests/test_first_hour_demo.py"
    path.write_text(json.dumps(table, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print("\n".join([*table["rows"], "", *table["collapse"], table["verdict"], f"recorded in {path}"]))


if __name__ == "__main__":
    record(Path(sys.argv[1]) if len(sys.argv) > 1 else EXPECTED)
