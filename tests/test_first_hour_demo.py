"""Issue 20 (a new user's first hour), the demo's part: its table reproduces the recorded one (finding 6) and its
figures say what they show (finding 8)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlc_kernels.transfer import report

EXPECTED = Path(__file__).parent / "data" / "demo_expected.json"


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
