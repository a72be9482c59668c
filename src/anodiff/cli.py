"""`anodiff predict`: score new images with a method the pipeline trained.

Workflow: train and evaluate with the pipeline, then point predict at your images.

    dvc repro                      # or just one method: dvc repro evaluate@ddpm
    anodiff predict --method ddpm slab1.png slab2.png folder/ --out predictions/
    python -m anodiff predict --project ~/anodiff --method patchcore photos/ --out scored/

What predict reads, in the project (`--project`, default: the current folder): the checkpoints,
settings, normal-image statistics and seed that `infer` recorded in data/maps/<method>/meta.json
and maps.npz (the DDPM, the GAN generator for `gan`, the memory bank for `patchcore` and for a
diffusion method whose map fuses the memory distance; their paths are relative to the project),
the thresholds that `evaluate` chose on the validation split (metrics/<method>.json
`thresholds`: "image" for the verdict, "pixel" for the mask) and `data.skip_bad_files` from
params.yaml (false when there is none). --maps, --metrics, --checkpoint, --generator, the inputs
and --out are relative to the current folder. A method is available once `dvc repro
infer@<method>` has written its meta.json; its verdicts need `dvc repro evaluate@<method>` (or
--threshold).

Each image is read as the pipeline read its training images (converted to the model's channel
count: grayscale replicated to RGB, RGB to luminance, alpha composited on black; resized to the
model's square size) and scored exactly as infer scored it: its noise is drawn from its own
stream, seeded by infer's seed and its pixels, so its score, and its verdict at the image
threshold, are the ones infer and evaluate measured, whatever the batch (--batch-size) or the
other images. Images are streamed batch by batch: memory does not grow with their number.

Output layout (`--out`, default predictions/; written to a temporary folder beside it and
renamed into place at the end, so a failure leaves no partial --out; an existing non-empty
--out is refused unless --force, which replaces it whole):

    predictions.csv         path, score, anomalous (score >= threshold), threshold (the image
                            threshold used), map, mask, overlay (paths relative to --out)
    maps/NNNN_<stem>.npy    the anomaly map, float32, at the image's own height x width
                            (resized bilinearly from the model's size)
    masks/NNNN_<stem>.png   the predicted defect region, 0/255 8-bit, at the image's own size:
                            map >= the pixel threshold (none when no pixel threshold is known)
    overlays/NNNN_<stem>.png  the image with the predicted region outlined, and the map as a
                            heat map over it with its colour bar (the pixel threshold marked)

NNNN is the row of the image in predictions.csv. Inputs: image files and folders (their images,
sorted by name, not recursive). An unreadable file, or one smaller than 8 px a side, stops
predict with one line naming it (exit 2, nothing written); inside a folder it is skipped with a
warning instead when the project's params.yaml has `data.skip_bad_files: true`.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from anodiff import features, io, patchcore, plots
from anodiff.config import Infer, infer_settings_from_meta
from anodiff.detector import Detector
from anodiff.runtime import pick_device
from anodiff.features import FeatureExtractor
from anodiff.errors import AnodiffError, BadImageError, CheckpointError, DataError

METHODS = ("ddpm", "rddpm", "gan", "patchcore")
MIN_SIDE = 8  # px: a smaller image has no structure to score


def version() -> str:
    """The installed distribution's version, else the package's own."""
    from importlib import metadata

    try:
        return metadata.version("anodiff")
    except metadata.PackageNotFoundError:
        from anodiff import __version__

        return __version__


def _in_project(args, path) -> Path:
    """A path recorded by the pipeline (relative to the project root) as seen from here."""
    path = Path(path)
    return path if path.is_absolute() else Path(args.project) / path


def collect_inputs(inputs: list[str]) -> list[Path]:
    """The image files named, and the images of the folders named (sorted by name)."""
    return [f for f, _ in _collect(inputs)]


def _collect(inputs: list[str]) -> list[tuple[Path, bool]]:
    """(file, whether it came from a folder) for every input."""
    files = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = io.list_images(p)
            if not found:
                raise DataError(f"{p}: folder holds no images ({', '.join(io.IMAGE_EXTENSIONS)})")
            files.extend((f, True) for f in found)
        elif p.exists():
            files.append((p, False))
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


def check_out_empty(out: Path, force: bool) -> None:
    """An existing --out that holds anything is replaced only with --force."""
    if not force and out.is_dir() and any(out.iterdir()):
        raise DataError(f"--out {out}: exists and is not empty; pass --force to replace it whole, "
                        f"or choose another folder")


def _thresholds(args) -> dict:
    metrics_path = Path(args.metrics) if args.metrics else _in_project(args, f"metrics/{args.method}.json")
    thresholds = {"pixel": None, "image": None}
    if metrics_path.exists():
        stored_thr = io.read_artefact(metrics_path, io.read_json)
        stored_thr = stored_thr.get("thresholds") if isinstance(stored_thr, dict) else None
        thresholds.update({k: v for k, v in (stored_thr or {}).items() if k in thresholds})
    if args.threshold is not None:
        thresholds["image"] = args.threshold
    return thresholds


def _maps_dir(args) -> Path:
    return Path(args.maps) if args.maps else _in_project(args, f"data/maps/{args.method}")


def available_methods(project) -> list[str]:
    """The methods whose `infer` output (data/maps/<method>/meta.json) the project holds, and did
    not skip (the GAN on normal-only data)."""
    def usable(meta_path: Path) -> bool:
        if not meta_path.is_file():
            return False
        try:
            return not io.read_json(meta_path).get("skipped")
        except (OSError, ValueError, AttributeError):
            return True  # damaged: predict names the problem when it is asked for this method
    return [m for m in METHODS if usable(Path(project) / "data" / "maps" / m / "meta.json")]


def _read_meta(args) -> tuple[dict, Path, Path]:
    maps_dir = _maps_dir(args)
    meta_path, npz_path = maps_dir / "meta.json", maps_dir / "maps.npz"
    if not args.maps and not meta_path.exists():
        there = available_methods(args.project)
        raise CheckpointError(f"{meta_path}: missing: method {args.method} has no infer output in project "
                              f"{args.project} (available there: {', '.join(there) or 'none'}); "
                              f"run `dvc repro infer@{args.method}` there first (or pass --maps)")
    if not meta_path.exists():
        raise CheckpointError(f"{meta_path}: missing; run `dvc repro infer@{args.method}` first (or pass --maps)")
    meta = io.read_artefact(meta_path, io.read_json)  # read once: the skip record and the settings
    if isinstance(meta, dict) and meta.get("skipped"):  # e.g. the GAN on normal-only data
        there = [m for m in available_methods(args.project) if m != args.method]
        raise CheckpointError(f"{meta_path}: the pipeline skipped {args.method}: {meta['skipped']} "
                              f"(use --method {' or '.join(there) or 'another method'})")
    if not npz_path.exists():
        raise CheckpointError(f"{npz_path}: missing; run `dvc repro infer@{args.method}` first (or pass --maps)")
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
    model = args.checkpoint or (_in_project(args, meta["model"]) if meta.get("model") else None)
    spec = {"model": model, "settings": meta.get("settings"), "input_size": meta.get("input_size")}
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
        settings = Infer.model_validate(infer_settings_from_meta(stored))  # an older meta.json's keys too
    except ValueError as exc:  # pydantic's ValidationError
        raise CheckpointError(f"{meta_path}: no valid 'settings' (expected the keys {sorted(Infer.model_fields)}: "
                              f"{str(exc).splitlines()[1] if stored else 'none stored'}); "
                              f"rerun `dvc repro infer@{args.method}`") from None
    # the files infer used: dvc.yaml maps a method to them and infer records them beside its maps
    if not (args.checkpoint or meta.get("model")):
        raise CheckpointError(f"{meta_path}: no 'model' recorded; rerun `dvc repro infer@{args.method}` "
                              f"(or pass --checkpoint)")
    ddpm = Path(args.checkpoint) if args.checkpoint else _in_project(args, meta["model"])
    noise_model_path = Path(args.generator) if args.generator else (  # --generator: the GAN's noise network
        _in_project(args, meta["generator"]) if meta.get("generator") else None)
    device = pick_device()  # the stages' choice (runtime.py): CUDA when present
    det = Detector.load(ddpm, settings, noise_model_path=noise_model_path, device=device)
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
    memory = None
    if det.uses_memory():
        spec = meta.get("memory")
        if isinstance(spec, dict) and spec.get("model"):
            spec = {**spec, "model": _in_project(args, spec["model"])}
        memory = _memory_scorer(spec, meta_path, args.method, det.channels)
    seed = args.seed if args.seed is not None else meta.get("seed", 0)
    return det, _thresholds(args), memory, seed


# ---------------------------------------------------------------- inputs
def _skip_bad_files(args) -> tuple[bool, Path]:
    """The project's `data.skip_bad_files` (false without a params.yaml) and the file it is from."""
    path = Path(args.project) / "params.yaml"
    if not path.is_file():
        return False, path
    from anodiff.config import load_params

    return bool(load_params(path).data.skip_bad_files), path


def check_images(args, inputs: list[tuple[Path, bool]]) -> list[Path]:
    """Decode every input once before any work: an unreadable or tiny file stops predict with one
    line naming it; one found in a folder is skipped with a warning under `data.skip_bad_files`."""
    keep, skip = [], None
    for f, in_folder in inputs:
        try:
            w, h = io.image_size_of(f)
            if min(w, h) < MIN_SIDE:
                raise BadImageError(f, f"{w}x{h} px; predict needs at least {MIN_SIDE} px a side")
        except BadImageError as exc:
            if not in_folder:
                raise
            if skip is None:
                skip = _skip_bad_files(args)
            if not skip[0]:
                raise BadImageError(f, f"{exc.reason} (data.skip_bad_files: true in {skip[1]} "
                                       f"skips it with a warning)") from None
            print(f"warning: {exc}; skipped (data.skip_bad_files: true in {skip[1]})", file=sys.stderr)
            continue
        keep.append(f)
    if not keep:
        raise DataError("no readable image among the inputs (every one was skipped)")
    return keep


def _own_image(path: Path, channels: int) -> np.ndarray:
    """(H, W, C) uint8 at the file's own size, in the model's channel count."""
    arr = np.asarray(io.to_mode(io._open(path), channels), dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def own_size(amap: torch.Tensor, height: int, width: int) -> np.ndarray:
    """A (S, S) map at the model's size -> (height, width) float32, bilinear."""
    m = amap.detach().float().cpu().reshape(1, 1, *amap.shape[-2:])
    if tuple(m.shape[-2:]) != (height, width):
        m = F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False)
    return m[0, 0].numpy().astype(np.float32)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with io.atomic_write(path, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)


# ---------------------------------------------------------------- predict
def predict(args) -> int:
    if args.threshold is not None and not math.isfinite(args.threshold):
        raise DataError(f"--threshold: {args.threshold} is not a finite number")
    if not Path(args.project).is_dir():
        raise DataError(f"--project {args.project}: no such folder (the pipeline's project root)")
    inputs = _collect(args.inputs)
    files = [f for f, _ in inputs]
    given = [_maps_dir(args), args.checkpoint, args.generator,
             args.metrics or _in_project(args, f"metrics/{args.method}.json")]
    out = Path(args.out)
    check_out(out, files + [Path(p) for p in args.inputs] + [Path(p) for p in given if p])
    memory = None  # (PatchCore scorer, the size its inputs are read at)
    if args.method == "patchcore":
        scorer, input_size, size, channels, thr = load_patchcore(args)
        memory = (scorer, input_size)
    else:
        det, thr, memory, seed = load_detector(args)
        size, channels = det.image_size, det.channels
    files = check_images(args, inputs)  # a bad image stops before anything is computed or written
    check_out_empty(out, args.force)
    # the model and the memory bank's extractor see the batches of one pass over all the images
    # (groups of infer's and patchcore's batch_size, in input order): a step of a multiple of
    # those gives every image the very same floating-point result, whatever --batch-size
    group = 1
    if args.method != "patchcore":
        group = det.settings.batch_size
    if memory is not None:
        group = math.lcm(group, int(memory[0].settings.get("batch_size", 1)))
    step = -(-args.batch_size // group) * group

    def score(chunk: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps (n, 1, S, S) and scores (n,) at the model's size S, as infer computed them."""
        x = torch.stack([io.read_image(f, size, channels) for f in chunk])
        if memory is not None:
            feats = (torch.stack([io.read_image(f, memory[1], channels) for f in chunk])
                     if memory[1] != size else x)  # the features see the photograph's detail
            with torch.no_grad():
                memory_maps = memory[0].maps(feats, out_size=size)
        if args.method == "patchcore":
            return memory_maps, memory_maps.flatten(1).max(dim=1).values
        # the noise infer drew for these very images: each image's own stream, from one draw of the
        # seed's random-number generator (Detector.raw_maps), so a fresh one per batch gives each its noise
        raw, _ = det.raw_maps(x, Detector.noise_rng(seed), progress=False, desc="predict")
        if memory is not None:
            raw = torch.cat([raw, memory_maps], dim=1)
        return det.finish(raw)

    rows = []
    with io.atomic_dir(out) as tmp, tqdm(total=len(files), desc="predict", unit="image",
                                         disable=args.quiet, file=sys.stderr) as bar:
        for start in range(0, len(files), step):
            chunk = files[start:start + step]
            maps, scores = score(chunk)
            for i, (f, m, s) in enumerate(zip(chunk, maps, scores.numpy()), start):
                stem = f"{i:04d}_{f.stem}"
                image = _own_image(f, channels)
                amap = own_size(m[0], *image.shape[:2])
                mask = amap >= thr["pixel"] if thr["pixel"] is not None else None
                row = {"path": str(f), "score": s, "map": f"maps/{stem}.npy",
                       "mask": f"masks/{stem}.png" if mask is not None else "", "overlay": f"overlays/{stem}.png"}
                _save_npy(tmp / row["map"], amap)
                if mask is not None:
                    io.write_png(tmp / row["mask"], mask.astype(np.uint8) * 255)
                verdict = "" if thr["image"] is None else (" anomalous" if s >= thr["image"] else " normal")
                plots.write_prediction(tmp / row["overlay"], image, amap, mask, thr["pixel"],
                                       title=f"{f.name}: score {s:.4g}{verdict}")
                rows.append(row)
            bar.update(len(chunk))
        scores = np.array([r["score"] for r in rows], dtype=np.float32)
        table = pd.DataFrame({"path": [r["path"] for r in rows], "score": scores.round(6)})
        # the verdict from the exact score, as evaluate applied the threshold (not the rounded one)
        table["anomalous"] = (scores >= thr["image"]) if thr["image"] is not None else pd.NA
        table["threshold"] = thr["image"] if thr["image"] is not None else pd.NA
        for key in ("map", "mask", "overlay"):
            table[key] = [r[key] for r in rows]
        io.write_csv(tmp / "predictions.csv", table)
    notes = []
    if thr["image"] is None:
        notes.append("no image threshold, no verdicts: run evaluate first or pass --threshold")
    if thr["pixel"] is None:
        notes.append("no pixel threshold, no masks: run evaluate first")
    n = len(rows)
    print(f"wrote {n} maps, {n if thr['pixel'] is not None else 0} masks, {n} overlays and predictions.csv "
          f"to {out}" + "".join(f" ({note})" for note in notes))
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anodiff", description="Defect segmentation with diffusion models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "predict", help="anomaly maps, masks and scores for new images",
        description="Score new images with a method the pipeline trained (dvc repro infer@<method>; "
                    "evaluate@<method> for the thresholds). Writes predictions.csv and, per image, the "
                    "anomaly map (maps/*.npy), the mask (masks/*.png) and an overlay (overlays/*.png) at "
                    "the image's own size.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders of images")
    p.add_argument("--method", choices=METHODS, default="ddpm",
                   help="the trained method to apply; it must have been run through infer in the project "
                        "(default: %(default)s)")
    p.add_argument("--project", default=".",
                   help="the pipeline's project root: data/maps/<method>, metrics/<method>.json, the "
                        "checkpoints recorded there and params.yaml are read from it (default: the "
                        "current folder)")
    p.add_argument("--out", default="predictions",
                   help="output folder, relative to the current folder (default: %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing non-empty --out whole (default: refuse it)")
    p.add_argument("--batch-size", type=_positive_int, default=16,
                   help="images read and scored per step, rounded up to a multiple of the batch size infer "
                        "used (infer.batch_size; patchcore.batch_size): memory grows with it, not with the "
                        "number of images; the scores do not change with it (default: %(default)s)")
    p.add_argument("--checkpoint",
                   help="DDPM checkpoint, or memory bank for patchcore (default: the one infer used, "
                        "from the maps' meta.json)")
    p.add_argument("--generator", help="GAN generator checkpoint (default: the one infer used, for gan)")
    p.add_argument("--maps", help="folder written by infer (default: <project>/data/maps/<method>)")
    p.add_argument("--metrics", help="metrics JSON holding the thresholds (default: <project>/metrics/<method>.json)")
    p.add_argument("--threshold", type=float,
                   help="image-score threshold of the verdict (default: the one evaluate chose on val)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the noise (default: the params seed infer used, so an image gets infer's score)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (default: show it)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return predict(args)
    except (AnodiffError, BadImageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
