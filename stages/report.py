"""report: one markdown table of every method side by side -> metrics/summary.md.

The quality figures come from metrics/<method>.json; seconds_per_image (inference time) from
metrics/timing/infer_<method>.json."""

from __future__ import annotations

import pandas as pd

from _common import ROOT, run_stage
from anodiff import io
from anodiff.errors import DataError

METHODS = ("ddpm", "rddpm", "gan")
KEYS = ("pixel_auroc", "pixel_ap", "aupro", "pixel_f1_max", "dice", "image_auroc", "image_ap",
        "n_test_images")
TIMING = ("seconds_per_image",)


def table(results: dict[str, dict], timing: dict[str, dict] | None = None) -> pd.DataFrame:
    """Rows = methods, columns = the metric keys, then the method's timing; per-defect rows
    follow as method/defect (with the method's timing)."""
    timing = timing or {}
    rows = []
    for method, res in results.items():
        rows.append({"method": method, **{k: res.get(k) for k in KEYS},
                     **{k: timing.get(method, {}).get(k) for k in TIMING}})
    for method, res in results.items():
        for defect, sub in sorted(res.get("per_defect", {}).items()):
            rows.append({"method": f"{method} / {defect}", **{k: sub.get(k) for k in KEYS},
                         **{k: timing.get(method, {}).get(k) for k in TIMING}})
    return pd.DataFrame(rows)


def main(params) -> None:
    results, timing = {}, {}
    for method in METHODS:
        path = ROOT / f"metrics/{method}.json"
        if not path.exists():
            raise DataError(f"{path}: missing; run `dvc repro evaluate@{method}` first")
        results[method] = io.read_json(path)
        path = ROOT / f"metrics/timing/infer_{method}.json"
        if not path.exists():
            raise DataError(f"{path}: missing; run `dvc repro infer@{method}` first")
        timing[method] = io.read_json(path)
    frame = table(results, timing)
    text = ("# anodiff: all methods on the test split\n\n"
            "Thresholds chosen on the validation split; `null` = undefined (no masks or one class).\n\n"
            + frame.to_markdown(index=False, floatfmt=".4f", missingval="null") + "\n")
    io.write_text(ROOT / "metrics/summary.md", text)
    print(text)


if __name__ == "__main__":
    run_stage(main)
