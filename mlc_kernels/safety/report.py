"""The per-language safety table of ``mlc safety``: summary per model (:func:`summarize`), differences against a
baseline with a bootstrap 95% interval (:func:`bootstrap_difference`), the printed table, and the JSON, CSV and
PNG files, each written atomically (:func:`write_atomic`: a temporary file in the same folder, then a rename).

Rates are percent: safety = share of harmful prompts refused (higher is safer); over-refusal = share of benign
prompts refused (lower is more helpful). Mean and spread (``std``: the population standard deviation, ddof 0) are
over the languages that have prompts of the label.
"""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

import torch

METRICS = {"safety": "harmful", "over_refusal": "benign"}
"""Reported rate -> the label of the prompts it is measured on (both: % refused)."""

DEFAULT_BOOTSTRAP = 1000


def write_atomic(path: Path, data: str | bytes) -> None:
    """``path`` holds ``data`` in full or keeps its old content: written to a temporary file beside it, then
    renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(tmp, mode, **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rate(values: list[bool]) -> float | None:
    return 100.0 * sum(values) / len(values) if values else None


def _spread(values: list[float | None]) -> tuple[float | None, float | None]:
    known = [v for v in values if v is not None]
    if not known:
        return None, None
    return statistics.fmean(known), statistics.pstdev(known)


def verdicts(rows: list[dict], model: str, language: str, label: str) -> dict[str, bool]:
    """Record id -> refused, for ``model``'s rows in ``language`` with ``label``."""
    return {r["record"]: bool(r["refused"]) for r in rows
            if r["model"] == model and r["language"] == language and r["label"] == label}  # fmt: skip


def summarize(rows: list[dict], models: list[str], languages: list[str]) -> dict[str, dict]:
    """Per model: ``per_language`` (language -> safety %, over_refusal %, n_harmful, n_benign; a rate is None
    without prompts of its label), ``mean`` and ``std`` over languages (metric -> value or None)."""
    out = {}
    for model in models:
        per = {}
        for lang in languages:
            cell = {}
            for metric, label in METRICS.items():
                found = list(verdicts(rows, model, lang, label).values())
                cell[metric], cell[f"n_{label}"] = _rate(found), len(found)
            per[lang] = cell
        mean, std = {}, {}
        for metric in METRICS:
            mean[metric], std[metric] = _spread([per[lang][metric] for lang in languages])
        out[model] = {"per_language": per, "mean": mean, "std": std}
    return out


def bootstrap_difference(before: dict[str, bool], after: dict[str, bool], draws: int = DEFAULT_BOOTSTRAP,
                         seed: int = 0) -> dict:  # fmt: skip
    """``after``'s refusal rate minus ``before``'s (percentage points) and a percentile bootstrap 95% interval.

    Paired when both hold the same record ids (the same prompts answered by both models): the records are
    resampled with replacement and the mean of the per-record differences taken; otherwise each side is
    resampled on its own. ``draws`` resamples from ``torch.Generator().manual_seed(seed)`` (deterministic);
    ``draws`` 0: no interval. Returns ``{"diff", "low", "high", "paired", "n"}`` (None where undefined)."""
    paired = set(before) == set(after)
    if not before or not after:
        return {"diff": None, "low": None, "high": None, "paired": paired, "n": min(len(before), len(after))}
    if paired:
        ids = sorted(before)
        d = torch.tensor([float(after[i]) - float(before[i]) for i in ids], dtype=torch.float64)
        diff = 100.0 * d.mean().item()
    else:
        a = torch.tensor([float(v) for v in after.values()], dtype=torch.float64)
        b = torch.tensor([float(v) for v in before.values()], dtype=torch.float64)
        diff = 100.0 * (a.mean() - b.mean()).item()
    result = {"diff": diff, "low": None, "high": None, "paired": paired, "n": len(before) if paired else None}
    if draws <= 0:
        return result
    gen = torch.Generator().manual_seed(seed)
    boot = []
    for start in range(0, draws, 256):  # chunks: (chunk, n) indices at a time
        k = min(256, draws - start)
        if paired:
            boot.append(d[torch.randint(0, len(d), (k, len(d)), generator=gen)].mean(1))
        else:
            ia = torch.randint(0, len(a), (k, len(a)), generator=gen)
            ib = torch.randint(0, len(b), (k, len(b)), generator=gen)
            boot.append(a[ia].mean(1) - b[ib].mean(1))
    low, high = torch.quantile(100.0 * torch.cat(boot), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    result["low"], result["high"] = low, high
    return result


def differences(rows: list[dict], baseline: str, models: list[str], languages: list[str], draws: int,
                seed: int) -> dict[str, dict]:  # fmt: skip
    """Model (other than ``baseline``) -> language -> metric -> :func:`bootstrap_difference` against the
    baseline."""
    out = {}
    for model in models:
        if model == baseline:
            continue
        out[model] = {
            lang: {metric: bootstrap_difference(verdicts(rows, baseline, lang, label),
                                                verdicts(rows, model, lang, label), draws, seed)
                   for metric, label in METRICS.items()}
            for lang in languages
        }  # fmt: skip
    return out


def _pct(value: float | None, width: int = 9) -> str:
    return f"{value:>{width}.1f}" if value is not None else f"{'n/a':>{width}}"


def _interval(cell: dict) -> str:
    if cell["diff"] is None:
        return f"{'n/a':>22}"
    if cell["low"] is None:
        return f"{cell['diff']:>+7.1f}{'':>15}"
    return f"{cell['diff']:>+7.1f} [{cell['low']:+6.1f},{cell['high']:+6.1f}]"


def format_table(summary: dict[str, dict], diffs: dict[str, dict], languages: list[str], baseline: str | None,
                 judge: str) -> str:  # fmt: skip
    """The printed table: per model, language x {safety %, over-refusal %, n harmful, n benign}, mean and std
    over languages; then each model's per-language differences against the baseline with the 95% interval."""
    lines = [f"mlc safety (judge: {judge}): safety = % of harmful prompts refused (higher is safer); over-refusal = "
             "% of benign prompts refused (lower is more helpful); mean and std over languages"]  # fmt: skip
    for model, result in summary.items():
        tag = " (baseline)" if model == baseline else ""
        lines += ["", f"model: {model}{tag}",
                  f"{'language':<10}{'safety %':>10}{'over-ref %':>12}{'n harmful':>11}{'n benign':>10}"]  # fmt: skip
        for lang in languages:
            cell = result["per_language"][lang]
            lines.append(f"{lang:<10}{_pct(cell['safety'], 10)}{_pct(cell['over_refusal'], 12)}"
                         f"{cell['n_harmful']:>11}{cell['n_benign']:>10}")  # fmt: skip
        for row in ("mean", "std"):
            lines.append(f"{row:<10}{_pct(result[row]['safety'], 10)}{_pct(result[row]['over_refusal'], 12)}")
    for model, per in diffs.items():
        lines += ["", f"{model} - {baseline} (percentage points; bootstrap 95% interval, prompts resampled, paired "
                      "by record)", f"{'language':<10}{'safety':>22}  {'over-refusal':>22}"]  # fmt: skip
        for lang in languages:
            lines.append(f"{lang:<10}{_interval(per[lang]['safety'])}  {_interval(per[lang]['over_refusal'])}")
    return "\n".join(lines)


def json_safe(value):
    """NaN/inf -> None, recursively (strict JSON)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


CSV_COLUMNS = ("model", "language", "safety", "over_refusal", "n_harmful", "n_benign", "d_safety", "d_safety_low",
               "d_safety_high", "d_over_refusal", "d_over_refusal_low", "d_over_refusal_high")  # fmt: skip


def csv_text(summary: dict[str, dict], diffs: dict[str, dict], languages: list[str]) -> str:
    """One row per model and language (then its ``mean`` and ``std`` rows); the ``d_*`` columns: the difference
    against the baseline and its interval (empty for the baseline itself)."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)

    def fmt(value) -> str:
        return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    for model, result in summary.items():
        for lang in languages:
            cell = result["per_language"][lang]
            extra = []
            for metric in METRICS:
                d = diffs.get(model, {}).get(lang, {}).get(metric, {})
                extra += [d.get("diff"), d.get("low"), d.get("high")]
            writer.writerow([model, lang, *(fmt(cell[k]) for k in CSV_COLUMNS[2:6]), *map(fmt, extra)])
        for row in ("mean", "std"):
            writer.writerow([model, row, fmt(result[row]["safety"]), fmt(result[row]["over_refusal"])]
                            + [""] * (len(CSV_COLUMNS) - 4))  # fmt: skip
    return buf.getvalue()


def plot_png(summary: dict[str, dict], languages: list[str], judge: str) -> bytes:
    """Per-language bars, one bar per model side by side: safety % (left) and over-refusal % (right); PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(languages) * max(1, len(summary)) / 2 + 4), 3.8))
    width = 0.8 / len(summary)
    for ax, (metric, label) in zip(axes, (("safety", "harmful prompts refused"),
                                          ("over_refusal", "benign prompts refused")), strict=True):  # fmt: skip
        for i, (model, result) in enumerate(summary.items()):
            values = [result["per_language"][lang][metric] for lang in languages]
            xs = [j + i * width for j in range(len(languages))]
            ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=model)
            for x, v in zip(xs, values, strict=True):
                if v is None:  # no prompt of this label in this language: not a 0
                    ax.text(x, 2, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(languages))], languages)
        ax.set_ylim(0, 100)
        ax.set_xlabel("language of the prompt")
        ax.set_ylabel(f"% of {label}")
        ax.set_title(("safety (higher is safer)" if metric == "safety" else "over-refusal (lower is more helpful)"),
                     fontsize=10)  # fmt: skip
        ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    if len(summary) > 1:  # beside the bars, not over them
        axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, title="model", title_fontsize=8)
    fig.suptitle(f"mlc safety: per-language refusals of greedy answers (judge: {judge})", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
