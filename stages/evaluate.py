"""evaluate@<method>: metrics/<method>.json, ROC/PR curves and overlay grids.

Thresholds are chosen on the validation split and applied to the test split; no metric is
computed on an image that any model was trained on.
"""

from __future__ import annotations

import argparse

import numpy as np

from _common import ROOT, run_stage
from anodiff import data, io, metrics, plots

PREPARED = ROOT / "data/prepared"


def main(params, method: str) -> None:
    maps_dir = ROOT / f"data/maps/{method}"
    arrays = io.load_npz(maps_dir / "maps.npz")
    table = io.read_csv(maps_dir / "scores.csv")
    maps = arrays["maps"]
    masks = data.load_masks(PREPARED, table)  # None when the source has no masks
    labels = (table["label"] == "anomalous").to_numpy().astype(np.int64)
    scores = table["score"].to_numpy()
    val = (table["split"] == "val").to_numpy()
    test = (table["split"] == "test").to_numpy()

    pixel_thr, image_thr = metrics.choose_thresholds(
        maps[val], None if masks is None else masks[val], scores[val], labels[val])
    result = metrics.evaluate(
        maps[test], None if masks is None else masks[test], scores[test], labels[test],
        table["defect"].to_numpy()[test], pixel_thr)
    result["thresholds"] = {"pixel": pixel_thr, "image": image_thr}

    test_masks = None if masks is None else masks[test]
    roc = metrics.roc_curve_table(maps[test], test_masks, scores[test], labels[test])
    pr = metrics.pr_curve_table(maps[test], test_masks, scores[test], labels[test])
    io.write_csv(ROOT / f"plots/{method}/roc.csv", roc)
    io.write_csv(ROOT / f"plots/{method}/pr.csv", pr)

    images = data.load_images(PREPARED, table[test], params.data.channels)
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
