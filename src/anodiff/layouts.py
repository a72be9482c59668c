"""Source folder -> records: which image goes to which split, with which label and mask.

Path discovery only: files are listed here (through io.py) but opened by data.py.
Layouts (README, "Your own images") and how each forms its splits, all stratified per class and drawn
from `seed` over sorted file lists:
- `mvtec`: train/good -> train normal. Of each defect's test images, a
  `train_anomalous_fraction` share becomes train anomalous (the GAN's labelled side
  and the contamination pool; never evaluated on); the rest of the test set, good images
  included, is split `val_fraction` -> val, the remainder -> test.
- `marble`: a `val_fraction` share of each train/<class> folder -> val, the rest ->
  train; test/ -> test. Classes from `marble_normal` / `marble_anomalous`, other
  folders are left out. Image-level labels only: no masks.
- `folder`: normal/ -> `val_fraction` val, `val_fraction` test, the rest train;
  anomalous/ (optional: a folder of normal images alone is a normal-only source) ->
  `train_anomalous_fraction` train, the rest split `val_fraction` val / test.
  masks/<stem>*.png (optional; when the folder exists, every anomalous image needs one).
An mvtec folder whose test/ holds only good/ is normal-only too (see README, "Your own images":
thresholds then come from normal val images, and the GAN branch is skipped).
Every file lands in exactly one split, so nothing is both trained on and evaluated on.
Problems are collected, not raised: data.py reports them all at once.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anodiff import io
from anodiff.errors import DataError

# stream of the seeded numpy generator for splits (data.py uses 202 and 303 for the others)
_SPLIT_STREAM = 101


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


def read_mvtec(root: Path, seed: int, *, val_fraction: float,
               train_anomalous_fraction: float) -> tuple[list[Record], list[Problem]]:
    problems: list[Problem] = []
    records = [Record(p, "train", "normal", "good") for p in _class_files(root / "train" / "good", problems)]
    test = root / "test"
    if not test.is_dir():
        problems.append(Problem(test, "missing folder", False))
        return records, problems
    defects = io.list_dirs(test)
    if "good" not in defects:
        problems.append(Problem(test / "good", "missing folder", False))
    for defect in defects:
        rng = _class_rng(seed, "test", defect)
        files = _class_files(test / defect, problems)
        if defect == "good":
            val, rest = _split_held_out(files, rng, val_fraction)
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
        n_train = _half_up(train_anomalous_fraction * len(files))
        val, rest = _split_held_out(sorted(files[n_train:]), rng, val_fraction)
        for split, part in (("train", files[:n_train]), ("val", val), ("test", rest)):
            records += [Record(p, split, "anomalous", defect, masks.get(p)) for p in part]
    return records, problems


def read_marble(root: Path, seed: int, *, val_fraction: float, marble_normal: tuple[str, ...],
                marble_anomalous: tuple[str, ...]) -> tuple[list[Record], list[Problem]]:
    both = set(marble_normal) & set(marble_anomalous)
    if both:
        raise DataError(f"data.marble_normal and data.marble_anomalous both list {sorted(both)}")
    problems: list[Problem] = []
    records: list[Record] = []
    classes = [(c, "normal") for c in marble_normal] + [(c, "anomalous") for c in marble_anomalous]
    for part in ("train", "test"):
        if not (root / part).is_dir():
            problems.append(Problem(root / part, "missing folder", False))
            continue
        for cls, label in sorted(classes):
            files = _class_files(root / part / cls, problems)
            if part == "test":
                records += [Record(p, "test", label, cls) for p in files]
            else:
                val, train = _split_held_out(files, _class_rng(seed, part, cls), val_fraction)
                records += [Record(p, "val", label, cls) for p in val]
                records += [Record(p, "train", label, cls) for p in train]
    return records, problems


def _mask_for(image: Path, masks: list[Path]) -> list[Path]:
    """Masks named <stem>.ext or <stem><_-.>anything.ext (img1 does not match img10_mask)."""
    s = image.stem
    return [m for m in masks if m.stem == s or (m.stem.startswith(s) and m.stem[len(s)] in "_-.")]


def read_folder(root: Path, seed: int, *, val_fraction: float,
                train_anomalous_fraction: float) -> tuple[list[Record], list[Problem]]:
    problems: list[Problem] = []
    records: list[Record] = []
    normal = _shuffled(_class_files(root / "normal", problems), _class_rng(seed, "normal"))
    n_val = n_test = _half_up(val_fraction * len(normal))
    if normal and len(normal) - n_val - n_test < 1:
        raise DataError(f"{root / 'normal'}: {len(normal)} normal images leave none for training after "
                        f"data.val_fraction={val_fraction} for val and again for test")
    records += [Record(p, "val", "normal", "good") for p in normal[:n_val]]
    records += [Record(p, "test", "normal", "good") for p in normal[n_val:n_val + n_test]]
    records += [Record(p, "train", "normal", "good") for p in normal[n_val + n_test:]]

    # normal-only: no anomalous/ folder (or an empty one) is fine; a file there is still checked
    anomalous = (_class_files(root / "anomalous", problems)
                 if (root / "anomalous").is_dir() and io.list_files(root / "anomalous") else [])
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
    n_train = _half_up(train_anomalous_fraction * len(anomalous))
    val, test = _split_held_out(sorted(anomalous[n_train:]), rng, val_fraction)
    for split, part in (("train", anomalous[:n_train]), ("val", val), ("test", test)):
        records += [Record(p, split, "anomalous", "anomalous", masks.get(p)) for p in part]
    return records, problems


def detect_layout(root: Path) -> str:
    """mvtec, marble or folder from the subfolders of `root`; DataError when none fits."""
    if not root.exists():
        raise DataError(f"data.source: {root}: folder not found")
    if not root.is_dir():
        raise DataError(f"data.source: {root}: not a folder")
    subdirs = io.list_dirs(root)
    if "ground_truth" in subdirs:
        return "mvtec"
    if "train" in subdirs and "test" in subdirs:
        # both have train/good and test/good; only marble has other classes under train/
        return "marble" if set(io.list_dirs(root / "train")) - {"good"} else "mvtec"
    if "normal" in subdirs or "anomalous" in subdirs:
        return "folder"
    raise DataError(
        f"data.source: {root}: cannot recognise the layout (data.layout: auto); found "
        f"{'subfolders ' + ', '.join(subdirs) if subdirs else 'no subfolders'}; expected train/, test/, "
        f"ground_truth/ (mvtec), train/ and test/ with good/crack/dot/joint (marble), or normal/ and "
        f"anomalous/ (folder)")


def read_layout(root, layout: str, seed: int, *, val_fraction: float, train_anomalous_fraction: float,
                marble_normal: tuple[str, ...], marble_anomalous: tuple[str, ...],
                ) -> tuple[list[Record], list[Problem]]:
    """Records of every image of a source folder, and the problems found on the way."""
    root = Path(root)
    if layout == "auto":
        layout = detect_layout(root)
    elif not root.is_dir():
        raise DataError(f"data.source: {root}: folder not found")
    if layout == "marble":
        return read_marble(root, seed, val_fraction=val_fraction, marble_normal=marble_normal,
                           marble_anomalous=marble_anomalous)
    read = {"mvtec": read_mvtec, "folder": read_folder}[layout]
    return read(root, seed, val_fraction=val_fraction, train_anomalous_fraction=train_anomalous_fraction)
