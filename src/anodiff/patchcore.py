"""PatchCore (Roth et al., CVPR 2022): a memory of normal patch features, scored by nearest neighbour.

No diffusion: the reference a user would otherwise pick. In three small parts, as anomalib has it:
- `greedy_coreset`: the k-centre greedy subset of the training patches that covers them best,
  computed on a random projection of the features (Johnson-Lindenstrauss) to keep it cheap;
- `MemoryBank`: the kept patches and the distance of a query patch to its nearest one;
- `anomaly_maps`: the distance per patch, upsampled to the extractor's input size, blurred with a
  Gaussian of sigma 4 there, and resized to the image size; the image score is the map's maximum.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from anodiff import anomaly, io
from anodiff.errors import CheckpointError
from anodiff.features import WEIGHTS_SHA256, FeatureExtractor, extract

CHUNK = 4096  # query rows per distance block: 4096 x 16384 floats is 256 MB


def to_patches(features: torch.Tensor) -> torch.Tensor:
    """(N, D, h, w) -> (N*h*w, D), image by image, row by row."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def greedy_coreset(patches: torch.Tensor, n: int, generator: torch.Generator, projection: int = 32) -> torch.Tensor:
    """Indices of `n` rows of `patches` (P, D) chosen by k-centre greedy: each next row is the one
    farthest from every row chosen so far. The first row is drawn from `generator`; distances are
    measured after a seeded Gaussian projection to `projection` dimensions (0: none).

    Written here because no maintained library offers it (scikit-learn has no k-centre greedy);
    the cost is n passes over P rows, so the projection's width sets the speed (32: 0.7x the
    time of 64, 0.1x that of 128 on a 2-core CPU, which falls out of cache)."""
    P = patches.shape[0]
    if n >= P:
        return torch.arange(P)
    x = patches.float()
    if 0 < projection < x.shape[1]:
        proj = torch.randn(x.shape[1], projection, generator=generator) / math.sqrt(projection)
        x = x @ proj
    x = x.contiguous()
    sq = (x * x).sum(1)
    chosen = torch.empty(n, dtype=torch.long)
    idx = int(torch.randint(P, (1,), generator=generator))
    min_d, d = torch.full((P,), float("inf")), torch.empty(P)
    for k in range(n):
        chosen[k] = idx
        c = x[idx]
        torch.addmv(sq, x, c, alpha=-2, out=d)  # |x|^2 - 2 x.c, in place: the same sums as sq - 2 * (x @ c)
        d.add_(c.dot(c))
        torch.minimum(min_d, d, out=min_d)
        idx = int(min_d.argmax())
    return chosen


def nearest_distance(query: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of each query row (Q, D) to its nearest bank row (M, D): (Q,)."""
    out = torch.empty(query.shape[0])
    bank = bank.float()
    bank_sq = (bank * bank).sum(1)
    for s in range(0, query.shape[0], CHUNK):
        q = query[s:s + CHUNK].float()
        # the nearest row by |b|^2 - 2 q.b (one matrix product), then its distance computed
        # directly: the expanded form loses the small distances to rounding (a query in the bank
        # would score ~1e-3, not 0)
        nearest = torch.addmm(bank_sq.unsqueeze(0), q, bank.T, alpha=-2).argmin(dim=1)
        out[s:s + CHUNK] = (q - bank[nearest]).norm(dim=1)
    return out


@dataclass
class MemoryBank:
    """Normal patch features (M, D), and how they were chosen."""

    patches: torch.Tensor
    n_candidates: int  # training patches the coreset was chosen from

    @classmethod
    def fit(cls, features: torch.Tensor, coreset: float, generator: torch.Generator, projection: int = 32,
            max_patches: int = 300_000, warn=warnings.warn) -> "MemoryBank":
        """From training features (N, D, h, w): a `coreset` share of their patches (1.0: all).

        More than `max_patches` training patches are first subsampled at random (with a warning
        naming the param), so the bank and the coreset's time stay bounded."""
        patches = to_patches(features)
        if patches.shape[0] > max_patches:
            warn(f"patchcore.max_patches: {patches.shape[0]} training patches exceed {max_patches}; "
                 f"using a random {max_patches} of them (raise patchcore.max_patches to use more)")
            keep = torch.randperm(patches.shape[0], generator=generator)[:max_patches].sort().values
            patches = patches[keep]
        n = max(1, int(round(coreset * patches.shape[0])))
        idx = greedy_coreset(patches, n, generator, projection)
        return cls(patches[idx].contiguous(), int(patches.shape[0]))

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D, h, w) -> (N, 1, h, w): each patch's distance to the nearest normal patch."""
        n, _, h, w = features.shape
        return nearest_distance(to_patches(features), self.patches).view(n, 1, h, w)


def maps_from_distances(dist: torch.Tensor, extractor_size: int, out_size: int, sigma: float = 4.0) -> torch.Tensor:
    """Patch distances (N, 1, h, w) -> maps (N, 1, out, out): upsampled to the extractor's input
    size, blurred there with a Gaussian of `sigma` pixels (PatchCore's), then resized."""
    up = F.interpolate(dist, size=(extractor_size, extractor_size), mode="bilinear", align_corners=False)
    up = anomaly.smooth(up, sigma)
    if out_size == extractor_size:
        return up
    return F.interpolate(up, size=(out_size, out_size), mode="bilinear", align_corners=False,
                         antialias=out_size < extractor_size)


def anomaly_maps(extractor: FeatureExtractor, bank: MemoryBank, images: torch.Tensor, out_size: int,
                 sigma: float = 4.0, batch_size: int = 16) -> torch.Tensor:
    """Maps (N, 1, out_size, out_size) of images (N, C, H, W) in [-1, 1]; score = the map's max."""
    dists = [bank.distances(extract(extractor, images[i:i + batch_size], batch_size))
             for i in range(0, len(images), batch_size)]
    dist = torch.cat(dists) if dists else torch.zeros(0, 1, extractor.grid, extractor.grid)
    return maps_from_distances(dist, extractor.image_size, out_size, sigma)


def save(path, bank: MemoryBank, meta: dict) -> None:
    io.save_checkpoint(path, {"patches": bank.patches, "meta": {"kind": "patchcore", "n_candidates": bank.n_candidates,
                                                                "weights_sha256": WEIGHTS_SHA256, **meta}})


def load(path, channels: int | None = None) -> tuple[MemoryBank, dict]:
    """The memory bank written by train_patchcore, and its meta (the settings it was built with)."""
    ckpt = io.load_checkpoint(path)
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
    patches = ckpt.get("patches")
    if meta.get("kind") != "patchcore" or not isinstance(patches, torch.Tensor) or patches.dim() != 2:
        raise CheckpointError(f"{path}: not a PatchCore memory bank; rerun `dvc repro train_patchcore`")
    if meta.get("weights_sha256") != WEIGHTS_SHA256:
        raise CheckpointError(f"{path}: built with other feature weights; rerun `dvc repro train_patchcore`")
    if channels is not None and meta.get("channels") != channels:
        raise CheckpointError(f"{path}: built from {meta.get('channels')}-channel images, data.channels is {channels}; "
                              f"rerun `dvc repro train_patchcore`")
    return MemoryBank(patches.float(), int(meta["n_candidates"])), meta


class Scorer:
    """A memory bank with the extractor it was built with: images -> PatchCore maps (N, 1, S, S)
    at the image size S. `infer` and `anodiff predict` both score through it."""

    def __init__(self, bank: MemoryBank, settings: dict, extractor: FeatureExtractor | None = None):
        self.bank, self.settings = bank, settings
        self.extractor = extractor or FeatureExtractor(int(settings["image_size"]))

    @classmethod
    def load(cls, path, channels: int | None = None, settings: dict | None = None) -> "Scorer":
        """`settings`: the scoring settings to use (sigma, batch_size) instead of the stored ones;
        the extractor's input size is the bank's own."""
        bank, meta = load(path, channels)
        stored = meta.get("settings") or {}
        if settings is not None and settings.get("image_size") != stored.get("image_size"):
            raise CheckpointError(f"{path}: built at patchcore.image_size {stored.get('image_size')}, params have "
                                  f"{settings.get('image_size')}; rerun `dvc repro train_patchcore`")
        return cls(bank, settings or stored)

    def maps(self, images: torch.Tensor, out_size: int | None = None) -> torch.Tensor:
        """Maps at `out_size` (default: the images' own size) of images in [-1, 1]."""
        s = self.settings
        return anomaly_maps(self.extractor, self.bank, images, out_size or images.shape[-1], float(s["sigma"]),
                            int(s["batch_size"]))
