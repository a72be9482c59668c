"""The data builder of the real-photo categories: real photographs with synthetic defects, in the MVTec-AD layout.

    python experiments/data/realphoto_data.py OUT_DIR [--categories tissue moon] [--seed 0] [--preview]

bench/realphoto.py (the benchmark) and experiments/grid.py (`--category`) build their data with it.

Sources (shipped inside installed packages, nothing downloaded): tissue, moon (grayscale) and
hubble from skimage.data; terrain = matplotlib's Jacksboro fault DEM as a LightSource hillshade.

Regions: each photo is split along one axis into a TRAIN box and a TEST box, a tile width apart;
train gets 60 % of the length left after the gap (`regions`). The axis is chosen per photo so
that test shows the same kinds of content as train (terrain: top/bottom, its halves differ in
colour). Tiles are native-resolution crops at seeded random positions inside their box.

Defects (`make_defect`), sizes and contrasts drawn log-uniformly so faint and small ones are
common: stain (soft irregular blob, brightness or colour), hole (dark/bright spot, shaded rim),
scratch (1-3 px jagged or curved polyline), patch (another category's texture in an irregular
blob), smooth (blend towards a heavy blur or the region's mean), warp (swirl, bulge/pinch or
fold via map_coordinates), hair (long thin Bezier curve).

Exact masks: a family returns a float result and its support (non-zero weight/displacement).
After rounding, mask = changed pixels in the support, closed and hole-filled within it; pixels
outside the mask are copied from the clean tile, so they are bit-identical. A draw is redrawn
(after repeated failures, on a new tile) unless >= 4 pixels change by >= 6 grey levels and at
least half the mask changed.

Reproducibility: all randomness from np.random.default_rng([seed, category index, stream, ...])
(streams: train tiles, good test tiles, one per defect family), so the same arguments give
byte-identical PNGs. A category is built in a hidden folder and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

CATEGORIES: tuple[str, ...] = ("tissue", "moon", "hubble", "terrain")
DEFECTS: tuple[str, ...] = ("stain", "hole", "scratch", "patch", "smooth", "warp", "hair")
SPLIT_AXIS = {"tissue": 1, "moon": 1, "hubble": 1, "terrain": 0}  # 1: left/right, 0: top/bottom
TRAIN_FRACTION = 0.6
MIN_PIXELS = 4  # a defect changes at least this many pixels ...
FAINTEST = 6  # ... by at least this many grey levels (in some channel)
MEAN_CHANGE = 10.0  # and the mean change over the mask is at least this many grey levels ...
RELATIVE_CHANGE = 0.5  # ... and at least this share of the local texture's standard deviation
MASK_CHANGE = 3  # the mask holds the pixels changed by at least this many grey levels (hole-filled)


class DefectFailed(RuntimeError):
    """No visible defect of this family could be drawn on this tile (e.g. a flat black tile)."""


# ----------------------------------------------------------------------------- sources
_SKIMAGE = {"tissue": "immunohistochemistry", "moon": "moon", "hubble": "hubble_deep_field"}


@functools.lru_cache(maxsize=None)
def _photo(category: str) -> np.ndarray:
    import skimage.data

    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; choose from {CATEGORIES}")
    img = _hillshade() if category == "terrain" else getattr(skimage.data, _SKIMAGE[category])()
    img = np.ascontiguousarray(img, dtype=np.uint8)
    img.setflags(write=False)
    return img


def _hillshade() -> np.ndarray:
    import matplotlib
    from matplotlib.colors import LightSource

    with np.load(Path(matplotlib.get_data_path()) / "sample_data" / "jacksboro_fault_dem.npz") as dem:
        z = dem["elevation"].astype(np.float64)
        dy = 111200 * float(dem["dy"])  # degrees -> metres, as in matplotlib's shading example
        dx = 111200 * float(dem["dx"]) * np.cos(np.radians(float(dem["ymin"])))
    rgba = LightSource(azdeg=315, altdeg=45).shade(
        z, cmap=matplotlib.colormaps["gist_earth"], blend_mode="overlay", vert_exag=1, dx=dx, dy=dy)
    return np.rint(rgba[..., :3] * 255).astype(np.uint8)


def load_photo(category: str) -> np.ndarray:
    """The source photograph, uint8 HxWx3 (or HxW for moon)."""
    return _photo(category).copy()


def regions(photo_shape, tile: int, axis: int = 1):
    """(train_box, test_box) as (row0, row1, col0, col1), half-open, split along `axis`
    (1: train left, test right; 0: train top, test bottom) with a gap of `tile` pixels."""
    h, w = photo_shape[:2]
    length, across = (w, h) if axis == 1 else (h, w)
    n_train = int(round(TRAIN_FRACTION * (length - tile)))
    test0 = n_train + tile
    if across < tile or n_train < tile or length - test0 < tile:
        raise ValueError(f"photo {h}x{w} too small for train/gap/test of {tile}-px tiles")
    if axis == 1:
        return (0, h, 0, n_train), (0, h, test0, w)
    return (0, n_train, 0, w), (test0, h, 0, w)


def _cut(photo, box, tile, rng):
    r0, r1, c0, c1 = box
    r, c = int(rng.integers(r0, r1 - tile + 1)), int(rng.integers(c0, c1 - tile + 1))
    return photo[r:r + tile, c:c + tile].copy()


# ----------------------------------------------------------------------------- shapes
def _logu(rng, lo, hi):
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _polar(s, rng):
    """Offsets, distance and angle of every pixel from a random centre inside the tile."""
    cy, cx = rng.uniform(0, s - 1, 2)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    return dy, dx, np.hypot(dy, dx), np.arctan2(dy, dx)


def _wobble(rng, phi, amount):
    """Irregular outline factor: a few random angular harmonics around 1."""
    k = np.arange(2, 6)
    amp, phase = rng.uniform(0, amount, 4) / k, rng.uniform(0, 2 * np.pi, 4)
    return 1 + (amp[:, None, None] * np.cos(k[:, None, None] * phi + phase[:, None, None])).sum(0)


def _blob(s, rng, diameter):
    """Irregular soft-edged blob: weight 1 inside, 0 beyond a finite outline."""
    dy, dx, _, _ = _polar(s, rng)
    theta, aspect = rng.uniform(0, np.pi), rng.uniform(0.5, 1.0)
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / aspect
    rad = diameter / 2 * _wobble(rng, np.arctan2(v, u), 0.5)
    soft = rng.uniform(1.0, max(1.0, 0.5 * diameter / 2))
    return _smoothstep((rad - np.hypot(u, v)) / soft + 0.5)


def _line_weight(s, pts, width):
    """Anti-aliased weight of a polyline `width` px wide (pts: (n, 2) as (row, col))."""
    yy, xx = np.mgrid[0:s, 0:s]
    p = np.stack([yy.ravel(), xx.ravel()], 1).astype(np.float64)
    d = np.full(len(p), np.inf)
    for i in range(0, len(pts) - 1, 16):  # 16 segments at a time to bound memory
        a, b = pts[:-1][i:i + 16], pts[1:][i:i + 16]
        ab = b - a
        t = ((p[:, None] - a[None]) * ab[None]).sum(2) / np.maximum((ab ** 2).sum(1), 1e-12)
        near = a[None] + np.clip(t, 0, 1)[..., None] * ab[None]
        d = np.minimum(d, np.sqrt(((p[:, None] - near) ** 2).sum(2)).min(1))
    return np.clip(width / 2 + 0.5 - d, 0, 1).reshape(s, s)


def _signed(rng, lo, hi, p_dark):
    return _logu(rng, lo, hi) * (-1 if rng.random() < p_dark else 1)


# ----------------------------------------------------------------------------- families
# Each takes f (float HxWxC, 0..255), rng and the foreign photos; returns (result, support).
def _stain(f, rng, foreign):
    s, c = f.shape[0], f.shape[2]
    w = _blob(s, rng, _logu(rng, 3, 0.4 * s))[..., None]
    amp = _signed(rng, 6, 80, 0.5)
    mode = rng.integers(3)
    if mode == 0:  # brightness, additive
        target = f + amp
    elif mode == 1:  # brightness, multiplicative
        target = f * (1 + amp / 128)
    else:  # colour shift (brightness for grayscale)
        direction = rng.normal(size=c) if c > 1 else np.ones(1)
        target = f + amp * direction / np.abs(direction).max()
    return f + w * (target - f), w[..., 0] > 0


def _hole(f, rng, foreign):
    s = f.shape[0]
    r = _logu(rng, 3, 0.4 * s) / 2
    _, _, dist, phi = _polar(s, rng)
    edge = r * _wobble(rng, phi, 0.3)
    inner = _smoothstep((edge - dist) / rng.uniform(0.7, max(0.7, r / 3)) + 0.5)
    rim_w = max(1.0, r * rng.uniform(0.2, 0.5))
    ring = _smoothstep(1 - np.abs(dist - edge) / rim_w)
    amp = _signed(rng, 6, 150, 0.75)  # dark hole mostly, sometimes a bright poke
    level = np.clip(f.mean((0, 1)) + amp, 0, 255)
    fill = rng.uniform(0.5, 1.0)  # how much of the texture inside is lost
    shade = np.cos(phi - rng.uniform(0, 2 * np.pi)) * abs(amp) * rng.uniform(0.3, 0.8)
    out = f + (inner * fill)[..., None] * (level - f) + (ring * shade)[..., None]
    return out, (inner > 0) | (ring > 0)


def _scratch(f, rng, foreign):
    s = f.shape[0]
    n = int(rng.integers(2, 12))
    step = s * _logu(rng, 0.15, 1.2) / n
    angle = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(rng.normal(0, 0.1), rng.uniform(0, 0.6), n))
    pts = rng.uniform(0, s - 1, 2) + np.concatenate([[[0, 0]], np.cumsum(
        step * np.stack([np.sin(angle), np.cos(angle)], 1), 0)])
    w = _line_weight(s, pts, rng.uniform(1, 3))
    return f + (w * _signed(rng, 6, 120, 0.7))[..., None], w > 0


def _patch(f, rng, foreign):
    s, c = f.shape[0], f.shape[2]
    src = foreign[int(rng.integers(len(foreign)))]
    size = min(int(round(s * _logu(rng, 0.5, 2.0))), *src.shape[:2])
    r, q = int(rng.integers(0, src.shape[0] - size + 1)), int(rng.integers(0, src.shape[1] - size + 1))
    crop = Image.fromarray(src[r:r + size, q:q + size]).resize((s, s), Image.Resampling.BILINEAR)
    crop = np.rot90(np.asarray(crop, np.float64), int(rng.integers(4)))
    crop = crop[:, ::-1] if rng.random() < 0.5 else crop
    if crop.ndim == 2:
        crop = np.repeat(crop[..., None], c, 2)
    elif c == 1:
        crop = crop @ np.array([0.299, 0.587, 0.114])[:, None]
    crop = crop + rng.uniform(0, 1) * (f.mean((0, 1)) - crop.mean((0, 1)))  # partly match colour
    w = _blob(s, rng, _logu(rng, 6, 0.45 * s)) * rng.uniform(0.35, 1.0)
    return f + w[..., None] * (crop - f), w > 0


def _smooth(f, rng, foreign):
    s = f.shape[0]
    w = _blob(s, rng, _logu(rng, 6, 0.45 * s))
    if rng.random() < 0.6:
        sigma = rng.uniform(1.5, 6)
        target = ndimage.gaussian_filter(f, (sigma, sigma, 0), mode="reflect")
    else:  # the region's own mean colour
        target = (f * w[..., None]).sum((0, 1)) / w.sum() * np.ones_like(f)
    w = w * rng.uniform(0.6, 1.0)
    return f + w[..., None] * (target - f), w > 0


def _warp(f, rng, foreign):
    s = f.shape[0]
    radius = _logu(rng, 10, 0.5 * s) / 2
    dy, dx, dist, _ = _polar(s, rng)
    win = _smoothstep(1 - dist / radius)
    kind = rng.integers(3)
    if kind == 0:  # swirl: rotate by an angle that fades out towards the rim
        a = win * rng.uniform(0.5, 3.0) * rng.choice([-1, 1])
        sy, sx = dy * np.cos(a) + dx * np.sin(a), -dy * np.sin(a) + dx * np.cos(a)
    elif kind == 1:  # bulge (k > 0) or pinch (k < 0)
        k = rng.uniform(0.25, 0.6) * rng.choice([-1, 1])
        sy, sx = dy * (1 - k * win), dx * (1 - k * win)
    else:  # fold: a smooth slide along one direction, compressing texture on one side
        t = rng.uniform(0, 2 * np.pi)
        shift = win * rng.uniform(1.5, max(1.5, radius / 2)) * rng.choice([-1, 1])
        sy, sx = dy + shift * np.sin(t), dx + shift * np.cos(t)
    yy, xx = np.mgrid[0:s, 0:s]
    coords = [yy - dy + sy, xx - dx + sx]  # centre + displaced offsets
    out = np.stack([ndimage.map_coordinates(f[..., i], coords, order=1, mode="reflect")
                    for i in range(f.shape[2])], -1)
    return out, win > 0


def _hair(f, rng, foreign):
    s = f.shape[0]
    length = s * rng.uniform(0.6, 1.8)
    t = rng.uniform(0, 2 * np.pi)
    along, across = np.array([np.sin(t), np.cos(t)]), np.array([np.cos(t), -np.sin(t)])
    centre = rng.uniform(0, s - 1, 2)
    ctrl = [centre + along * length * a + across * length * rng.normal(0, 0.25 if 0 < i < 3 else 0.05)
            for i, a in enumerate((-0.5, -1 / 6, 1 / 6, 0.5))]
    u = np.linspace(0, 1, 48)[:, None]
    pts = ((1 - u) ** 3 * ctrl[0] + 3 * (1 - u) ** 2 * u * ctrl[1]
           + 3 * (1 - u) * u ** 2 * ctrl[2] + u ** 3 * ctrl[3])
    w = _line_weight(s, pts, rng.uniform(0.7, 1.6))
    return f + (w * _signed(rng, 6, 60, 0.65))[..., None], w > 0


_FAMILIES = {"stain": _stain, "hole": _hole, "scratch": _scratch, "patch": _patch,
             "smooth": _smooth, "warp": _warp, "hair": _hair}


def make_defect(tile: np.ndarray, family: str, rng: np.random.Generator, foreign=None, tries: int = 50):
    """(defective uint8 tile, bool mask) for one defect of `family` drawn from `rng`.

    Pixels outside the mask are bit-identical to `tile`. `foreign`: photos for `patch`
    (default: all categories' photos). Raises DefectFailed if `tries` draws all came out
    invisible (fewer than MIN_PIXELS pixels changed by FAINTEST grey levels, or under half
    the mask changed)."""
    clean = np.asarray(tile, dtype=np.uint8)
    f = clean.astype(np.float64)
    f = f[..., None] if f.ndim == 2 else f
    foreign = [_photo(c) for c in CATEGORIES] if foreign is None else foreign
    for _ in range(tries):
        result, support = _FAMILIES[family](f, rng, foreign)
        out = np.clip(np.rint(result), 0, 255).astype(np.uint8).reshape(clean.shape)
        change = np.abs(out.astype(np.int16) - clean).reshape(f.shape).max(-1) * support
        core = change >= MASK_CHANGE
        if not core.any():
            continue
        closed = ndimage.binary_fill_holes(ndimage.binary_closing(core, np.ones((3, 3), bool)))
        mask = core | (closed & support)
        # visible to a person: a clear mean change, and at least half the local texture's own
        # spread (a stain of 6 grey levels on a busy texture, or a warp of empty sky, is not)
        around = ndimage.binary_dilation(mask, iterations=4)
        texture = f[around].std(axis=0).max()
        floor = max(MEAN_CHANGE, RELATIVE_CHANGE * texture)
        visible = (change >= FAINTEST).sum() >= MIN_PIXELS and change[mask].mean() >= floor
        if visible and core.sum() >= 0.5 * mask.sum():
            return np.where(mask.reshape(mask.shape + (1,) * (clean.ndim - 2)), out, clean), mask
    raise DefectFailed(f"no visible {family} after {tries} draws")


# ----------------------------------------------------------------------------- output
def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def build_category(category: str, root: Path, seed: int = 0, tile: int = 64, n_train: int = 160,
                   n_test_good: int = 48, n_per_defect: int = 20) -> Path:
    """Write <root>/<category>/{train/good, test/<good|defect>, ground_truth/<defect>}."""
    index = CATEGORIES.index(category)
    photo = _photo(category)
    train_box, test_box = regions(photo.shape, tile, SPLIT_AXIS[category])
    foreign = [_photo(c) for c in CATEGORIES if c != category]
    root = Path(root)
    final, tmp = root / category, root / f".{category}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        rng = np.random.default_rng([seed, index, 0])
        for i in range(n_train):
            _save(tmp / "train" / "good" / f"{i:04d}.png", _cut(photo, train_box, tile, rng))
        rng = np.random.default_rng([seed, index, 1])
        for i in range(n_test_good):
            _save(tmp / "test" / "good" / f"{i:04d}.png", _cut(photo, test_box, tile, rng))
        for d, defect in enumerate(DEFECTS):
            rng = np.random.default_rng([seed, index, 2, d])
            for i in range(n_per_defect):
                for _ in range(100):  # a new tile when this one cannot show the defect
                    try:
                        clean = _cut(photo, test_box, tile, rng)
                        bad, mask = make_defect(clean, defect, rng, foreign, tries=20)
                        break
                    except DefectFailed:
                        continue
                else:
                    raise DefectFailed(f"{category}: no tile shows a visible {defect}")
                _save(tmp / "test" / defect / f"{i:04d}.png", bad)
                _save(tmp / "ground_truth" / defect / f"{i:04d}_mask.png", mask.astype(np.uint8) * 255)
        old = root / f".{category}.old-{os.getpid()}"
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def preview(root: Path, category: str, out_png: Path, per_defect: int = 2) -> None:
    """A grid: train tiles, good test tiles, then per defect `per_defect` examples, each shown
    plain and with its mask contour in red."""
    from matplotlib.figure import Figure

    base, ncols = Path(root) / category, 2 * per_defect
    rows = [("train", [(p, None) for p in sorted((base / "train" / "good").glob("*.png"))[:ncols]]),
            ("test good", [(p, None) for p in sorted((base / "test" / "good").glob("*.png"))[:ncols]])]
    for defect in DEFECTS:
        files = sorted((base / "test" / defect).glob("*.png"))[:per_defect]
        masks = [base / "ground_truth" / defect / f"{p.stem}_mask.png" for p in files]
        rows.append((defect, [x for p, m in zip(files, masks) for x in ((p, None), (p, m))]))
    fig = Figure(figsize=(1.7 * ncols, 1.7 * len(rows)), dpi=100)
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for (label, cells), row in zip(rows, axes):
        row[0].set_ylabel(label)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
        for ax, (p, m) in zip(row, cells):
            img = _read(p)
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
            if m is not None:
                ax.contour(_read(m) > 0, levels=[0.5], colors="red", linewidths=0.8)
    fig.suptitle(f"{category} (left: defect, right: mask contour)")
    fig.tight_layout()
    fig.savefig(out_png)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--categories", nargs="+", choices=CATEGORIES, default=list(CATEGORIES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--n-train", type=int, default=160)
    ap.add_argument("--n-test-good", type=int, default=48)
    ap.add_argument("--n-per-defect", type=int, default=20)
    ap.add_argument("--preview", action="store_true", help="also write OUT_DIR/<category>_preview.png")
    args = ap.parse_args(argv)
    for category in args.categories:
        path = build_category(category, args.out_dir, args.seed, args.tile, args.n_train,
                              args.n_test_good, args.n_per_defect)
        print(f"wrote {path}")
        if args.preview:
            preview(args.out_dir, category, args.out_dir / f"{category}_preview.png")


if __name__ == "__main__":
    main()
