"""Folder layouts -> records -> `data/prepared` (images, masks, manifest.csv), and loaders.

Layouts (see DESIGN.md) and how each forms its splits, all stratified per class and drawn
from `seed` over sorted file lists:
- `mvtec`: train/good -> train normal. Of each defect's test images, a
  `data.train_anomalous_fraction` share becomes train anomalous (the GAN's labelled side
  and the contamination pool; never evaluated on); the rest of the test set, good images
  included, is split `data.val_fraction` -> val, the remainder -> test.
- `marble`: a `data.val_fraction` share of each train/<class> folder -> val, the rest ->
  train; test/ -> test. Classes from `data.marble_normal` / `data.marble_anomalous`, other
  folders are left out. Image-level labels only: no masks.
- `folder`: normal/ -> `data.val_fraction` val, `data.val_fraction` test, the rest train;
  anomalous/ -> `data.train_anomalous_fraction` train, the rest split `data.val_fraction`
  val / test. masks/<stem>*.png (optional; when the folder exists, every anomalous image
  needs one).
Every file lands in exactly one split, so nothing is both trained on and evaluated on.

Bad input is collected over the whole source and raised as ONE DataError naming every
offending file; with `data.skip_bad_files` unreadable files are skipped with a warning.
"""

from __future__ import annotations

import re
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from anodiff import io, synth
from anodiff.errors import BadImageError, DataError

SPLITS = ("train", "val", "test")
LABELS = ("normal", "anomalous")
COLUMNS = ["path", "split", "label", "defect", "mask", "ddpm_train", "augmented", "source"]
MANIFEST = "manifest.csv"

# streams of the seeded numpy generator, one per purpose
_SPLIT_STREAM, _CONTAMINATION_STREAM, _AUGMENT_STREAM = 101, 202, 303


@dataclass(frozen=True)
class Record:
    """One source image before reading: where it is and where it goes."""

    path: Path
    split: str
    label: str
    defect: str
    mask: Path | None = None


@dataclass(frozen=True)
class Problem:
    path: Path
    what: str
    skippable: bool  # an unreadable/odd file (data.skip_bad_files may skip it), not a structural fault

    def __str__(self):
        return f"{self.path}: {self.what}"


def _half_up(x: float) -> int:
    """round() rounds 0.5 to even; splits should not depend on that."""
    return int(np.floor(x + 0.5))


# ---------------------------------------------------------------- layouts
def _class_files(folder: Path, problems: list[Problem]) -> list[Path]:
    """Images in a class folder; missing/empty folders and non-image files become problems."""
    if not folder.is_dir():
        problems.append(Problem(folder, "missing folder", False))
        return []
    images = io.list_images(folder)
    for f in sorted(set(io.list_files(folder)) - set(images)):
        expected = ", ".join(io.IMAGE_EXTENSIONS)
        problems.append(Problem(f, f"not an image file (expected one of {expected})", True))
    if not images:
        problems.append(Problem(folder, "empty folder: no images", False))
    return images


def _subdirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_rng(seed: int, *names: str) -> np.random.Generator:
    """A split generator per class folder: adding or removing one class reshuffles no other."""
    return np.random.default_rng([seed, _SPLIT_STREAM, *(zlib.crc32(n.encode()) for n in names)])


def _shuffled(files: list[Path], rng: np.random.Generator) -> list[Path]:
    return [files[i] for i in rng.permutation(len(files))]


def _split_held_out(files, rng, val_fraction):
    """(val, test) from held-out files: a val_fraction share to val."""
    files = _shuffled(files, rng)
    n_val = _half_up(val_fraction * len(files))
    return files[:n_val], files[n_val:]


def read_mvtec(root: Path, cfg, seed: int) -> tuple[list[Record], list[Problem]]:
    problems: list[Problem] = []
    records = [Record(p, "train", "normal", "good") for p in _class_files(root / "train" / "good", problems)]
    test = root / "test"
    if not test.is_dir():
        problems.append(Problem(test, "missing folder", False))
        return records, problems
    defects = _subdirs(test)
    if "good" not in defects:
        problems.append(Problem(test / "good", "missing folder", False))
    for defect in defects:
        rng = _class_rng(seed, "test", defect)
        files = _class_files(test / defect, problems)
        if defect == "good":
            val, rest = _split_held_out(files, rng, cfg.val_fraction)
            records += [Record(p, "val", "normal", "good") for p in val]
            records += [Record(p, "test", "normal", "good") for p in rest]
            continue
        masks = {}
        for p in files:
            mask = root / "ground_truth" / defect / f"{p.stem}_mask.png"
            if mask.is_file():
                masks[p] = mask
            else:
                problems.append(Problem(p, f"anomalous test image has no mask (expected {mask})", True))
        files = _shuffled(files, rng)
        n_train = _half_up(cfg.train_anomalous_fraction * len(files))
        val, rest = _split_held_out(sorted(files[n_train:]), rng, cfg.val_fraction)
        for split, part in (("train", files[:n_train]), ("val", val), ("test", rest)):
            records += [Record(p, split, "anomalous", defect, masks.get(p)) for p in part]
    return records, problems


def read_marble(root: Path, cfg, seed: int) -> tuple[list[Record], list[Problem]]:
    both = set(cfg.marble_normal) & set(cfg.marble_anomalous)
    if both:
        raise DataError(f"data.marble_normal and data.marble_anomalous both list {sorted(both)}")
    problems: list[Problem] = []
    records: list[Record] = []
    classes = [(c, "normal") for c in cfg.marble_normal] + [(c, "anomalous") for c in cfg.marble_anomalous]
    for part in ("train", "test"):
        if not (root / part).is_dir():
            problems.append(Problem(root / part, "missing folder", False))
            continue
        for cls, label in sorted(classes):
            files = _class_files(root / part / cls, problems)
            if part == "test":
                records += [Record(p, "test", label, cls) for p in files]
            else:
                val, train = _split_held_out(files, _class_rng(seed, part, cls), cfg.val_fraction)
                records += [Record(p, "val", label, cls) for p in val]
                records += [Record(p, "train", label, cls) for p in train]
    return records, problems


def _mask_for(image: Path, masks: list[Path]) -> list[Path]:
    """Masks named <stem>.ext or <stem><_-.>anything.ext (img1 does not match img10_mask)."""
    s = image.stem
    return [m for m in masks if m.stem == s or (m.stem.startswith(s) and m.stem[len(s)] in "_-.")]


def read_folder(root: Path, cfg, seed: int) -> tuple[list[Record], list[Problem]]:
    problems: list[Problem] = []
    records: list[Record] = []
    normal = _shuffled(_class_files(root / "normal", problems), _class_rng(seed, "normal"))
    n_val = n_test = _half_up(cfg.val_fraction * len(normal))
    if normal and len(normal) - n_val - n_test < 1:
        raise DataError(f"{root / 'normal'}: {len(normal)} normal images leave none for training after "
                        f"data.val_fraction={cfg.val_fraction} for val and again for test")
    records += [Record(p, "val", "normal", "good") for p in normal[:n_val]]
    records += [Record(p, "test", "normal", "good") for p in normal[n_val:n_val + n_test]]
    records += [Record(p, "train", "normal", "good") for p in normal[n_val + n_test:]]

    anomalous = _class_files(root / "anomalous", problems)
    masks_dir = root / "masks"
    masks = {}
    if masks_dir.is_dir():
        mask_files = io.list_images(masks_dir)
        for p in anomalous:
            found = _mask_for(p, mask_files)
            if len(found) == 1:
                masks[p] = found[0]
            elif not found:
                what = f"no mask in {masks_dir} (expected {masks_dir / p.stem}*.png)"
                problems.append(Problem(p, what, True))
            else:
                problems.append(Problem(p, "several masks match: " + ", ".join(m.name for m in found), True))
    rng = _class_rng(seed, "anomalous")
    anomalous = _shuffled(anomalous, rng)
    n_train = _half_up(cfg.train_anomalous_fraction * len(anomalous))
    val, test = _split_held_out(sorted(anomalous[n_train:]), rng, cfg.val_fraction)
    for split, part in (("train", anomalous[:n_train]), ("val", val), ("test", test)):
        records += [Record(p, split, "anomalous", "anomalous", masks.get(p)) for p in part]
    return records, problems


READERS = {"mvtec": read_mvtec, "marble": read_marble, "folder": read_folder}


def detect_layout(root: Path) -> str:
    """mvtec, marble or folder from the subfolders of `root`; DataError when none fits."""
    if not root.exists():
        raise DataError(f"data.source: {root}: folder not found")
    if not root.is_dir():
        raise DataError(f"data.source: {root}: not a folder")
    subdirs = _subdirs(root)
    if "ground_truth" in subdirs:
        return "mvtec"
    if "train" in subdirs and "test" in subdirs:
        # both have train/good and test/good; only marble has other classes under train/
        return "marble" if set(_subdirs(root / "train")) - {"good"} else "mvtec"
    if "normal" in subdirs or "anomalous" in subdirs:
        return "folder"
    raise DataError(
        f"data.source: {root}: cannot recognise the layout (data.layout: auto); found "
        f"{'subfolders ' + ', '.join(subdirs) if subdirs else 'no subfolders'}; expected train/, test/, "
        f"ground_truth/ (mvtec), train/ and test/ with good/crack/dot/joint (marble), or normal/ and "
        f"anomalous/ (folder)")


def read_layout(root, layout: str, cfg, seed: int) -> tuple[list[Record], list[Problem]]:
    """Records of every image of a source folder, and the problems found on the way."""
    root = Path(root)
    if layout == "auto":
        layout = detect_layout(root)
    elif not root.is_dir():
        raise DataError(f"data.source: {root}: folder not found")
    return READERS[layout](root, cfg, seed)


# ---------------------------------------------------------------- reading images
def _to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    if channels == 3:
        return image
    return np.asarray(Image.fromarray(image).convert("L"))[..., None]


def _safe_name(defect: str, stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{defect}_{stem}")


def _load_records(records: list[Record], cfg, problems: list[Problem]) -> list[dict]:
    """Decode every record (image, and mask at the same size); failures become problems."""
    items = []
    for rec in records:
        try:
            image, original = io.load_image_with_size(rec.path, cfg.image_size, cfg.channels)
        except BadImageError as exc:
            problems.append(Problem(rec.path, exc.reason, True))
            continue
        mask = None
        if rec.mask is not None:
            try:
                mask, mask_original = io.read_mask_with_size(rec.mask, cfg.image_size)
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
                          source=str(rec.path)))
    return items


def _check(problems: list[Problem], root, skip: bool, warn) -> None:
    """Raise one DataError naming every problem, or warn about the skipped files."""
    if not problems:
        return
    problems = sorted(problems, key=lambda p: str(p.path))
    if not skip or any(not p.skippable for p in problems):
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


def read_source(params, warn=_stderr) -> list[dict]:
    """Items (split, label, defect, name, image uint8 (H,W,C), mask (H,W)|None, source) of the
    source named by `data.source`, read and checked."""
    cfg = params.data
    if cfg.source == "synthetic":
        items = synth.generate(params.seed, params.synth, cfg.image_size)
        for it in items:
            it["image"] = _to_channels(it["image"], cfg.channels)
            it["mask"] = it["mask"] if it["label"] == "anomalous" else None
            it["source"] = "synthetic"
        return items
    root = Path(cfg.source).expanduser()
    records, problems = read_layout(root, cfg.layout, cfg, params.seed)
    items = _load_records(records, cfg, problems)
    _check(problems, root, cfg.skip_bad_files, warn)
    bad = {str(p.path) for p in problems}  # e.g. an image that was readable but has no mask
    items = [it for it in items if it["source"] not in bad]
    for split in SPLITS:
        if split != "val" and not any(it["split"] == split and it["label"] == "normal" for it in items):
            raise DataError(f"{root}: no readable normal images for the {split} split")
    return items


# ---------------------------------------------------------------- contamination, augmentation
def contamination_count(n_normal: int, contamination: float) -> int:
    """k with k / (n_normal + k) as close as possible to `contamination` (ties: fewer)."""
    if contamination <= 0 or n_normal == 0:
        return 0
    k0 = contamination * n_normal / (1 - contamination)
    candidates = sorted({int(np.floor(k0)), int(np.ceil(k0))})
    return min(candidates, key=lambda k: (abs(k / (n_normal + k) - contamination), k))


def augment(image: np.ndarray, rng: np.random.Generator, aug) -> np.ndarray:
    """The marble report's augmentation: h/v flips (each p=flip_p), a random multiple of 90
    degrees (if rot90), brightness x uniform[lo, hi]. Always draws the same numbers."""
    flip_h, flip_v = rng.random(2) < aug.flip_p
    k = int(rng.integers(4))
    factor = rng.uniform(*aug.brightness)
    out = image
    if flip_h:
        out = out[:, ::-1]
    if flip_v:
        out = out[::-1]
    if aug.rot90:
        out = np.rot90(out, k)
    return np.clip(np.rint(out.astype(np.float64) * factor), 0, 255).astype(np.uint8)


def _mix_and_balance(items: list[dict], params) -> list[dict]:
    """Mark the DDPM's unlabeled training set and add augmented normal copies (in place + new)."""
    cfg = params.data
    normals = [it for it in items if it["split"] == "train" and it["label"] == "normal"]
    pool = [it for it in items if it["split"] == "train" and it["label"] == "anomalous"]
    for it in items:
        it["ddpm_train"] = int(it["split"] == "train" and it["label"] == "normal")
        it["augmented"] = 0
    k = contamination_count(len(normals), cfg.contamination)
    if k > len(pool):
        more = "synth.n_train_anomalous" if cfg.source == "synthetic" else "data.train_anomalous_fraction"
        raise DataError(f"data.contamination: {cfg.contamination} needs {k} anomalous training images beside "
                        f"the {len(normals)} normal ones, but there are only {len(pool)}; lower "
                        f"data.contamination or raise {more}")
    rng = np.random.default_rng([params.seed, _CONTAMINATION_STREAM])
    for i in rng.choice(len(pool), size=k, replace=False):
        pool[i]["ddpm_train"] = 1

    copies = []
    if cfg.augment.balance and len(pool) > len(normals) and normals:
        rng = np.random.default_rng([params.seed, _AUGMENT_STREAM])
        order = rng.permutation(len(normals))
        for j in range(len(pool) - len(normals)):
            base = normals[order[j % len(normals)]]
            image = augment(base["image"], rng, cfg.augment)
            copies.append(dict(base, name=f"{base['name']}_aug{j:04d}", image=image, mask=None,
                               ddpm_train=0, augmented=1))
    return items + copies


# ---------------------------------------------------------------- prepare
def prepare(params, out_dir, warn=_stderr) -> pd.DataFrame:
    """Read `data.source`, split, mix, augment; write images/, masks/ and manifest.csv under
    `out_dir` (the stage passes a temp folder from io.atomic_dir). Returns the manifest."""
    items = _mix_and_balance(read_source(params, warn), params)
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
        rows.append(dict(path=path, split=it["split"], label=it["label"], defect=it["defect"], mask=mask,
                         ddpm_train=it["ddpm_train"], augmented=it["augmented"], source=it["source"]))
    manifest = pd.DataFrame(rows, columns=COLUMNS)
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
    prepared_dir = Path(prepared_dir)
    paths = [prepared_dir / p for p in rows["path"]]
    if size is None:
        size = io.image_size_of(paths[0])[0] if paths else 0
    if not paths:
        return torch.zeros((0, channels, size, size))
    return torch.stack([io.read_image(p, size, channels) for p in paths])


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


def load_split(prepared_dir, split: str, size: int, channels: int, **filters):
    """(images (N,C,H,W) in [-1,1], masks (N,1,H,W) float in {0,1} or None, rows) of one split."""
    rows = load_rows(prepared_dir, split=split, **filters)
    images = load_images(prepared_dir, rows, channels, size)
    masks = load_masks(prepared_dir, rows, size)
    if masks is not None:
        masks = torch.from_numpy(masks).float()[:, None]
    return images, masks, rows


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
