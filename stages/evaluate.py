"""evaluate@<method>: metrics/<method>.json, ROC/PR curves, image-level plots and overlay grids.

Thresholds are chosen on the validation split and applied to the test split; no metric is
computed on an image that any model was trained on. Where val has no anomalous image (normal-only
data) they are the `evaluate.normal_quantile` of the normal val images' scores and map maxima;
figures that need anomalies are null, and `not_computable` says why. A method infer skipped
(the GAN on normal-only data) gets every output all the same, saying so.

Plots per method (plots/<method>/): roc.csv and pr.csv (pixel-level where there are masks, else
image-level), image_roc.csv (image-level always), image_predictions.csv (actual against predicted
label at the val threshold: DVC's confusion template), scores.png (normal against anomalous test
scores, the threshold marked), overlays.png (true defect outlined, predicted region filled).
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from _common import ROOT, run_stage
from anodiff import data, io, metrics, plots

PREPARED = ROOT / "data/prepared"


def write_skipped(method: str, reason: str) -> None:
    """A method that did not run: null figures, empty curves, a figure saying why."""
    result = {k: None for k in metrics.METRIC_KEYS}
    result.update(n_test_images=0, per_defect={}, skipped=reason, thresholds={"pixel": None, "image": None})
    empty = metrics.roc_curve_table()
    for name, table in (("roc", empty), ("pr", metrics.pr_curve_table()), ("image_roc", empty),
                        ("image_predictions", pd.DataFrame(columns=["actual", "predicted"]))):
        io.write_csv(ROOT / f"plots/{method}/{name}.csv", table)
    for name in ("overlays", "scores"):
        plots.placeholder(ROOT / f"plots/{method}/{name}.png", f"{method}: skipped: {reason}")
    io.write_json(ROOT / f"metrics/{method}.json", result)
    print(f"evaluate@{method}: skipped: {reason}")


def main(params, method: str) -> None:
    maps_dir = ROOT / f"data/maps/{method}"
    meta = io.read_json(maps_dir / "meta.json")
    if meta.get("skipped"):
        return write_skipped(method, meta["skipped"])
    arrays = io.load_npz(maps_dir / "maps.npz")
    table = io.read_csv(maps_dir / "scores.csv")
    maps = arrays["maps"]
    masks = data.load_masks(PREPARED, table)  # None when the source has no masks
    labels = (table["label"] == "anomalous").to_numpy().astype(np.int64)
    scores = table["score"].to_numpy()
    val = (table["split"] == "val").to_numpy()
    test = (table["split"] == "test").to_numpy()

    if labels[val].any():
        pixel_thr, image_thr = metrics.choose_thresholds(
            maps[val], None if masks is None else masks[val], scores[val], labels[val])
        rule = "F1 on val"
    else:  # normal-only: how high normal val images go is all there is to go by
        q = params.evaluate.normal_quantile
        pixel_thr, image_thr = metrics.normal_quantile_thresholds(maps[val], scores[val], q)
        rule = f"quantile {q} of the normal val images (evaluate.normal_quantile)"
    result = metrics.evaluate(
        maps[test], None if masks is None else masks[test], scores[test], labels[test],
        table["defect"].to_numpy()[test], pixel_thr)
    result["thresholds"] = {"pixel": pixel_thr, "image": image_thr, "rule": rule}
    reasons = metrics.null_reasons(result, has_masks=masks is not None, labels=labels[test])
    if reasons:
        result["not_computable"] = reasons

    test_masks = None if masks is None else masks[test]
    roc = metrics.roc_curve_table(maps[test], test_masks, scores[test], labels[test])
    pr = metrics.pr_curve_table(maps[test], test_masks, scores[test], labels[test])
    io.write_csv(ROOT / f"plots/{method}/roc.csv", roc)
    io.write_csv(ROOT / f"plots/{method}/pr.csv", pr)
    io.write_csv(ROOT / f"plots/{method}/image_roc.csv", metrics.image_roc_table(scores[test], labels[test]))
    actual = np.where(labels[test] == 1, "anomalous", "normal")
    predicted = (np.full(actual.shape, "unknown (no threshold)", dtype=object) if image_thr is None
                 else np.where(scores[test] >= image_thr, "anomalous", "normal"))
    io.write_csv(ROOT / f"plots/{method}/image_predictions.csv",
                 pd.DataFrame({"path": table["path"][test].to_numpy(), "actual": actual, "predicted": predicted}))
    plots.score_histogram(scores[test], labels[test], image_thr, ROOT / f"plots/{method}/scores.png", title=method)

    # uint8 arrays, not tensors: this stage needs no torch (2.5 s to import)
    images = [io.load_image_uint8(PREPARED / f, maps.shape[-1], params.data.channels) for f in table["path"][test]]
    plots.overlay_grid(
        images=images, recon=arrays["recon"][test], maps=maps[test],
        masks=test_masks, scores=scores[test], labels=labels[test],
        threshold=pixel_thr, path=ROOT / f"plots/{method}/overlays.png", title=method)
    io.write_json(ROOT / f"metrics/{method}.json", result)
    shown = {k: result[k] for k in ("pixel_auroc", "aupro", "image_auroc", "dice")}
    print(f"evaluate@{method}: {shown}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", choices=("ddpm", "rddpm", "gan", "patchcore"), required=True)
    args = parser.parse_args()
    run_stage(lambda p: main(p, args.method))
