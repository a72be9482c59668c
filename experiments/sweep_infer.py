"""The experiment driver that sweeps anomaly-map settings for one trained checkpoint: choose on val, test report-only.

    python experiments/sweep_infer.py --method ddpm --out experiments/results/sweep_ddpm.json \
        --grid '{"t_start": [30, [30, 100]], "steps": [1], "guidance": [0],
                 "normalize": ["auto", "image", "texture2"]}'

Each setting overrides params.yaml's `infer` section and is run the way `infer` runs it:
calibration statistics from the val split's normal images (`normalize: auto` also chooses the
calibration on val, see src/anodiff/calibration_choice.py). The table is sorted by the val figures, which
are the only ones to choose by; the test columns are printed last, marked report-only, so that
nobody tunes on them. Written to help tune the defaults; the pipeline itself does not run it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "stages"))
sys.path.insert(0, str(ROOT / "src"))  # this checkout's anodiff, not whichever is installed

from anodiff import calibration_choice, data, io, metrics  # noqa: E402
from anodiff.config import load_params, parse_params, to_dict  # noqa: E402
from anodiff.detector import Detector  # noqa: E402


def run(det, images, rows, masks, seed):
    started = time.perf_counter()
    raw, _ = det.raw_maps(images, Detector.noise_rng(seed), progress=False)  # the noise infer draws
    seconds = time.perf_counter() - started
    labels = (rows["label"] == "anomalous").to_numpy().astype(int)
    kinds = calibration_choice.calibrate_on_val(det, raw, rows["split"].to_numpy(), labels == 1, masks)
    final, scores = det.finish(raw)
    final, scores = final[:, 0].numpy(), scores.numpy()
    out = {"map_calibration": kinds["map"], "score_calibration": kinds["score"],
           "seconds_per_image": seconds / len(rows)}
    for split in ("val", "test"):
        sel = (rows["split"] == split).to_numpy()
        m = None if masks is None else masks[sel]
        out[split] = {
            "pixel_auroc": metrics.pixel_auroc(final[sel], m) if m is not None else None,
            "aupro": metrics.aupro(final[sel], m) if m is not None else None,
            "image_auroc": metrics.image_auroc(scores[sel], labels[sel]),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="ddpm", choices=("ddpm", "rddpm", "gan"))
    parser.add_argument("--grid", default="{}", help="JSON dict: infer key -> list of values")
    parser.add_argument("--out", default=None)
    parser.add_argument("--checkpoint", default=None, help="DDPM checkpoint (default: the method's)")
    args = parser.parse_args()
    params = load_params(ROOT / "params.yaml")
    prepared = ROOT / "data/prepared"
    rows = data.load_rows(prepared)
    rows = rows[rows["split"].isin(["val", "test"]) & (rows["augmented"] == 0)].reset_index(drop=True)
    images = data.load_images(prepared, rows, params.data.channels)
    masks = data.load_masks(prepared, rows)
    grid = json.loads(args.grid)
    # the method's files are those dvc.yaml gave its infer stage, recorded beside its maps
    meta = io.read_json(ROOT / f"data/maps/{args.method}/meta.json")
    ddpm = args.checkpoint or ROOT / meta["model"]
    gen = ROOT / meta["generator"] if meta.get("generator") else None
    results, table = [], []
    for values in itertools.product(*grid.values()):
        change = dict(zip(grid.keys(), values))
        settings = parse_params({**to_dict(params), "infer": {**to_dict(params.infer), **change}}).infer
        det = Detector.load(ddpm, settings, noise_model_path=gen)
        res = {"settings": change,
               **run(det, images, rows, masks, params.seed)}
        results.append(res)
        row = {"setting": json.dumps(res["settings"]), "calibration": f"{res['map_calibration']}/{res['score_calibration']}"}
        row.update({f"val {k}": v for k, v in res["val"].items()})
        row.update({f"test {k} (report only)": v for k, v in res["test"].items()})
        table.append(row)
        print(json.dumps(res["settings"]), "val", {k: round(x, 4) for k, x in res["val"].items() if x is not None},
              flush=True)
    frame = pd.DataFrame(table)
    val_cols = [c for c in frame.columns if c.startswith("val ") and frame[c].notna().any()]
    frame = frame.sort_values(val_cols, ascending=False) if val_cols else frame
    print("\nsorted by val; choose on val, test is report-only:")
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.out:
        io.write_json(args.out, results)


if __name__ == "__main__":
    main()
