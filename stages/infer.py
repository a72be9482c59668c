"""infer@<method>: calibrated anomaly maps and image scores for every val and test image.

For each image: noise it to t_start with the method's noise (the DDPM's training noise, or the
GAN generator's learned noise), denoise back in a few deterministic DDIM steps with the frozen
DDPM, and compare, at each noise level of `infer.t_start`. Normal val images calibrate the maps
and image scores (`infer.normalize`; `auto` chooses the calibration on val, see calibration_choice.py).
Writes data/maps/<method>/: maps.npz (maps, reconstructions, statistics), scores.csv,
meta.json (the settings, so `anodiff predict` reproduces these maps exactly); the calibration
chosen goes to metrics/infer_<method>.json, the timing to metrics/timing/infer_<method>.json.

infer@gan draws only the level its generator's noise is added at: the other levels are infer@ddpm's
very maps (`--share data/maps/ddpm`, a declared dependency; same DDPM, seed, settings, images and
noise streams, so the same bytes), read from its maps.npz ("levels_raw"). The timing file says
which levels were shared and what they cost infer@ddpm. Any mismatch: every level is recomputed.

With `--memory` (infer@patchcore's maps) the memory distance is one more map beside the noise
levels, and the choice on val may fuse it in ("<calibration>+memory"; `map_sources` in the
metrics says which). `--method patchcore` is the PatchCore reference itself: nearest-neighbour
maps from the memory bank (`--model`), the image score their maximum; no diffusion.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from _common import ROOT, run_stage, write_timing
from anodiff import anomaly, calibration_choice, checkpoint, data, features, io, patchcore
from anodiff.config import accelerated, to_dict
from anodiff.detector import Detector
from anodiff.errors import CheckpointError
from anodiff.features import FeatureExtractor
from anodiff.runtime import pick_device

PREPARED = ROOT / "data/prepared"
SHARE_SOURCE = "ddpm"  # the method whose raw maps per level are kept for infer@gan (maps.npz "levels_raw")
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
    recons = [det.raw_maps(images, Detector.noise_rng(params.seed + 1), desc=f"adapt t={t}", only=[t])[1]
              for t in det.levels()]
    pairs_x = torch.cat([images] * len(recons))
    started = time.perf_counter()
    tuned = features.adapt(det.extractor, pairs_x, torch.cat(recons), params.infer.adapt_steps,
                           params.infer.adapt_distill, torch.Generator().manual_seed(params.seed + ADAPT_OFFSET))
    print(f"infer: extractor adapted on {len(pairs_x)} train-normal pairs, {params.infer.adapt_steps} steps, "
          f"{time.perf_counter() - started:.0f} s")
    return tuned


ADAPT_OFFSET = 211  # the adaptation's batches: a stream of their own


def shared_levels(det: Detector, params, model: str, share_dir, rows) -> tuple[torch.Tensor, list[int], dict] | None:
    """infer@ddpm's raw maps of the levels a GAN's noise model leaves alone, when they are the very
    maps this run would draw: (maps (N, k, H, W) of those levels, the levels, infer@ddpm's timing), or
    None with a line saying why not. The noise model's level must be the plan's first (the noise
    streams are drawn in plan order, and only that level is then drawn here), its noise residual on
    Gaussian draws (as many draws from each image's stream as infer@ddpm's Gaussian noise takes)."""
    def no(why):
        print(f"infer: every level recomputed ({why})")
        return None

    meta_path = ROOT / share_dir / "meta.json"
    if not meta_path.is_file():
        return no(f"no {share_dir}/meta.json")
    meta = io.read_json(meta_path)
    own = det.noise_model.t
    levels = det.levels()
    if not det.noise_model.net.residual or det.noise_kind != "gaussian":
        return no("the generator's noise is not residual on Gaussian draws")
    if levels[0] != own or len(levels) < 2 or meta.get("levels") != levels:
        return no(f"levels {levels} (generator at t={own}) against {meta.get('levels')}")
    settings = json.loads(json.dumps(to_dict(det.settings)))  # as meta.json holds them (lists, not tuples)
    if (meta.get("model"), meta.get("seed"), meta.get("settings")) != (model, params.seed, settings):
        return no(f"{share_dir} was made with another model, seed or infer settings")
    table = io.read_artefact(ROOT / share_dir / "scores.csv", io.read_csv)
    if list(table["path"]) != list(rows["path"]):
        return no(f"{share_dir} holds maps of other images")
    arrays = io.read_artefact(ROOT / share_dir / "maps.npz", io.load_npz)
    if "levels_raw" not in arrays:
        return no(f"{share_dir}/maps.npz keeps no raw maps per level")
    timing_path = ROOT / f"metrics/timing/infer_{SHARE_SOURCE}.json"
    timing = io.read_json(timing_path) if timing_path.is_file() else {}
    return torch.from_numpy(arrays["levels_raw"][:, 1:].copy()), levels[1:], {**timing, "plan": meta.get("plan")}


def _shared_cost(source_timing: dict, shared: list[int]) -> float | None:
    """What the shared levels cost infer@ddpm: its seconds times their share of its model calls
    (DDIM steps times draws, per level of its plan). An estimate; said so in the timing file."""
    plan, seconds = source_timing.get("plan"), source_timing.get("seconds")
    if not plan or seconds is None:
        return None
    calls = [steps for _, steps, _ in plan]
    mine = [steps for t, steps, _ in plan if t in shared]
    return round(seconds * sum(mine) / sum(calls), 3)


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


def write_skipped(method: str, reason: str) -> None:
    """Every declared output, saying the method was skipped and why (evaluate and report read it)."""
    with io.atomic_dir(ROOT / f"data/maps/{method}") as out:
        io.write_json(out / "meta.json", {"method": method, "skipped": reason})
    io.write_json(ROOT / f"metrics/infer_{method}.json", {"skipped": reason})
    write_timing(f"infer_{method}", {"seconds": 0.0, "skipped": reason})
    print(f"infer@{method}: skipped: {reason}")


def _write(method, final, recon, table, meta, stats, seconds, device, chosen, extractor=None, shared=None) -> None:
    # timing lives in metrics/timing/, not in data/maps (the maps are the same bytes every run) nor
    # in the metrics file (`dvc metrics diff` of the same params shows nothing)
    n = len(table)
    timing = {"seconds": round(seconds, 3), "seconds_per_image": round(seconds / max(1, n), 5),
              "images_per_s": round(n / max(seconds, 1e-9), 3), "device": str(device), **(shared or {})}
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


def main(params, method: str, model: str, noise_from: str, memory: str | None = None,
         share: str | None = None) -> None:
    """`model` is the DDPM checkpoint; `noise_from` is where the noise comes from: the same file
    (the DDPM's own training noise) or a GAN generator. dvc.yaml passes both, per method.
    `memory`: infer@patchcore's maps folder; val may then fuse the memory distance into the map."""
    device = pick_device()
    # `auto` precision resolved here, and recorded so in meta.json: `anodiff predict` then draws these
    # very maps (in bfloat16 or not) on any machine, whatever that machine's own `auto` would pick
    settings = params.infer.model_copy(update={"amp": accelerated(params.infer.amp, device, precision=True)})
    noise_model_path = noise_from if noise_from != model else None
    reason = checkpoint.skipped_reason(ROOT / noise_model_path) if noise_model_path else None
    if reason is not None:  # normal-only data: train_gan_noise left a record instead of a generator
        return write_skipped(method, reason)
    # the images are read with data.channels: a DDPM trained on the other count is refused here, by name
    det = Detector.load(ROOT / model, settings, noise_model_path=noise_model_path and ROOT / noise_model_path,
                        device=device, expect_arch={"in_channels": params.data.channels})
    if settings.error == "feature":  # DDAD's distance of input and reconstruction in feature space
        det.extractor = FeatureExtractor(params.patchcore.image_size).to(device)
        if settings.adapt_steps:
            det.extractor = adapted_extractor(det, params)

    adapted = settings.error == "feature" and settings.adapt_steps > 0
    rows = _rows()
    images = data.load_images(PREPARED, rows, params.data.channels)

    reuse = None
    if noise_model_path and share and (ROOT / share).is_dir():  # gan: infer@ddpm's maps of the levels G leaves alone
        reuse = shared_levels(det, params, model, share, rows)
    started = time.perf_counter()
    if reuse is None:
        raw, recon = det.raw_maps(images, Detector.noise_rng(params.seed), desc=f"infer@{method}")
    else:
        own, recon = det.raw_maps(images, Detector.noise_rng(params.seed), desc=f"infer@{method}",
                                  only=[det.noise_model.t])
        raw = torch.cat([own, reuse[0]], dim=1)
    seconds = time.perf_counter() - started
    levels_raw = raw.numpy().astype(np.float32) if method == SHARE_SOURCE else None
    shared = None if reuse is None else {"shared_levels": reuse[1], "shared_from": f"infer@{SHARE_SOURCE}",
                                         "shared_seconds_estimate": _shared_cost(reuse[2], reuse[1])}
    memory_meta = None
    if memory is not None and settings.memory:  # the memory distance as one more level; val decides
        raw = torch.cat([raw, memory_maps(ROOT / memory, rows)], dim=1)
        memory_meta = io.read_artefact(ROOT / memory / "meta.json", io.read_json)
    choice = calibration_choice.calibrate_on_val(det, raw, rows["split"].to_numpy(),
                                     (rows["label"] == "anomalous").to_numpy(), data.load_masks(PREPARED, rows),
                                     levels=len(det.levels()))
    final, scores = det.finish(raw)

    table = rows[["path", "split", "label", "defect", "mask"]].copy()
    table["score"] = scores.numpy().astype(np.float64)
    meta = {"method": method, "model": model, "generator": noise_model_path, "seed": params.seed,
            "settings": to_dict(settings), "calibration": det.calibration_kinds(),
            "levels": det.levels(), "plan": det.plan(),
            "noise": "gan" if noise_model_path else det.noise_kind, "image_size": det.image_size,
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
    if "chosen_by" in choice:  # normal-only val: a default, not a choice
        chosen["chosen_by"] = meta["chosen_by"] = choice["chosen_by"]
    if "table" in choice:
        chosen["val_map_criterion"] = round(choice["table"][choice["map"]]["map_criterion"], 6)
        chosen["val_score_image_auroc"] = choice["table"][choice["score"]]["image_auroc"]
        meta["selection"] = choice["table"]
    if shared:  # which levels came from where; their seconds go to the timing file only (meta is byte-stable)
        meta["shared"] = {k: v for k, v in shared.items() if k != "shared_seconds_estimate"}
    stats = det.stats_arrays() | ({} if levels_raw is None else {"levels_raw": levels_raw})
    _write(method, final, recon, table, meta, stats, seconds, device, chosen,
           det.extractor if adapted else None, shared)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", required=True, help="the variant's name (dvc.yaml's foreach key)")
    parser.add_argument("--model", required=True, help="DDPM checkpoint")
    parser.add_argument("--noise-from", required=True, help="the DDPM checkpoint again, or a GAN generator")
    parser.add_argument("--memory", help="infer@patchcore's maps folder, to fuse (for patchcore: its memory bank)")
    parser.add_argument("--share", help="gan: infer@ddpm's maps folder, whose levels G leaves alone are reused "
                                        "(for the other methods dvc.yaml passes a file, and it is ignored)")
    args = parser.parse_args()
    if args.method == "patchcore":
        run_stage(lambda p: main_patchcore(p, args.model))
    else:
        run_stage(lambda p: main(p, args.method, args.model, args.noise_from, args.memory, args.share))
