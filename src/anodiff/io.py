"""All disk access of the library: images, masks, JSON/CSV, checkpoints, atomic writes.

Every output is written to a temporary name beside its target and renamed into place, so a
crash or a bad input never leaves a half-written file or folder behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from glob import escape as glob_escape
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from anodiff.errors import BadImageError, CheckpointError

if TYPE_CHECKING:
    import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


# ---------------------------------------------------------------- atomic writes
def _remove_orphans(path: Path) -> None:
    """Remove the temp files or folders of `path` left by a writer that was killed (SIGKILL skips
    cleanup): `.<name>.<pid>.<random>.tmp` whose pid no longer runs."""
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: is it alive?
        except ProcessLookupError:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        except PermissionError:  # alive, another user's
            pass


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Open a temp file beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's file is 0600: give it the mode open() would
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a fresh temp folder beside `path`; on success it replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's folder is 0700: give it the mode mkdir would
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path, obj) -> None:
    with atomic_write(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, allow_nan=False)
        fh.write("\n")


def read_json(path):
    return json.loads(Path(path).read_text())


def read_artefact(path, reader):
    """`reader(path)` for a file a stage wrote (JSON; `load_npz` for arrays); a damaged file is
    one CheckpointError line naming it, whatever json, numpy or zipfile raised."""
    try:
        return reader(path)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: unreadable ({first})") from None


def write_csv(path, frame: pd.DataFrame) -> None:
    with atomic_write(path, "w") as fh:
        frame.to_csv(fh, index=False, lineterminator="\n")


def read_csv(path) -> pd.DataFrame:
    # keep_default_na=False: an empty mask cell stays "" rather than NaN
    return pd.read_csv(path, keep_default_na=False)


def write_text(path, text: str) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(text)


# ---------------------------------------------------------------- images
def list_images(folder) -> list[Path]:
    """Image files directly in `folder`, sorted by name (hidden files skipped)."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def list_files(folder) -> list[Path]:
    """Every visible file in `folder` (images or not), for reporting non-images."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))


def list_dirs(folder) -> list[str]:
    """Names of the visible subfolders of `folder`, sorted."""
    return sorted(p.name for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith("."))


def _open(path) -> Image.Image:
    """Open and fully decode an image; any failure becomes BadImageError naming the file."""
    path = Path(path)
    if not path.exists():
        raise BadImageError(path, "file not found")
    if path.stat().st_size == 0:
        raise BadImageError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            img.load()  # forces decoding: a truncated file fails here, not later
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image file") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        raise BadImageError(path, f"cannot be decoded ({exc})") from None
    return img


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Grayscale, RGB(A), palette or 16-bit -> 8-bit 'L' (channels=1) or 'RGB' (channels=3)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit: scale by the type's range (not by the image's own max, which would
        # change the brightness of every image differently)
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I") else max(1.0, float(arr.max()))
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("L" if channels == 1 else "RGB")


def load_image_uint8(path, size: int, channels: int) -> np.ndarray:
    """(size, size, channels) uint8, resized with bicubic antialiasing."""
    return load_image_with_size(path, size, channels)[0]


def load_image_with_size(path, size: int, channels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """`load_image_uint8` plus the file's original (width, height), from one decode."""
    img = _open(path)
    original = img.size
    img = to_mode(img, channels)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    return (arr[:, :, None] if arr.ndim == 2 else arr), original


def uint8_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(H, W, C) uint8 -> (C, H, W) float32 in [-1, 1]."""
    import torch  # here, not at the top: reading maps and metrics needs no torch (500 MB)

    # np.array copies: arrays from PIL are read-only, which torch.from_numpy warns about
    return torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W, C) uint8."""
    import torch  # here, not at the top: reading maps and metrics needs no torch (500 MB)

    x = ((x.detach().cpu().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 0).numpy()


def read_image(path, size: int, channels: int) -> torch.Tensor:
    """(channels, size, size) float32 tensor in [-1, 1]."""
    return uint8_to_tensor(load_image_uint8(path, size, channels))


def image_size_of(path) -> tuple[int, int]:
    return _open(path).size


def read_mask(path, size: int) -> np.ndarray:
    """(size, size) uint8 in {0, 1}; any non-zero pixel is defect. Nearest resize keeps it binary."""
    return read_mask_with_size(path, size)[0]


def read_mask_with_size(path, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """`read_mask` plus the file's original (width, height), from one decode."""
    img = _open(path)
    original = img.size
    arr = np.asarray(to_mode(img, 1), dtype=np.uint8)
    img = Image.fromarray((arr > 0).astype(np.uint8) * 255, "L")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.NEAREST)
    return (np.asarray(img) > 127).astype(np.uint8), original


def write_png(path, arr: np.ndarray) -> None:
    """Write an (H, W), (H, W, 1) or (H, W, 3) uint8 array as PNG, atomically."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    with atomic_write(path, "wb") as fh:
        # optimize=False, no timestamps: the same array always gives the same bytes
        Image.fromarray(arr).save(fh, format="PNG")


# ---------------------------------------------------------------- arrays and checkpoints
def save_npz(path, **arrays) -> None:
    with atomic_write(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def load_npz(path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def save_checkpoint(path, obj: dict) -> None:
    """torch.save to a temp file, then rename: the previous checkpoint survives any failure."""
    import torch  # here, not at the top: reading maps and metrics needs no torch (500 MB)

    with atomic_write(path, "wb") as fh:
        torch.save(obj, fh)


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint with weights_only=True (no pickled code runs)."""
    import torch  # here, not at the top: reading maps and metrics needs no torch (500 MB)

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint is empty (0 bytes)")
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:  # a folder, no permission
        raise CheckpointError(f"{path}: checkpoint cannot be read ({exc.strerror or type(exc).__name__})") from None
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip, or a legacy pickle
        raise CheckpointError(f"{path}: not a readable checkpoint (not a PyTorch file)")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning would be a second line
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        text = str(exc).strip()
        first = text.splitlines()[0].split(". ")[0] if text else type(exc).__name__
        if "Weights only load failed" in text:
            # torch's advice here (retry with weights_only=False) would run pickled code from
            # a file that is, for anodiff, corrupt or foreign: say that instead
            found = re.search(r"GLOBAL ([\w.]+)", text)
            first = (f"refused: it asks to call {found[1]}, and anodiff checkpoints hold only tensors and plain "
                     f"values; nothing in it was run" if found else "corrupt, truncated, or not written by anodiff")
        raise CheckpointError(f"{path}: not a readable checkpoint ({first})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not an anodiff checkpoint (no dict at top level)")
    return obj
