"""The figures: sample grids, map overlays, image-score histograms, predict's per-image figure.

Sample grids with mask outlines, anomaly-map overlays (the true defect outlined in red, the
predicted region filled in cyan), image-score histograms (plots/), and `anodiff predict`'s figure
of one image."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display: figures go straight to files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from anodiff import io

RED = np.array([255, 0, 0], np.uint8)
CYAN = np.array([0, 200, 255], np.uint8)


def outline(image: np.ndarray, mask: np.ndarray | None, scale: int = 1) -> np.ndarray:
    """(H*scale, W*scale, 3) uint8: the image enlarged (nearest), the mask's edge drawn in red
    just outside the defect, so the defect's own pixels stay visible."""
    image = np.asarray(image, np.uint8)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    big = image.repeat(scale, 0).repeat(scale, 1).copy()
    if mask is not None and np.any(mask):
        m = np.asarray(mask, bool).repeat(scale, 0).repeat(scale, 1)
        edge = ndimage.binary_dilation(m) & ~m
        if not edge.any():  # a mask that fills the image: mark its inner border instead
            edge = m & ~ndimage.binary_erosion(m)
        big[edge] = RED
    return big


def sample_grid(images_uint8, masks, labels, path, ncol: int = 8) -> None:
    """A PNG grid: one row per distinct label (in order of first appearance), up to `ncol`
    images each, mask outlines in red, the label written at the row's left.

    images_uint8: sequence of (H, W, C) uint8; masks: sequence of (H, W) arrays or None
    (or None for all); labels: one string per image.
    """
    if masks is None:
        masks = [None] * len(images_uint8)
    size = images_uint8[0].shape[0]
    scale = max(1, 128 // size)
    rows: dict[str, list] = {}
    for img, m, lab in zip(images_uint8, masks, labels):
        row = rows.setdefault(lab, [])
        if len(row) < ncol:
            row.append(outline(img, m, scale))
    tile = size * scale
    pad = 2
    width = max(len(row) for row in rows.values())
    blank = np.full((tile, tile, 3), 255, np.uint8)
    tiles = []
    for row in rows.values():
        tiles += row + [blank] * (width - len(row))
    # the tiles on a white canvas, `pad` px around each (torchvision's make_grid did this, but importing
    # torch cost the prepare stage 2.5 s of its 4)
    step = tile + pad
    grid = np.full((len(rows) * step + pad, width * step + pad, 3), 255, np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, width)
        grid[pad + r * step:pad + r * step + tile, pad + c * step:pad + c * step + tile] = t

    margin = 8 + 6 * max(len(lab) for lab in rows)  # the default bitmap font is ~6 px wide
    canvas = Image.new("RGB", (grid.shape[1] + margin, grid.shape[0]), "white")
    canvas.paste(Image.fromarray(np.ascontiguousarray(grid)), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for r, lab in enumerate(rows):
        draw.text((4, pad + r * (tile + pad) + tile // 2 - 6), lab, fill=(0, 0, 0))
    io.write_png(path, np.asarray(canvas))


def heat(amap: np.ndarray, vmin: float, vmax: float, cmap: str = "inferno") -> np.ndarray:
    """(H, W) map -> (H, W, 3) uint8 colours, scaled to [vmin, vmax]."""
    scaled = np.clip((np.asarray(amap, np.float64) - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    return (plt.get_cmap(cmap)(scaled)[..., :3] * 255).round().astype(np.uint8)


def blend(image: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    image = np.asarray(image, np.uint8)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return (image * (1 - alpha) + colours * alpha).round().astype(np.uint8)


def fill(image: np.ndarray, region: np.ndarray | None, alpha: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8: the image with `region` (H, W) tinted cyan (a prediction: a fill, so it is
    told apart at a glance from the true defect's red outline)."""
    image = np.asarray(image, np.uint8)
    if image.ndim == 2:
        image = image[..., None]
    out = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image.copy()
    if region is not None and np.any(region):
        r = np.asarray(region, bool)
        out[r] = (out[r] * (1 - alpha) + CYAN * alpha).round().astype(np.uint8)
    return out


def _panels(image, recon, amap, mask, threshold, vmin, vmax, scale):
    """input (true defect outlined) | reconstruction | heat map over the input | prediction
    filled, true defect outlined."""
    pred = None if threshold is None else np.asarray(amap) >= threshold
    over = blend(image, heat(amap, vmin, vmax))
    predicted = outline(fill(image, pred), mask, 1)
    return [outline(image, mask, scale), outline(recon, None, scale),
            over.repeat(scale, 0).repeat(scale, 1), predicted.repeat(scale, 0).repeat(scale, 1)]


def _save(fig, path) -> None:
    with io.atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100, metadata={"Software": None})  # same bytes every run
    plt.close(fig)


def write_overlay(path, image, recon, amap, threshold=None) -> None:
    """One image's input, reconstruction and heat-map overlay side by side (for predict)."""
    vmin, vmax = float(np.percentile(amap, 1)), float(np.max(amap))
    if threshold is not None:
        vmax = max(vmax, 2 * threshold)
    scale = max(1, 192 // image.shape[0])
    tiles = _panels(image, recon, amap, None, threshold, vmin, vmax, scale)
    sep = np.full((tiles[0].shape[0], 4, 3), 255, np.uint8)
    io.write_png(path, np.concatenate([tiles[0], sep, tiles[1], sep, tiles[2]], axis=1))


def placeholder(path, text: str) -> None:
    """A small figure that only says `text`: a declared plot of a method that did not run (skipped)."""
    fig, ax = plt.subplots(figsize=(6, 1.2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=8, wrap=True)
    _save(fig, path)


def score_histogram(scores, labels, threshold, path, title="") -> None:
    """Test image scores, normal against anomalous, as two histograms on shared bins, with the
    image threshold chosen on val marked: what an inspector's verdict rests on."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    fig, ax = plt.subplots(figsize=(5, 3))
    if scores.size:
        edges = np.histogram_bin_edges(np.append(scores, [] if threshold is None else [threshold]), bins=30)
        for lab, name, colour in ((0, "normal", "tab:blue"), (1, "anomalous", "tab:red")):
            part = scores[labels == lab]
            if part.size:
                ax.hist(part, bins=edges, alpha=0.6, color=colour, label=f"{name} ({part.size})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:.3g} (val)")
    ax.set_xlabel("image score")
    ax.set_ylabel("test images")
    ax.set_title(f"{title}: image scores on test", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def overlay_grid(images, recon, maps, masks, scores, labels, threshold, path, title="", n_best=4,
                 n_worst=4, n_normal=2) -> None:
    """Test images as columns: best-scored and worst-scored anomalous ones, and the normal
    images with the highest scores (false alarms); rows: input with the true defect outlined
    in red, reconstruction, heat map with the thresholded prediction outlined."""
    labels = np.asarray(labels)
    order = np.argsort(-np.asarray(scores), kind="stable")
    anomalous = [i for i in order if labels[i] == 1]
    normal = [i for i in order if labels[i] == 0]
    picks = [("best", i) for i in anomalous[:n_best]]
    picks += [("worst", i) for i in anomalous[::-1][:n_worst] if i not in anomalous[:n_best]]
    picks += [("normal", i) for i in normal[:n_normal]]
    if not picks:
        return placeholder(path, f"{title}: no test images")
    maps = np.asarray(maps)
    vmin = float(np.percentile(maps, 50))
    vmax = float(np.percentile(maps, 99.9))
    if threshold is not None:
        vmax = max(vmax, threshold * 1.5)
    fig, axes = plt.subplots(4, len(picks), figsize=(1.6 * len(picks), 6.8), squeeze=False)
    for col, (kind, i) in enumerate(picks):
        img = images[i] if isinstance(images[i], np.ndarray) else io.tensor_to_uint8(images[i])
        mask = None if masks is None else masks[i]
        tiles = _panels(img, recon[i], maps[i], mask, threshold, vmin, vmax, 1)
        for row, tile in enumerate(tiles):
            ax = axes[row, col]
            ax.imshow(tile, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, col].set_title(f"{kind}\nscore {scores[i]:.2f}", fontsize=7)
    for row, name in enumerate(["input + truth", "reconstruction", "anomaly map", "prediction + truth"]):
        axes[row, 0].set_ylabel(name, fontsize=7)
    fig.suptitle(f"{title}: test images (red outline = true defect, cyan fill = predicted region)", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def write_prediction(path, image, amap, mask=None, threshold=None, title: str = "") -> None:
    """One new image's prediction (for `anodiff predict`), at the image's own size: left, the
    image with the predicted region (`mask`) tinted cyan; right, the anomaly map `amap` as a heat
    map over the image with its colour bar (the pixel threshold marked on it), the predicted
    region outlined in cyan. image: (H, W, C) uint8; amap: (H, W); mask: (H, W) bool or None."""
    image = np.asarray(image, np.uint8)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    amap = np.asarray(amap, np.float64)
    h, w = amap.shape
    vmin, vmax = float(np.percentile(amap, 1)), float(np.max(amap))
    if threshold is not None:  # the threshold always on the colour bar
        vmin, vmax = min(vmin, float(threshold)), max(vmax, float(threshold))
    vmax = max(vmax, vmin + 1e-6)
    cyan = (0.0, 0.78, 1.0)
    gray = {"cmap": "gray", "vmin": 0, "vmax": 255} if image.ndim == 2 else {}
    interp = "nearest" if max(h, w) <= 256 else "antialiased"
    panel = 4.0  # inches of the longer side
    pw, ph = (panel, max(1.0, panel * h / w)) if w >= h else (max(1.0, panel * w / h), panel)
    fig, axes = plt.subplots(1, 2, figsize=(2 * pw + 1.4, ph + 0.8), squeeze=False)
    left, right = axes[0]
    left.imshow(image, interpolation=interp, **gray)
    right.imshow(image, interpolation=interp, **gray)
    shown = right.imshow(amap, cmap="inferno", vmin=vmin, vmax=vmax, alpha=0.6, interpolation=interp)
    region = None if mask is None else np.asarray(mask, bool)
    if region is not None and region.any():
        tint = np.zeros((h, w, 4))
        tint[region] = (*cyan, 0.5)
        left.imshow(tint, interpolation="nearest")
        # padded, so a region touching the border (or filling the image) is outlined there too
        xs, ys = np.arange(-1, w + 1), np.arange(-1, h + 1)
        right.contour(xs, ys, np.pad(region, 1).astype(float), levels=[0.5], colors=[cyan], linewidths=1.2)
        right.set_xlim(-0.5, w - 0.5)
        right.set_ylim(h - 0.5, -0.5)
    bar = fig.colorbar(shown, ax=right, fraction=0.046, pad=0.04)
    bar.set_label("anomaly map", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if threshold is not None:
        bar.ax.axhline(float(threshold), color=cyan, linewidth=2)
    n = 0 if region is None else int(region.sum())
    left.set_title("input" + ("" if region is None else f" + predicted region ({100 * n / (h * w):.1f}%)"), fontsize=8)
    right.set_title("anomaly map" + ("" if threshold is None else f" (pixel threshold {threshold:.3g})"), fontsize=8)
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with io.atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100, metadata={"Software": None})  # same bytes every run
    plt.close(fig)
