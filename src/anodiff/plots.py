"""Figures written to plots/: sample grids with mask outlines (more to come)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage
from torchvision.utils import make_grid

from anodiff import io

RED = np.array([255, 0, 0], np.uint8)


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
    batch = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2)
    grid = make_grid(batch, nrow=width, padding=pad, pad_value=255).permute(1, 2, 0).numpy()

    margin = 8 + 6 * max(len(lab) for lab in rows)  # the default bitmap font is ~6 px wide
    canvas = Image.new("RGB", (grid.shape[1] + margin, grid.shape[0]), "white")
    canvas.paste(Image.fromarray(np.ascontiguousarray(grid)), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for r, lab in enumerate(rows):
        draw.text((4, pad + r * (tile + pad) + tile // 2 - 6), lab, fill=(0, 0, 0))
    io.write_png(path, np.asarray(canvas))
