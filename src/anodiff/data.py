"""The prepared data set: written by `prepare()`, read back (manifest rows, images, masks) by the rest.

`prepare()` turns a source (synthetic or a folder) into `data/prepared` (images, masks,
manifest.csv); the readers give the later stages its manifest rows, images and masks.

Which file goes to which split is layouts.py's job; this module reads the files (through
io.py), mixes in the contamination, adds augmented copies and writes the manifest.
Bad input is collected over the whole source and raised as ONE DataError naming every
offending file (one line when there is one, a line per file otherwise); with
`data.skip_bad_files` unreadable files are skipped with a warning.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from PIL import Image

from anodiff import io, synth
from anodiff.errors import BadImageError, DataError
from anodiff.layouts import Problem, Record, read_layout

if TYPE_CHECKING:
    import torch
    from anodiff.config import Augment, Data, Synth

SPLITS = ("train", "val", "test")
LABELS = ("normal", "anomalous")
COLUMNS = ["path", "split", "label", "defect", "mask", "ddpm_train", "augmented", "source"]
MANIFEST = "manifest.csv"
FEATURES_PATH = "features_path"  # the image at the extractor's size, where prepare kept one

# the fewest normal val images the calibrations fit on (calibration_choice.py checks it too, by name)
MIN_NORMAL_VAL = 4

# streams of the seeded numpy generator, one per purpose (layouts.py uses 101 for splits)
_CONTAMINATION_STREAM, _AUGMENT_STREAM = 202, 303


# ---------------------------------------------------------------- reading the source
def _to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    if channels == 3:
        return image
    return np.asarray(Image.fromarray(image).convert("L"))[..., None]


def _safe_name(defect: str, stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{defect}_{stem}")


def _load_records(records: list[Record], problems: list[Problem], *, image_size: int,
                  channels: int) -> list[dict]:
    """Decode every record (image, and mask at the same size); failures become problems.
    Each item keeps its file's original (width, height) under "original"."""
    items = []
    for rec in records:
        try:
            image, original = io.load_image_with_size(rec.path, image_size, channels)
        except BadImageError as exc:
            problems.append(Problem(rec.path, exc.reason, True))
            continue
        mask = None
        if rec.mask is not None:
            try:
                mask, mask_original = io.read_mask_with_size(rec.mask, image_size)
            except BadImageError as exc:
                problems.append(Problem(rec.mask, f"mask {exc.reason}", True))
                continue
            if mask_original != original:
                what = (f"mask is {mask_original[0]}x{mask_original[1]} px but its image {rec.path} "
                        f"is {original[0]}x{original[1]} px")
                problems.append(Problem(rec.mask, what, True))
                continue
        items.append(dict(split=rec.split, label=rec.label, defect=rec.defect,
                          name=_safe_name(rec.defect, rec.path.stem), image=image, mask=mask,
                          source=str(rec.path), original=original))
    return items


def keep_feature_copies(items: list[dict], image_size: int, feature_size: int, channels: int) -> bool:
    """Where the source photographs are larger than `data.image_size` (and the extractor's input,
    `patchcore.image_size`, is larger too), give every item a copy at the extractor's size,
    "feature_image", read again from its file: at 64 px a hairline of a 1024-px photograph is gone,
    while the pretrained features can still see it at 256. Returns whether copies were made (then
    for every item, small sources resized up like the rest, so the features see one size)."""
    if feature_size <= image_size or not any(max(it.get("original", (0, 0))) > image_size for it in items):
        return False
    for it in items:
        it["feature_image"] = io.load_image_uint8(it["source"], feature_size, channels)
    return True


def _check(problems: list[Problem], root, skip: bool, warn) -> None:
    """Raise one DataError naming every problem, or warn about the skipped files."""
    if not problems:
        return
    problems = sorted(problems, key=lambda p: str(p.path))
    if not skip or any(not p.skippable for p in problems):
        if len(problems) == 1:  # the usual case: one line naming the file
            (p,) = problems
            hint = " (data.skip_bad_files: true skips it with a warning)" if p.skippable else ""
            raise DataError(f"{p}{hint}")
        hint = ""
        if all(p.skippable for p in problems):
            hint = "\n(data.skip_bad_files: true skips these files with a warning)"
        elif any(p.skippable for p in problems):
            hint = "\n(data.skip_bad_files: true would skip the bad files, but not missing or empty folders)"
        raise DataError(f"{len(problems)} problem(s) with the files in {root}:\n"
                        + "\n".join(f"  {p}" for p in problems) + hint)
    warn(f"warning: skipped {len(problems)} bad file(s) (data.skip_bad_files: true):\n"
         + "\n".join(f"  {p}" for p in problems))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def read_source(data_cfg: Data, synth_cfg: Synth, seed: int, warn=_stderr, feature_size: int = 0) -> list[dict]:
    """Items (split, label, defect, name, image uint8 (H,W,C), mask (H,W)|None, source) of the
    source named by `data.source`, read and checked; with "feature_image" too where
    `keep_feature_copies` keeps one at `feature_size`."""
    size, channels = data_cfg.image_size, data_cfg.channels
    if data_cfg.source == "synthetic":
        items = synth.generate(seed, synth_cfg, size)
        for it in items:
            it["image"] = _to_channels(it["image"], channels)
            it["mask"] = it["mask"] if it["label"] == "anomalous" else None
            it["source"] = "synthetic"
        return items
    root = Path(data_cfg.source).expanduser()
    records, problems = read_layout(
        root, data_cfg.layout, seed, val_fraction=data_cfg.val_fraction,
        train_anomalous_fraction=data_cfg.train_anomalous_fraction,
        marble_normal=data_cfg.marble_normal, marble_anomalous=data_cfg.marble_anomalous)
    items = _load_records(records, problems, image_size=size, channels=channels)
    _check(problems, root, data_cfg.skip_bad_files, warn)
    bad = {str(p.path) for p in problems}  # e.g. an image that was readable but has no mask
    items = [it for it in items if it["source"] not in bad]
    keep_feature_copies(items, size, feature_size, channels)
    for split in SPLITS:
        if split != "val" and not any(it["split"] == split and it["label"] == "normal" for it in items):
            raise DataError(f"{root}: no readable normal images for the {split} split")
    if normal_only(items):  # the thresholds and calibrations come from the normal val images alone
        n_val = sum(it["split"] == "val" for it in items)
        if n_val < MIN_NORMAL_VAL:
            n = sum(it["label"] == "normal" for it in items)
            raise DataError(f"{root}: a normal-only source needs at least {MIN_NORMAL_VAL} images in the val split, "
                            f"its {n} normal images give {n_val} (data.val_fraction={data_cfg.val_fraction}); "
                            f"add normal images or raise data.val_fraction")
    return items


def normal_only(items_or_rows) -> bool:
    """Whether a source (read items, or manifest rows) has no anomalous image at all: then nothing
    can be chosen by how well anomalies are found, only by how normal images score."""
    labels = items_or_rows["label"] if isinstance(items_or_rows, pd.DataFrame) else [it["label"] for it in items_or_rows]
    return not any(lab == "anomalous" for lab in labels)


# ---------------------------------------------------------------- contamination, augmentation
def contamination_count(n_normal: int, contamination: float) -> int:
    """k with k / (n_normal + k) as close as possible to `contamination` (ties: fewer)."""
    if contamination <= 0 or n_normal == 0:
        return 0
    k0 = contamination * n_normal / (1 - contamination)
    candidates = sorted({int(np.floor(k0)), int(np.ceil(k0))})
    return min(candidates, key=lambda k: (abs(k / (n_normal + k) - contamination), k))


def augment(image: np.ndarray, rng: np.random.Generator, *, flip_p: float, rot90: bool,
            brightness: tuple[float, float]) -> np.ndarray:
    """The marble report's augmentation: h/v flips (each p=flip_p), a random multiple of 90
    degrees (if rot90), brightness x uniform[lo, hi]. Always draws the same numbers."""
    flip_h, flip_v = rng.random(2) < flip_p
    k = int(rng.integers(4))
    factor = rng.uniform(*brightness)
    out = image
    if flip_h:
        out = out[:, ::-1]
    if flip_v:
        out = out[::-1]
    if rot90:
        out = np.rot90(out, k)
    return np.clip(np.rint(out.astype(np.float64) * factor), 0, 255).astype(np.uint8)


def _mix_and_balance(items: list[dict], seed: int, *, contamination: float, aug: Augment,
                     synthetic: bool, warn=_stderr) -> list[dict]:
    """Mark the DDPM's unlabeled training set and add augmented normal copies (in place + new).
    A normal-only source has nothing to mix in: data.contamination is then ignored, with a note."""
    normals = [it for it in items if it["split"] == "train" and it["label"] == "normal"]
    pool = [it for it in items if it["split"] == "train" and it["label"] == "anomalous"]
    for it in items:
        it["ddpm_train"] = int(it["split"] == "train" and it["label"] == "normal")
        it["augmented"] = 0
    if contamination > 0 and normal_only(items):
        warn(f"note: data.contamination: {contamination} ignored: the source has no anomalous images to mix in "
             f"(normal-only: the DDPM trains on the normal images alone, and the GAN branch is skipped)")
        contamination = 0
    k = contamination_count(len(normals), contamination)
    if k > len(pool):
        more = "synth.n_train_anomalous" if synthetic else "data.train_anomalous_fraction"
        raise DataError(f"data.contamination: {contamination} needs {k} anomalous training images beside "
                        f"the {len(normals)} normal ones, but there are only {len(pool)}; lower "
                        f"data.contamination or raise {more}")
    rng = np.random.default_rng([seed, _CONTAMINATION_STREAM])
    for i in rng.choice(len(pool), size=k, replace=False):
        pool[i]["ddpm_train"] = 1

    copies = []
    if aug.balance and len(pool) > len(normals) and normals:
        rng = np.random.default_rng([seed, _AUGMENT_STREAM])
        order = rng.permutation(len(normals))
        for j in range(len(pool) - len(normals)):
            base = normals[order[j % len(normals)]]
            image = augment(base["image"], rng, flip_p=aug.flip_p, rot90=aug.rot90, brightness=aug.brightness)
            copies.append(dict(base, name=f"{base['name']}_aug{j:04d}", image=image, mask=None,
                               ddpm_train=0, augmented=1, feature_image=None))
    return items + copies


# ---------------------------------------------------------------- prepare
def prepare(out_dir, *, data_cfg: Data, synth_cfg: Synth, seed: int, warn=_stderr,
            feature_size: int = 0) -> pd.DataFrame:
    """Read `data.source`, split, mix, augment; write images/, masks/ and manifest.csv under
    `out_dir` (the stage passes a temp folder from io.atomic_dir). Returns the manifest.

    Sources larger than `data.image_size` are also kept at `feature_size` (the extractor's input)
    under features/, named in the manifest's column `features_path` (only then present; empty for
    augmented copies, which only the GAN reads)."""
    items = read_source(data_cfg, synth_cfg, seed, warn, feature_size)
    items = _mix_and_balance(items, seed, contamination=data_cfg.contamination, aug=data_cfg.augment,
                             synthetic=data_cfg.source == "synthetic", warn=warn)
    out_dir = Path(out_dir)
    rows, used = [], set()
    order = {s: i for i, s in enumerate(SPLITS)} | {lab: i for i, lab in enumerate(LABELS)}
    items.sort(key=lambda it: (order[it["split"]], order[it["label"]], it["augmented"], it["name"]))
    for it in items:
        folder = f"{it['split']}/{it['label']}"
        name, n = it["name"], 1
        while f"{folder}/{name}" in used:  # same stem in two source folders
            n += 1
            name = f"{it['name']}_{n}"
        used.add(f"{folder}/{name}")
        path = f"images/{folder}/{name}.png"
        io.write_png(out_dir / path, it["image"])
        mask = ""
        if it["mask"] is not None:
            mask = f"masks/{folder}/{name}.png"
            io.write_png(out_dir / mask, it["mask"].astype(np.uint8) * 255)
        row = dict(path=path, split=it["split"], label=it["label"], defect=it["defect"], mask=mask,
                   ddpm_train=it["ddpm_train"], augmented=it["augmented"], source=it["source"])
        if it.get("feature_image") is not None:
            row[FEATURES_PATH] = f"features/{folder}/{name}.png"
            io.write_png(out_dir / row[FEATURES_PATH], it["feature_image"])
        rows.append(row)
    with_copies = any(FEATURES_PATH in r for r in rows)
    manifest = pd.DataFrame(rows, columns=COLUMNS + [FEATURES_PATH] * with_copies)
    if with_copies:
        manifest[FEATURES_PATH] = manifest[FEATURES_PATH].fillna("")
    io.write_csv(out_dir / MANIFEST, manifest)
    return manifest


def describe(manifest: pd.DataFrame) -> str:
    """A few lines of counts per split and label for the stage's log."""
    lines = []
    for (split, label), g in manifest.groupby(["split", "label"], sort=False):
        defects = ", ".join(f"{d} {n}" for d, n in g["defect"].value_counts().sort_index().items())
        extra = f", {int(g['augmented'].sum())} augmented" if g["augmented"].any() else ""
        lines.append(f"{split:5s} {label:9s} {len(g):5d}  ({defects}{extra})")
    ddpm = manifest[manifest.ddpm_train == 1]
    n_anom = int((ddpm.label == "anomalous").sum())
    lines.append(f"DDPM training set: {len(ddpm)} images, {n_anom} anomalous "
                 f"({n_anom / max(len(ddpm), 1):.3f} contamination)")
    return "\n".join(lines)


# ---------------------------------------------------------------- loaders for later stages
def load_rows(prepared_dir, **filters) -> pd.DataFrame:
    """Manifest rows matching every filter: `split="test"`, `label=("normal", "anomalous")`,
    `ddpm_train=1`, ... (a list/tuple/set means any of)."""
    path = Path(prepared_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: not found (run the prepare stage first)")
    rows = io.read_csv(path)
    for key, value in filters.items():
        if key not in rows.columns:
            raise KeyError(f"manifest has no column {key!r}; columns: {', '.join(rows.columns)}")
        keep = rows[key].isin(list(value)) if isinstance(value, (list, tuple, set)) else rows[key] == value
        rows = rows[keep]
    return rows.reset_index(drop=True)


def load_images(prepared_dir, rows: pd.DataFrame, channels: int, size: int | None = None) -> torch.Tensor:
    """(N, channels, H, W) float32 in [-1, 1], in the order of `rows`."""
    import torch  # here: the manifest, masks and maps are read without torch (500 MB of memory)

    prepared_dir = Path(prepared_dir)
    paths = [prepared_dir / p for p in rows["path"]]
    if size is None:
        size = io.image_size_of(paths[0])[0] if paths else 0
    if not paths:
        return torch.zeros((0, channels, size, size))
    return torch.stack([io.read_image(p, size, channels) for p in paths])


def load_feature_images(prepared_dir, rows: pd.DataFrame, channels: int) -> tuple[torch.Tensor, str]:
    """The images the pretrained features are computed from, and which column they came from:
    the copies at the extractor's size where prepare kept them (`features_path`), else the images."""
    if FEATURES_PATH in rows and len(rows) and (rows[FEATURES_PATH].astype(str) != "").all():
        return load_images(prepared_dir, rows.assign(path=rows[FEATURES_PATH]), channels), FEATURES_PATH
    return load_images(prepared_dir, rows, channels), "path"


def load_masks(prepared_dir, rows: pd.DataFrame, size: int | None = None) -> np.ndarray | None:
    """(N, H, W) uint8 {0,1} (zeros where a row has no mask), or None when no row has one."""
    prepared_dir = Path(prepared_dir)
    with_mask = [m for m in rows["mask"] if m]
    if not with_mask:
        return None
    if size is None:
        size = io.image_size_of(prepared_dir / with_mask[0])[0]
    return np.stack([io.read_mask(prepared_dir / m, size) if m else np.zeros((size, size), np.uint8)
                     for m in rows["mask"]])


def grid_samples(prepared_dir, manifest: pd.DataFrame, size: int, per_group: int = 8):
    """(images uint8, masks, labels) of a few rows of each split/defect (and augmented copies)
    for plots.sample_grid."""
    prepared_dir = Path(prepared_dir)
    groups = manifest.assign(group=[f"{s} {'aug ' if a else ''}{d}" for s, a, d in
                                    zip(manifest.split, manifest.augmented, manifest.defect)])
    picked = groups.groupby("group", sort=False).head(per_group)
    images = [io.load_image_uint8(prepared_dir / p, size, 3) for p in picked["path"]]
    masks = [io.read_mask(prepared_dir / m, size) if m else None for m in picked["mask"]]
    return images, masks, list(picked["group"])
