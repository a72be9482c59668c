"""Sweep anomaly-map settings for one trained checkpoint; choose on val, report test.

    python bench/sweep_infer.py --method ddpm --out bench/sweep_ddpm.json \
        --grid '{"t_start": [30, 60, 90], "error": ["abs", "feature"]}'

Each setting overrides params.yaml's `infer` section. Statistics (normal-image mean/std)
come from the val split's normal images, thresholds from val; the figures that matter are the
test ones. Written to help tune the defaults; the pipeline itself does not run it.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "stages"))

from anodiff import data, metrics  # noqa: E402
from anodiff.config import load_params  # noqa: E402
from anodiff.detector import Detector, InferSettings  # noqa: E402


def run(det, images, rows, masks, seed):
    started = time.perf_counter()
    raw, _ = det.raw_maps(images, torch.Generator().manual_seed(seed), progress=False)
    seconds = time.perf_counter() - started
    val_normal = torch.from_numpy(((rows["split"] == "val") & (rows["label"] == "normal")).to_numpy())
    det.stats = None
    det.fit_stats(raw[val_normal])
    final, scores = det.finish(raw)
    final, scores = final[:, 0].numpy(), scores.numpy()
    labels = (rows["label"] == "anomalous").to_numpy().astype(int)
    out = {"seconds_per_image": seconds / len(rows)}
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
    parser = argparse.ArgumentParser(description=__doc__)
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
    base = InferSettings.from_config(params.infer)
    grid = json.loads(args.grid)
    ddpm = args.checkpoint or ROOT / f"data/models/{'rddpm' if args.method == 'rddpm' else 'ddpm'}.pt"
    gen = ROOT / "data/models/gan_generator.pt" if args.method == "gan" else None
    results = []
    for values in itertools.product(*grid.values()):
        change = dict(zip(grid.keys(), values))
        change = {k: tuple(v) if isinstance(v, list) else v for k, v in change.items()}
        settings = dataclasses.replace(base, **change)
        det = Detector.load(ddpm, settings, generator_path=gen)
        res = {"settings": change, **run(det, images, rows, masks, params.seed)}
        results.append(res)
        v, t = res["val"], res["test"]
        print(json.dumps(change), "val", {k: round(x, 4) for k, x in v.items() if x is not None},
              "test", {k: round(x, 4) for k, x in t.items() if x is not None},
              f"{res['seconds_per_image']:.3f}s/img", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
