"""infer@<method>: anomaly maps for every val and test image.

For each image: noise it to t_start with the method's noise (the DDPM's training noise, or the
GAN generator's learned noise), denoise back in a few deterministic DDIM steps with the frozen
DDPM, and compare, at each noise level of `infer.t_starts`. Normal val images calibrate the maps
and image scores (`infer.normalize`; `auto` chooses the calibration on val, see select.py).
Writes data/maps/<method>/: maps.npz (maps, reconstructions, statistics), scores.csv,
meta.json (the settings, so `anodiff predict` reproduces these maps exactly); the calibration
chosen goes to metrics/infer_<method>.json, the timing to metrics/timing/infer_<method>.json.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _common import ROOT, run_stage, torch_generator, write_timing
from anodiff import data, io, select
from anodiff.config import to_dict
from anodiff.detector import Detector
from anodiff.train import pick_device

PREPARED = ROOT / "data/prepared"


def main(params, method: str, model: str, noise_from: str) -> None:
    """`model` is the DDPM checkpoint; `noise_from` is where the noise comes from: the same file
    (the DDPM's own training noise) or a GAN generator. dvc.yaml passes both, per method."""
    device = pick_device()
    settings = params.infer
    gen_path = noise_from if noise_from != model else None
    # the images are read with data.channels: a DDPM trained on the other count is refused here, by name
    det = Detector.load(ROOT / model, settings, generator_path=gen_path and ROOT / gen_path, device=device,
                        expect_arch={"in_channels": params.data.channels})

    rows = data.load_rows(PREPARED)
    rows = rows[rows["split"].isin(["val", "test"]) & (rows["augmented"] == 0)].reset_index(drop=True)
    images = data.load_images(PREPARED, rows, params.data.channels)

    started = time.perf_counter()
    raw, recon = det.raw_maps(images, torch_generator(params.seed, offset=101), desc=f"infer@{method}")
    seconds = time.perf_counter() - started
    choice = select.calibrate_on_val(det, raw, rows["split"].to_numpy(),
                                     (rows["label"] == "anomalous").to_numpy(), data.load_masks(PREPARED, rows))
    final, scores = det.finish(raw)

    table = rows[["path", "split", "label", "defect", "mask"]].copy()
    table["score"] = scores.numpy().astype(np.float64)
    meta = {"method": method, "model": model, "generator": gen_path,
            "settings": to_dict(settings), "calibration": det.calibration_kinds(),
            "levels": det.levels(), "plan": det.plan(),
            "noise": "gan" if gen_path else det.noise_kind, "image_size": det.image_size,
            "channels": det.channels, "n_images": len(rows)}
    # timing lives in metrics/timing/, not in data/maps (the maps are the same bytes every run) nor
    # in the metrics file (`dvc metrics diff` of the same params shows nothing)
    timing = {"seconds": round(seconds, 3), "seconds_per_image": round(seconds / max(1, len(rows)), 5),
              "images_per_s": round(len(rows) / max(seconds, 1e-9), 3), "device": str(device)}
    # the choice is a metric (`dvc exp show` has a column for it); every candidate's val figures
    # (fitted on half the normal val images, judged on the rest) go beside the maps
    chosen = {"map_calibration": choice["map"], "score_calibration": choice["score"]}
    if "table" in choice:
        chosen["val_map_criterion"] = round(choice["table"][choice["map"]]["map_criterion"], 6)
        chosen["val_score_image_auroc"] = choice["table"][choice["score"]]["image_auroc"]
        meta["selection"] = choice["table"]
    with io.atomic_dir(ROOT / f"data/maps/{method}") as out:
        io.save_npz(out / "maps.npz", maps=final[:, 0].numpy().astype(np.float32),
                    recon=np.stack([io.tensor_to_uint8(r) for r in recon]), **det.stats_arrays())
        io.write_csv(out / "scores.csv", table)
        io.write_json(out / "meta.json", meta)
    io.write_json(ROOT / f"metrics/infer_{method}.json", chosen)
    write_timing(f"infer_{method}", timing)
    print(f"infer@{method}: {len(rows)} images, {timing['seconds_per_image']:.3f} s/image on {device}; "
          f"map calibration {choice['map']}, score calibration {choice['score']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", required=True, help="the variant's name (dvc.yaml's foreach key)")
    parser.add_argument("--model", required=True, help="DDPM checkpoint")
    parser.add_argument("--noise-from", required=True, help="the DDPM checkpoint again, or a GAN generator")
    args = parser.parse_args()
    run_stage(lambda p: main(p, args.method, args.model, args.noise_from))
