"""Compare the medians of two ``mlc-bench`` CSVs cell by cell (the run-to-run stability check).

``python -m benchmarks.compare_runs A/mlc_bench.csv B/mlc_bench.csv --tolerance 0.2``: prints every cell's
ratio of medians (B / A; ``--stat min_ms`` compares the minima) and each run's IQR relative to its
median, and exits 1 when a cell differs by more than the tolerance. The runs' ``calibration`` rows (a fixed
matmul timed in every pass) show whether the machine itself ran at a different speed; ``--normalise`` divides
every cell by its run's calibration median before comparing.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

KEY_FIELDS = ("device", "impl", "dtype", "N", "m", "d", "d_h", "mode", "variant", "threads")


def load(path: Path) -> dict[tuple[str, ...], dict[str, str]]:
    """Rows of a runner CSV keyed by the fields that name a cell."""
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return {tuple(r.get(k, "") for k in KEY_FIELDS): r for r in rows}


CALIBRATION = "calibration"


def _calibration(rows: dict[tuple[str, ...], dict[str, str]], stat: str) -> float | None:
    found = [float(r[stat]) for key, r in rows.items() if key[1] == CALIBRATION]
    return found[0] if found else None


def compare(
    a: Path, b: Path, tolerance: float, stat: str = "median_ms", normalise: bool = False
) -> tuple[list[str], float]:
    """Lines of the report and the largest relative difference of ``stat``, ``max(B/A, A/B) - 1`` (cells divided
    by their run's calibration first when ``normalise``)."""
    ra, rb = load(a), load(b)
    lines, head, worst = [], [], 0.0
    ca, cb = _calibration(ra, stat), _calibration(rb, stat)
    if normalise and (ca is None or cb is None):
        raise SystemExit("compare_runs: --normalise needs a calibration row in both files (runner with --rounds)")
    scale_a, scale_b = (ca, cb) if normalise else (1.0, 1.0)
    if ca is not None and cb is not None:
        head.append(f"machine speed: calibration B/A {cb / ca:.2f}{' (divided out)' if normalise else ''}")
    for key in ra.keys() & rb.keys():
        if key[1] == CALIBRATION:
            continue
        ma, mb = float(ra[key][stat]) / scale_a, float(rb[key][stat]) / scale_b
        diff = max(ma / mb, mb / ma) - 1
        worst = max(worst, diff)
        iqr_a = float(ra[key]["iqr_ms"]) / float(ra[key]["median_ms"])
        iqr_b = float(rb[key]["iqr_ms"]) / float(rb[key]["median_ms"])
        cell = " ".join(v for v in key[1:] if v)
        flag = "  <-- over tolerance" if diff > tolerance else ""
        unit = "x cal" if normalise else "ms"
        lines.append(f"{cell:<40} A {ma:10.3f} {unit}  B {mb:10.3f} {unit}  B/A {mb / ma:5.2f}  "
                     f"IQR/median A {iqr_a:5.2f} B {iqr_b:5.2f}{flag}")  # fmt: skip
    missing = len(ra.keys() ^ rb.keys())
    if missing:
        lines.append(f"{missing} cells are in only one of the two files")
    return head + sorted(lines), worst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--tolerance", type=float, default=0.2, help="largest allowed relative difference")
    parser.add_argument("--stat", default="median_ms", choices=("median_ms", "min_ms"), help="what is compared")
    parser.add_argument("--normalise", action="store_true", help="divide each cell by its run's calibration")
    args = parser.parse_args(argv)
    lines, worst = compare(args.a, args.b, args.tolerance, args.stat, args.normalise)
    print("\n".join(lines))
    cells = [line for line in lines if " B/A " in line and not line.startswith("machine speed")]
    within = sum("over tolerance" not in line for line in cells)
    total = len(cells)
    print(f"{args.stat}: {within}/{total} cells within {args.tolerance:.0%}; largest difference {worst:.1%}")
    sys.exit(0 if within == total else 1)


if __name__ == "__main__":
    main()
