"""What a comparison of alignment runs reports: the per-language tables, the CSV, the plots, a progress bar.

``results`` is the dict of :func:`.v2.run_comparison`: ``languages`` (base first), ``rows`` (row name -> run
key -> per-language behaviour, percent), ``collapse`` (row -> run key -> diagnostics), ``weights`` (row -> MLC
weight), ``layer``; ``curves``: row -> run key -> logged steps (:func:`.runs.step_curve`).
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path


def discrimination(result: dict[str, float]) -> float:
    """safety + helpfulness - 100: 0 = no unsafe-vs-benign discrimination, 100 = perfect."""
    return result["safety"] + result["helpfulness"] - 100.0


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (0 for one value)."""
    return statistics.mean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def format_tables(results: dict) -> str:
    """Per condition and language: discrimination, safety, helpfulness (mean ± std over seeds); collapse."""
    languages, rows = results["languages"], results["rows"]
    lines = []
    metrics = (("discrimination", discrimination), ("safety", lambda r: r["safety"]),
               ("helpfulness", lambda r: r["helpfulness"]))  # fmt: skip
    for title, fn in metrics:
        lines.append(f"{title} (%) on held-out prompts, mean ± std over seeds; avg = non-base languages")
        lines.append(f"{'':<26}" + "".join(f"{lang:>13}" for lang in [*languages, "avg"]))
        for name, by_seed in rows.items():
            cells = [mean_std([fn(r[lang]) for r in by_seed.values()]) for lang in languages]
            cells.append(mean_std([statistics.mean(fn(r[lang]) for lang in languages[1:]) for r in by_seed.values()]))
            weight = f" w={results['weights'][name]:g}" if name in results["weights"] else ""
            lines.append(f"{name + weight:<26}" + "".join(f"{m:>7.1f} ±{s:>4.1f}" for m, s in cells))
        lines.append("")
    lines.append(f"collapse diagnostics at layer {results['layer']} (held-out prompts, centred hidden states; mean "
                 "over seeds)")  # fmt: skip
    keys = sorted({k for by_seed in results["collapse"].values() for r in by_seed.values() for k in r})
    lines.append(f"{'':<26}" + "".join(f"{k[:22]:>24}" for k in keys))
    for name, by_seed in results["collapse"].items():
        vals = [statistics.mean(float(r[k]) for r in by_seed.values() if k in r) for k in keys]
        lines.append(f"{name:<26}" + "".join(f"{v:>24.3f}" for v in vals))
    return "\n".join(lines)


def write_csv(results: dict, path: Path) -> None:
    """One line per row x run x language: the MLC weight, discrimination, safety, helpfulness,
    private-data refusal (percent)."""
    languages = results["languages"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["condition", "weight", "run", "language", "discrimination", "safety", "helpfulness",
                         "private_refusal"])  # fmt: skip
        for name, by_seed in results["rows"].items():
            for key, result in by_seed.items():
                for lang in languages:
                    r = result[lang]
                    writer.writerow(
                        [
                            name,
                            results["weights"].get(name, 0.0),
                            key,
                            lang,
                            f"{discrimination(r):.2f}",
                            f"{r['safety']:.2f}",
                            f"{r['helpfulness']:.2f}",
                            f"{r['private_refusal']:.2f}",
                        ]
                    )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _spread_note(counts: set[int]) -> str:
    """How a figure's values summarise runs: ``one seed``, ``mean ± std over 3 seeds``, ``over 1-3 seeds``."""
    if counts == {1}:
        return "one seed"
    low, high = min(counts), max(counts)
    return f"mean ± std over {low} seeds" if low == high else f"mean ± std over {low}-{high} seeds"


def bars_figure(results: dict, title: str = ""):
    """The figure of :func:`plot_bars` (matplotlib ``Figure``): error bars only for rows with more than one run."""
    plt = _pyplot()
    languages, rows = results["languages"], results["rows"]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.85 / len(rows)
    for i, (name, by_seed) in enumerate(rows.items()):
        stats = [mean_std([discrimination(r[lang]) for r in by_seed.values()]) for lang in languages]
        spread = {"yerr": [s for _, s in stats], "capsize": 2} if len(by_seed) > 1 else {}
        ax.bar([j + i * width for j in range(len(languages))], [m for m, _ in stats], width, label=name, **spread)
    ax.set_xticks([j + 0.425 - width / 2 for j in range(len(languages))], languages)
    ax.set_xlabel("language of the held-out prompts (alignment data: base language only)")
    ax.set_ylabel("discrimination = safety + helpfulness - 100\n(percentage points)")
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.axhline(0, color="black", linewidth=0.8)
    note = _spread_note({len(by_seed) for by_seed in rows.values()})
    ax.set_title(f"{title or 'World v2: unsafe-vs-benign discrimination per language after base-language alignment'}"
                 f"; {note}")  # fmt: skip
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    return fig


def plot_bars(results: dict, path: Path, title: str = "") -> None:
    """Per-language discrimination (safety + helpfulness - 100) per condition: the mean over seeds, with the
    standard deviation as error bars where a row has more than one seed."""
    fig = bars_figure(results, title)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


CURVE_PANELS = (
    ("loss", "training loss (DPO + weight x MLC)", "loss (nats)"),
    ("mlc/loss", "MLC loss (training batch)", "MLC loss (dimensionless)"),
    ("mlc/between_prompt_cosine", "between-prompt cosine of extractor outputs\n(training batch, MLC layer)",
     "cosine (dimensionless, -1 to 1)"),
)  # fmt: skip
"""The panels of :func:`plot_curves`: logged key, panel title, y-axis label with its unit."""


def curves_figure(curves: dict, title: str = "Alignment diagnostics over training steps"):
    """The figure of :func:`plot_curves` (matplotlib ``Figure``): a line per row, the mean over its runs, with a
    band of ± one standard deviation only where a step has more than one run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(13, 3.8))
    counts = {len(by_run) for by_run in curves.values()} or {1}
    for ax, (key, panel, unit) in zip(axes, CURVE_PANELS, strict=True):
        for name, by_run in curves.items():
            points: dict[int, list[float]] = {}
            for run in by_run.values():
                for entry in run:
                    if key in entry:
                        points.setdefault(entry["step"], []).append(entry[key])
            if points:
                steps = sorted(points)
                stats = [mean_std(points[s]) for s in steps]
                (line,) = ax.plot(steps, [m for m, _ in stats], label=name, marker=".")
                if any(len(points[s]) > 1 for s in steps):
                    ax.fill_between(steps, [m - sd for m, sd in stats], [m + sd for m, sd in stats],
                                    color=line.get_color(), alpha=0.2, linewidth=0)  # fmt: skip
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("alignment step (optimizer steps)")
        ax.set_ylabel(unit)
        ax.ticklabel_format(axis="both", useOffset=False, style="plain")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title}; {_spread_note(counts)}")
    fig.tight_layout()
    return fig


def plot_curves(curves: dict, path: Path, title: str = "Alignment diagnostics over training steps") -> None:
    """Over training steps, the mean over runs (± std band where there are several): the training loss and (MLC
    runs) the MLC loss and the between-prompt cosine of the training batch's extractor outputs at the MLC layer."""
    fig = curves_figure(curves, title)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def write_run_files(results: dict, out: Path, stem: str, text: str) -> None:
    """One comparison's files in ``out``: ``{stem}.txt`` (``text``), ``.csv``, ``.json``, ``.png`` (bars) and
    ``{stem}_steps.png`` (the training curves)."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.txt").write_text(text)
    write_csv(results, out / f"{stem}.csv")
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str))
    plot_bars(results, out / f"{stem}.png")
    plot_curves(results["curves"], out / f"{stem}_steps.png")


class Progress:
    """A one-line text progress bar on stderr."""

    def __init__(self, width: int = 30) -> None:
        self.width = width

    def __call__(self, done: int, total: int, note: str = "") -> None:
        filled = round(self.width * done / max(1, total))
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {note:<40}{end}")
        sys.stderr.flush()
