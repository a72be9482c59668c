"""`anodiff predict`: apply a trained method to new images.

    anodiff predict --method ddpm slab1.png slab2.png folder/ --out predictions/

Uses the pipeline's outputs: the DDPM checkpoint (and the GAN generator for `gan`; the memory
bank for `patchcore`, and for a diffusion method whose map fuses the memory distance), the
normal-image statistics, settings and seed stored by `infer` in data/maps/<method>/, and the
thresholds chosen on the validation split in metrics/<method>.json. An image's noise is drawn
from its own stream, seeded by infer's seed and its pixels, so it gets the score infer gave it. Writes one heat-map
overlay PNG per image and predictions.csv (path, score, anomalous at the chosen threshold).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd
import torch

from anodiff import features, io, patchcore, plots
from anodiff.config import Infer
from anodiff.detector import Detector
from anodiff.features import FeatureExtractor
from anodiff.errors import AnodiffError, BadImageError, CheckpointError, DataError


def collect_inputs(inputs: list[str]) -> list[Path]:
    files = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = io.list_images(p)
            if not found:
                raise DataError(f"{p}: folder holds no images ({', '.join(io.IMAGE_EXTENSIONS)})")
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return files


def check_out(out: Path, reads: list[Path]) -> None:
    """--out is replaced whole: refuse a file, or a folder that is or holds something predict reads."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: is a file; predict writes a folder there (replaced whole)")
    target = out.resolve()
    for p in reads:
        r = p.resolve()
        if r == target or target in r.parents:
            raise DataError(f"--out {out}: would replace {p}, which predict reads; choose another folder")


def _thresholds(args) -> dict:
    metrics_path = Path(args.metrics or f"metrics/{args.method}.json")
    thresholds = {"pixel": None, "image": None}
    if metrics_path.exists():
        stored_thr = io.read_artefact(metrics_path, io.read_json)
        stored_thr = stored_thr.get("thresholds") if isinstance(stored_thr, dict) else None
        thresholds.update({k: v for k, v in (stored_thr or {}).items() if k in thresholds})
    if args.threshold is not None:
        thresholds["image"] = args.threshold
    return thresholds


def _read_meta(args) -> tuple[dict, Path, Path]:
    maps_dir = Path(args.maps or f"data/maps/{args.method}")
    meta_path, npz_path = maps_dir / "meta.json", maps_dir / "maps.npz"
    for p in (meta_path, npz_path):
        if not p.exists():
            raise CheckpointError(f"{p}: missing; run `dvc repro infer@{args.method}` first (or pass --maps)")
    meta = io.read_artefact(meta_path, io.read_json)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: not infer's meta.json; rerun `dvc repro infer@{args.method}`")
    return meta, meta_path, npz_path


def _memory_scorer(spec, meta_path: Path, method: str, channels: int):
    """(the PatchCore scorer whose maps infer fused in, or scored with for patchcore, and the size
    its input images are read at: the extractor's where prepare kept copies of that size)."""
    if not isinstance(spec, dict) or not spec.get("model") or not isinstance(spec.get("settings"), dict) \
            or type(spec.get("input_size")) is not int:
        raise CheckpointError(f"{meta_path}: no valid 'memory' recorded; rerun `dvc repro infer@{method}`")
    return patchcore.Scorer.load(Path(spec["model"]), channels, spec["settings"]), spec["input_size"]


def load_patchcore(args):
    """(scorer, its input size, image size, channels, thresholds) of the patchcore method."""
    meta, meta_path, _ = _read_meta(args)
    spec = {"model": args.checkpoint or meta.get("model"), "settings": meta.get("settings"),
            "input_size": meta.get("input_size")}
    try:
        size, channels = int(meta["image_size"]), int(meta["channels"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{meta_path}: no valid 'image_size' and 'channels'; "
                              f"rerun `dvc repro infer@patchcore`") from None
    scorer, input_size = _memory_scorer(spec, meta_path, "patchcore", channels)
    return scorer, input_size, size, channels, _thresholds(args)


def load_detector(args):
    """(detector, thresholds, the PatchCore scorer its calibration fuses in or None, noise seed)."""
    meta, meta_path, npz_path = _read_meta(args)
    stored = meta.get("settings") if isinstance(meta, dict) else None
    try:
        settings = Infer.model_validate(stored)
    except ValueError as exc:  # pydantic's ValidationError
        raise CheckpointError(f"{meta_path}: no valid 'settings' (expected the keys {sorted(Infer.model_fields)}: "
                              f"{str(exc).splitlines()[1] if stored else 'none stored'}); "
                              f"rerun `dvc repro infer@{args.method}`") from None
    # the files infer used: dvc.yaml maps a method to them and infer records them beside its maps
    if not (args.checkpoint or meta.get("model")):
        raise CheckpointError(f"{meta_path}: no 'model' recorded; rerun `dvc repro infer@{args.method}` "
                              f"(or pass --checkpoint)")
    ddpm = Path(args.checkpoint or meta["model"])
    generator = args.generator or meta.get("generator")
    generator = Path(generator) if generator else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    det = Detector.load(ddpm, settings, generator_path=generator, device=device)
    if settings.error == "feature":
        if type(meta.get("feature_size")) is not int:
            raise CheckpointError(f"{meta_path}: no 'feature_size' for infer.error: feature; "
                                  f"rerun `dvc repro infer@{args.method}`")
        adapted = meta.get("adapted_extractor")  # DDAD's domain adaptation: the extractor infer tuned
        det.extractor = (features.load_adapted(meta_path.parent / adapted, meta["feature_size"]) if adapted
                         else FeatureExtractor(meta["feature_size"])).to(device)
    for t, steps, _ in det.plan():  # settings stored for another checkpoint may not fit this schedule
        try:
            det.schedule.respace(t, steps)
        except ValueError as exc:
            raise CheckpointError(f"{meta_path}: settings do not fit {ddpm} ({det.schedule.timesteps} "
                                  f"timesteps: {exc}); rerun `dvc repro infer@{args.method}`") from None
    arrays = io.read_artefact(npz_path, io.load_npz)
    kinds = meta.get("calibration") or {}
    if settings.normalize == "auto" and not kinds:
        raise CheckpointError(f"{meta_path}: no 'calibration' chosen on val; rerun `dvc repro infer@{args.method}`")
    try:
        det.set_stats_arrays(arrays, kinds)
        for cal in (det.map_cal, det.score_cal):
            if not cal.fitted:
                raise ValueError(f"the {cal.kind} calibration's statistics are incomplete")
        probe = torch.zeros(1, len(det.levels()) + det.uses_memory(), det.image_size, det.image_size)
        det.finish(probe)  # statistics of another image size or noise plan fail here, not later
    except (ValueError, RuntimeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{npz_path}: statistics do not match {ddpm} (image size {det.image_size}, "
                              f"{len(det.levels())} noise level(s): {first}); rerun `dvc repro infer@{args.method}`") from None
    memory = _memory_scorer(meta.get("memory"), meta_path, args.method, det.channels) if det.uses_memory() else None
    seed = args.seed if args.seed is not None else meta.get("seed", 0)
    return det, _thresholds(args), memory, seed


def predict(args) -> int:
    if args.threshold is not None and not math.isfinite(args.threshold):
        raise DataError(f"--threshold: {args.threshold} is not a finite number")
    files = collect_inputs(args.inputs)
    given = [args.maps or f"data/maps/{args.method}", args.checkpoint, args.generator, args.metrics]
    check_out(Path(args.out), files + [Path(p) for p in args.inputs] + [Path(p) for p in given if p])
    memory = None  # (PatchCore scorer, the size its inputs are read at)
    if args.method == "patchcore":
        scorer, input_size, size, channels, thr = load_patchcore(args)
        memory = (scorer, input_size)
    else:
        det, thr, memory, seed = load_detector(args)
        size, channels = det.image_size, det.channels
    images, feature_inputs = [], []
    for f in files:  # read everything first: a bad image stops before anything is written
        images.append(io.read_image(f, size, channels))
        if memory is not None and memory[1] != size:  # the features see the photograph's detail
            feature_inputs.append(io.read_image(f, memory[1], channels))
    x = torch.stack(images)
    if memory is not None:
        with torch.no_grad():
            memory_maps = memory[0].maps(torch.stack(feature_inputs) if feature_inputs else x, out_size=size)
    if args.method == "patchcore":
        maps, recon = memory_maps, x
        scores = maps.flatten(1).max(dim=1).values
    else:
        # the noise infer drew for these very images (each image's own stream: Detector.raw_maps)
        raw, recon = det.raw_maps(x, Detector.noise_generator(seed), progress=not args.quiet, desc="predict")
        if memory is not None:
            raw = torch.cat([raw, memory_maps], dim=1)
        maps, scores = det.finish(raw)
    out = Path(args.out)
    names = [f"{i:04d}_{f.stem}.png" for i, f in enumerate(files)]
    with io.atomic_dir(out) as tmp:
        for name, img, rec, m in zip(names, x, recon, maps):
            plots.write_overlay(tmp / name, io.tensor_to_uint8(img), io.tensor_to_uint8(rec),
                                m[0].numpy(), thr["pixel"])
        table = pd.DataFrame({"path": [str(f) for f in files], "overlay": names,
                              "score": scores.numpy().round(6)})
        # the verdict from the exact score, as evaluate applied the threshold (not the rounded one)
        table["anomalous"] = (scores.numpy() >= thr["image"]) if thr["image"] is not None else pd.NA
        io.write_csv(tmp / "predictions.csv", table)
    print(f"wrote {len(files)} overlays and predictions.csv to {out}"
          + ("" if thr["image"] is not None else " (no threshold: run evaluate first or pass --threshold)"))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="anodiff", description="Defect segmentation with diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="anomaly maps and scores for new images")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--method", choices=("ddpm", "rddpm", "gan", "patchcore"), default="ddpm")
    p.add_argument("--out", default="predictions", help="output folder (replaced whole)")
    p.add_argument("--checkpoint", help="DDPM checkpoint (default: the one infer used, from the maps' meta.json)")
    p.add_argument("--generator", help="GAN generator checkpoint (default: the one infer used, for gan)")
    p.add_argument("--maps", help="folder written by infer (default data/maps/<method>)")
    p.add_argument("--metrics", help="metrics JSON holding the thresholds (default metrics/<method>.json)")
    p.add_argument("--threshold", type=float, help="image-score threshold (overrides the chosen one)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the noise (default: the params seed infer used, so an image gets infer's score)")
    p.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        return predict(args)
    except (AnodiffError, BadImageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
