"""infer@<method>: anomaly maps for every val and test image.

For each image: noise it to t_start with the method's noise (the DDPM's training noise, or the
GAN generator's learned noise), denoise back in a few deterministic DDIM steps with the frozen
DDPM, and compare. Normal val images give the per-pixel statistics the maps are standardised
by. Writes data/maps/<method>/: maps.npz (maps, reconstructions, statistics), scores.csv,
meta.json (the settings, so `anodiff predict` reproduces these maps exactly, and the timing).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _common import ROOT, run_stage, torch_generator
from anodiff import data, io
from anodiff.detector import Detector, InferSettings
from anodiff.train import pick_device

PREPARED = ROOT / "data/prepared"


def main(params, method: str) -> None:
    device = pick_device()
    settings = InferSettings.from_config(params.infer)
    ddpm = ROOT / f"data/models/{'rddpm' if method == 'rddpm' else 'ddpm'}.pt"
    gen_path = ROOT / "data/models/gan_generator.pt" if method == "gan" else None
    det = Detector.load(ddpm, settings, generator_path=gen_path, device=device)

    rows = data.load_rows(PREPARED)
    rows = rows[rows["split"].isin(["val", "test"]) & (rows["augmented"] == 0)].reset_index(drop=True)
    images = data.load_images(PREPARED, rows, params.data.channels)

    started = time.perf_counter()
    raw, recon = det.raw_maps(images, torch_generator(params.seed, offset=101), desc=f"infer@{method}")
    seconds = time.perf_counter() - started
    val_normal = torch.from_numpy(((rows["split"] == "val") & (rows["label"] == "normal")).to_numpy())
    det.fit_stats(raw[val_normal])
    final, scores = det.finish(raw)

    table = rows[["path", "split", "label", "defect", "mask"]].copy()
    table["score"] = scores.numpy().astype(np.float64)
    meta = {"method": method, "settings": settings.as_dict(), "plan": det.plan(),
            "noise": "gan" if gen_path else det.noise_kind, "image_size": det.image_size,
            "channels": det.channels, "n_images": len(rows)}
    # timing lives beside the metrics, not in data/maps, so the maps are the same bytes every run
    timing = {"seconds": round(seconds, 3), "seconds_per_image": round(seconds / max(1, len(rows)), 5),
              "images_per_s": round(len(rows) / max(seconds, 1e-9), 3), "device": str(device)}
    with io.atomic_dir(ROOT / f"data/maps/{method}") as out:
        io.save_npz(out / "maps.npz", maps=final[:, 0].numpy().astype(np.float32),
                    recon=np.stack([io.tensor_to_uint8(r) for r in recon]), **det.stats_arrays())
        io.write_csv(out / "scores.csv", table)
        io.write_json(out / "meta.json", meta)
    io.write_json(ROOT / f"metrics/infer_{method}.json", timing)
    print(f"infer@{method}: {len(rows)} images, {timing['seconds_per_image']:.3f} s/image on {device}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", choices=("ddpm", "rddpm", "gan"), required=True)
    args = parser.parse_args()
    run_stage(lambda p: main(p, args.method))
