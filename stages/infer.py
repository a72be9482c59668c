"""infer@<method>: anomaly maps for every val and test image.

For each image: noise it to t_start with the method's noise (the DDPM's training noise, or the
GAN generator's learned noise), denoise back in a few deterministic DDIM steps with the frozen
DDPM, and compare, at each noise level of `infer.t_starts`. Normal val images calibrate the maps
and image scores (`infer.normalize`; `auto` chooses the calibration on val, see select.py).
Writes data/maps/<method>/: maps.npz (maps, reconstructions, statistics), scores.csv,
meta.json (the settings, so `anodiff predict` reproduces these maps exactly); the calibration
chosen goes to metrics/infer_<method>.json, the timing to metrics/timing/infer_<method>.json.

With `--memory` (infer@patchcore's maps) the memory distance is one more map beside the noise
levels, and the choice on val may fuse it in ("<calibration>+memory"; `map_sources` in the
metrics says which). `--method patchcore` is the PatchCore reference itself: nearest-neighbour
maps from the memory bank (`--model`), the image score their maximum; no diffusion.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _common import ROOT, run_stage, write_timing
from anodiff import anomaly, data, features, io, patchcore, select
from anodiff.config import to_dict
from anodiff.detector import Detector
from anodiff.errors import CheckpointError
from anodiff.features import FeatureExtractor
from anodiff.train import pick_device

PREPARED = ROOT / "data/prepared"
ADAPTED = "extractor.pt"  # in data/maps/<method>/: the adapted extractor's trunk (infer.adapt_steps)


def _rows():
    rows = data.load_rows(PREPARED)
    return rows[rows["split"].isin(["val", "test"]) & (rows["augmented"] == 0)].reset_index(drop=True)


def memory_maps(maps_dir, rows) -> torch.Tensor:
    """infer@patchcore's maps of the same val and test images, in `rows`' order: (N, 1, H, W)."""
    table = io.read_artefact(maps_dir / "scores.csv", io.read_csv)
    if list(table["path"]) != list(rows["path"]):
        raise CheckpointError(f"{maps_dir}: maps of other images than data/prepared's val and test; "
                              f"rerun `dvc repro infer@patchcore`")
    return torch.from_numpy(io.read_artefact(maps_dir / "maps.npz", io.load_npz)["maps"]).unsqueeze(1)


def adapted_extractor(det: Detector, params) -> FeatureExtractor:
    """DDAD's domain adaptation (`infer.adapt_steps` > 0): the extractor fine-tuned on the train-normal
    images against their reconstructions, one per noise level (train data only: val still judges)."""
    rows = data.load_rows(PREPARED)
    rows = rows[(rows["split"] == "train") & (rows["label"] == "normal") & (rows["augmented"] == 0)]
    images = data.load_images(PREPARED, rows.reset_index(drop=True), params.data.channels)
    recons = [det.raw_maps(images, Detector.noise_generator(params.seed + 1), desc=f"adapt t={t}", only=[t])[1]
              for t in det.levels()]
    pairs_x = torch.cat([images] * len(recons))
    started = time.perf_counter()
    tuned = features.adapt(det.extractor, pairs_x, torch.cat(recons), params.infer.adapt_steps,
                           params.infer.adapt_distill, torch.Generator().manual_seed(params.seed + ADAPT_OFFSET))
    print(f"infer: extractor adapted on {len(pairs_x)} train-normal pairs, {params.infer.adapt_steps} steps, "
          f"{time.perf_counter() - started:.0f} s")
    return tuned


ADAPT_OFFSET = 211  # the adaptation's batches: a stream of their own


def sources(kind: str) -> str:
    """What a calibration's map is made of, for metrics/infer_<method>.json."""
    if kind == "memory":
        return "memory"
    return "reconstruction+memory" if anomaly.split_kind(kind)[1] else "reconstruction"


def main_patchcore(params, bank_path: str) -> None:
    """infer@patchcore: the memory bank's nearest-neighbour maps; image score = the map's maximum."""
    scorer = patchcore.Scorer.load(ROOT / bank_path, params.data.channels, to_dict(params.patchcore))
    rows = _rows()
    images = data.load_images(PREPARED, rows, params.data.channels)  # the maps are at their size
    inputs, column = data.load_feature_images(PREPARED, rows, params.data.channels)
    started = time.perf_counter()
    with torch.no_grad():
        maps = scorer.maps(inputs, out_size=images.shape[-1])
    seconds = time.perf_counter() - started
    scores = maps.flatten(1).max(dim=1).values
    table = rows[["path", "split", "label", "defect", "mask"]].copy()
    table["score"] = scores.numpy().astype(np.float64)
    meta = {"method": "patchcore", "model": bank_path, "generator": None, "settings": scorer.settings,
            "calibration": {"map": "memory", "score": "memory"}, "image_size": int(images.shape[-1]),
            # predict reads new images as these were read: at the extractor's size, or at image_size
            "input_size": int(inputs.shape[-1]), "channels": params.data.channels, "n_images": len(rows)}
    _write("patchcore", maps, images, table, meta, {}, seconds, "cpu",
           {"map_sources": "memory", "score_sources": "memory"})


def _write(method, final, recon, table, meta, stats, seconds, device, chosen, extractor=None) -> None:
    # timing lives in metrics/timing/, not in data/maps (the maps are the same bytes every run) nor
    # in the metrics file (`dvc metrics diff` of the same params shows nothing)
    n = len(table)
    timing = {"seconds": round(seconds, 3), "seconds_per_image": round(seconds / max(1, n), 5),
              "images_per_s": round(n / max(seconds, 1e-9), 3), "device": str(device)}
    with io.atomic_dir(ROOT / f"data/maps/{method}") as out:
        io.save_npz(out / "maps.npz", maps=final[:, 0].numpy().astype(np.float32),
                    recon=np.stack([io.tensor_to_uint8(r) for r in recon]), **stats)
        io.write_csv(out / "scores.csv", table)
        io.write_json(out / "meta.json", meta)
        if extractor is not None:  # the adapted extractor: predict must see what infer saw
            features.save_adapted(extractor, out / ADAPTED)
    io.write_json(ROOT / f"metrics/infer_{method}.json", chosen)
    write_timing(f"infer_{method}", timing)
    print(f"infer@{method}: {n} images, {timing['seconds_per_image']:.3f} s/image on {device}; "
          f"map {chosen.get('map_calibration', 'memory')} ({chosen['map_sources']}), "
          f"score {chosen.get('score_calibration', 'memory')} ({chosen['score_sources']})")


def main(params, method: str, model: str, noise_from: str, memory: str | None = None) -> None:
    """`model` is the DDPM checkpoint; `noise_from` is where the noise comes from: the same file
    (the DDPM's own training noise) or a GAN generator. dvc.yaml passes both, per method.
    `memory`: infer@patchcore's maps folder; val may then fuse the memory distance into the map."""
    device = pick_device()
    settings = params.infer
    gen_path = noise_from if noise_from != model else None
    # the images are read with data.channels: a DDPM trained on the other count is refused here, by name
    det = Detector.load(ROOT / model, settings, generator_path=gen_path and ROOT / gen_path, device=device,
                        expect_arch={"in_channels": params.data.channels})
    if settings.error == "feature":  # DDAD's distance of input and reconstruction in feature space
        det.extractor = FeatureExtractor(params.patchcore.image_size).to(device)
        if settings.adapt_steps:
            det.extractor = adapted_extractor(det, params)

    adapted = settings.error == "feature" and settings.adapt_steps > 0
    rows = _rows()
    images = data.load_images(PREPARED, rows, params.data.channels)

    started = time.perf_counter()
    raw, recon = det.raw_maps(images, Detector.noise_generator(params.seed), desc=f"infer@{method}")
    seconds = time.perf_counter() - started
    memory_meta = None
    if memory is not None and settings.memory:  # the memory distance as one more level; val decides
        raw = torch.cat([raw, memory_maps(ROOT / memory, rows)], dim=1)
        memory_meta = io.read_artefact(ROOT / memory / "meta.json", io.read_json)
    choice = select.calibrate_on_val(det, raw, rows["split"].to_numpy(),
                                     (rows["label"] == "anomalous").to_numpy(), data.load_masks(PREPARED, rows),
                                     levels=len(det.levels()))
    final, scores = det.finish(raw)

    table = rows[["path", "split", "label", "defect", "mask"]].copy()
    table["score"] = scores.numpy().astype(np.float64)
    meta = {"method": method, "model": model, "generator": gen_path, "seed": params.seed,
            "settings": to_dict(settings), "calibration": det.calibration_kinds(),
            "levels": det.levels(), "plan": det.plan(),
            "noise": "gan" if gen_path else det.noise_kind, "image_size": det.image_size,
            "channels": det.channels, "n_images": len(rows),
            "feature_size": params.patchcore.image_size if settings.error == "feature" else None,
            "adapted_extractor": ADAPTED if adapted else None,
            # what predict needs to fuse the memory distance as infer did
            "memory": ({k: memory_meta[k] for k in ("model", "settings", "input_size")}
                       if det.uses_memory() else None)}
    # the choice is a metric (`dvc exp show` has a column for it); every candidate's val figures
    # (fitted on half the normal val images, judged on the rest) go beside the maps
    chosen = {"map_calibration": choice["map"], "score_calibration": choice["score"],
              "map_sources": sources(choice["map"]), "score_sources": sources(choice["score"])}
    if "table" in choice:
        chosen["val_map_criterion"] = round(choice["table"][choice["map"]]["map_criterion"], 6)
        chosen["val_score_image_auroc"] = choice["table"][choice["score"]]["image_auroc"]
        meta["selection"] = choice["table"]
    _write(method, final, recon, table, meta, det.stats_arrays(), seconds, device, chosen,
           det.extractor if adapted else None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", required=True, help="the variant's name (dvc.yaml's foreach key)")
    parser.add_argument("--model", required=True, help="DDPM checkpoint")
    parser.add_argument("--noise-from", required=True, help="the DDPM checkpoint again, or a GAN generator")
    parser.add_argument("--memory", help="infer@patchcore's maps folder, to fuse (for patchcore: its memory bank)")
    args = parser.parse_args()
    if args.method == "patchcore":
        run_stage(lambda p: main_patchcore(p, args.model))
    else:
        run_stage(lambda p: main(p, args.method, args.model, args.noise_from, args.memory))
