"""Compare a run's headline metrics with a baseline (the tiny params profile's figures, committed in
.ci/baseline/metrics/), print the comparison as Markdown, and fail on a regression.

    python .ci/check_regression.py [--baseline .ci/baseline/metrics] [--current metrics] [--tolerance 0.05]

Exit 0 when no headline figure of any method (pixel AUROC, AUPRO, pixel AP, image AUROC, image AP)
fell by more than the tolerance, 1 otherwise (each regression named on stderr), 2 when a file is
missing or unreadable. A figure the baseline has but the run lacks (null, or the method skipped) is
a regression too. The tolerance is in metric units: the tiny profile tests 10 images, so one image
changing sides moves image AUROC by about 0.04; 0.05 lets that through, a real regression not.

`dvc metrics diff` shows every figure against the baseline in the job summary (the baseline as a
git revision: .ci/baseline_rev.sh); this script is what fails the job.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METHODS = ("ddpm", "rddpm", "gan", "patchcore")
HEADLINE = ("pixel_auroc", "aupro", "pixel_ap", "image_auroc", "image_ap")
TOLERANCE = 0.05


def _read(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: {path}: cannot be read ({exc})") from None
    if not isinstance(value, dict):
        raise SystemExit(f"error: {path}: not a metrics JSON object")
    return value


def compare(baseline: Path, current: Path, tolerance: float = TOLERANCE) -> tuple[list[dict], list[str]]:
    """(rows of method, metric, baseline, current, change; the regressions as sentences)."""
    rows, regressions = [], []
    for method in METHODS:
        base_file = baseline / f"{method}.json"
        if not base_file.exists():
            continue
        base, cur = _read(base_file), _read(current / f"{method}.json") if (current / f"{method}.json").exists() else None
        if cur is None:
            regressions.append(f"{method}: {current / f'{method}.json'} is missing")
            continue
        for key in HEADLINE:
            b, c = base.get(key), cur.get(key)
            change = None if b is None or c is None else c - b
            rows.append({"method": method, "metric": key, "baseline": b, "current": c, "change": change})
            if b is not None and c is None:
                regressions.append(f"{method} {key}: {b:.4f} in the baseline, null now")
            elif change is not None and change < -tolerance:
                regressions.append(f"{method} {key}: {b:.4f} -> {c:.4f} ({change:+.4f}, tolerance {tolerance})")
    return rows, regressions


def markdown(rows: list[dict]) -> str:
    fmt = lambda v, sign="": "null" if v is None else f"{v:{sign}.4f}"  # noqa: E731
    lines = ["| method | metric | baseline | current | change |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['metric']} | {fmt(r['baseline'])} | {fmt(r['current'])} | {fmt(r['change'], '+')} |"
              for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, default=Path(".ci/baseline/metrics"), help="(default: %(default)s)")
    parser.add_argument("--current", type=Path, default=Path("metrics"), help="(default: %(default)s)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="(default: %(default)s)")
    args = parser.parse_args(argv)
    if not any((args.baseline / f"{m}.json").exists() for m in METHODS):
        print(f"error: {args.baseline}: no baseline metrics (<method>.json)", file=sys.stderr)
        return 2
    rows, regressions = compare(args.baseline, args.current, args.tolerance)
    print(markdown(rows))
    if regressions:
        print(f"\nregression against {args.baseline} (more than {args.tolerance} lower):", file=sys.stderr)
        for r in regressions:
            print(f"  {r}", file=sys.stderr)
        return 1
    print(f"\nno headline metric fell by more than {args.tolerance} against {args.baseline}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
