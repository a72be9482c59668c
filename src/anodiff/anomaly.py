"""Anomaly maps and image scores: reconstruct, compare, smooth, calibrate, score.

A map comes from partially noising an image, denoising it with a model that knows only normal
images, and comparing.

The map of an image is built in explicit steps, each a plain function:
  reconstruct (at one or more noise levels, optionally guided by the input) -> error_map (abs | sq)
  -> smooth -> Calibration (fitted on normal val images) -> map,
and the image score is a statistic (max or top-k mean) of a calibrated map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision.transforms.functional import gaussian_blur

ERRORS = ("abs", "sq", "feature")


def reconstruct(model, schedule, x0: torch.Tensor, noise: torch.Tensor, t_start: int, steps: int,
                guidance: float = 0.0, ancestral: torch.Generator | None = None) -> torch.Tensor:
    """Noise x0 to step t_start with the given noise, then denoise back in `steps` DDIM steps,
    conditioned on x0 with weight `guidance` (0: unconditioned; see Schedule.denoise).
    `ancestral`, a CPU generator: AnoDDPM's full ancestral chain instead (t_start + 1 steps,
    `steps` ignored; Schedule.ancestral), the slow reference the benchmark compares with."""
    t = torch.full((x0.shape[0],), t_start, dtype=torch.long, device=x0.device)
    x_t = schedule.add_noise(x0, noise, t)
    if ancestral is not None:
        return schedule.ancestral(model, x_t, t_start, ancestral, guide=x0, guidance=guidance)
    return schedule.denoise(model, x_t, t_start, steps, guide=x0, guidance=guidance)


def error_map(x: torch.Tensor, x_hat: torch.Tensor, kind: str = "abs", features=None) -> torch.Tensor:
    """Per-pixel difference between input and reconstruction -> (B,1,H,W), larger = more anomalous.

    "feature": DDAD's distance in a pretrained feature space: `features` (a FeatureExtractor, or
    a pair (features of x, the extractor) to reuse x's) maps both images, and the map is
    1 - cosine similarity per position, summed over the extractor's endpoints, upsampled to x."""
    if kind == "abs":
        return (x - x_hat).abs().mean(dim=1, keepdim=True)
    if kind == "sq":
        return (x - x_hat).pow(2).mean(dim=1, keepdim=True)
    if kind == "feature":
        fx, extractor = features if isinstance(features, tuple) else (features(x), features)
        return feature_distance(fx, extractor(x_hat), x.shape[-2:])
    raise ValueError(f"unknown error kind {kind!r}; expected one of {ERRORS}")


def feature_distance(fa: torch.Tensor, fb: torch.Tensor, size, split=(40, 112)) -> torch.Tensor:
    """(B, D, h, w) features of two images -> (B, 1, *size): 1 - cosine per position, per endpoint
    (channel groups `split`), summed, upsampled bilinearly. Identical features give exactly 0."""
    total = 0
    for a, b in zip(fa.split(list(split), dim=1), fb.split(list(split), dim=1)):
        # 1 - cos(a, b) = |a/|a| - b/|b||^2 / 2: exactly 0 for equal features, unlike 1 - (a.b)/(|a||b|)
        unit_a = torch.nn.functional.normalize(a, dim=1, eps=1e-8)
        unit_b = torch.nn.functional.normalize(b, dim=1, eps=1e-8)
        total = total + (unit_a - unit_b).pow(2).sum(dim=1, keepdim=True) / 2
    return torch.nn.functional.interpolate(total, size=tuple(size), mode="bilinear", align_corners=False)


def smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing of (B,1,H,W) maps (kernel covers +-3 sigma)."""
    if sigma <= 0:
        return maps
    k = 2 * math.ceil(3 * sigma) + 1
    k = min(k, 2 * (min(maps.shape[-2:]) // 2) - 1)  # reflect padding needs kernel < size
    return gaussian_blur(maps, kernel_size=[k, k], sigma=[sigma, sigma])


@dataclass
class NormalStats:
    """Per-pixel mean and spread of the error on normal validation images.

    Standardising by them removes what every normal image shares: border effects and the
    texture's typical reconstruction error, so the map measures surprise, not texture.
    """

    mean: torch.Tensor  # (1,H,W)
    std: torch.Tensor  # (1,H,W)

    @classmethod
    def fit(cls, maps: torch.Tensor, smooth_sigma: float = 4.0) -> "NormalStats":
        if maps.shape[0] < 2:
            raise ValueError("need at least two normal validation maps to fit statistics")
        mean = maps.mean(dim=0)
        std = maps.std(dim=0)
        # a few dozen images give noisy per-pixel estimates: smooth them spatially, and floor
        # the spread so a pixel that happened to vary little does not explode
        mean = smooth(mean.unsqueeze(0), smooth_sigma)[0]
        std = smooth(std.unsqueeze(0), smooth_sigma)[0]
        std = std.clamp_min(0.1 * float(std.mean()) + 1e-8)
        return cls(mean, std)

    def normalize(self, maps: torch.Tensor) -> torch.Tensor:
        return (maps - self.mean) / self.std


def standardize_per_image(maps: torch.Tensor) -> torch.Tensor:
    """Each (1,H,W) map minus its own mean, over its own standard deviation.

    Textures differ in how well they reconstruct (a bright-veined slab errs more everywhere
    than a plain one); measuring each pixel against its own image's error level turns the map
    into local surprise. A defect covers a small share of the image, so it barely moves the
    image's own statistics. On the embedded marble this beat per-pixel statistics from normal
    val images (docs/method.md).
    """
    flat = maps.flatten(1)
    mean = flat.mean(dim=1).view(-1, 1, 1, 1)
    std = flat.std(dim=1).view(-1, 1, 1, 1).clamp_min(1e-8)
    return (maps - mean) / std


def image_scores(maps: torch.Tensor, kind: str = "topk", topk: float = 0.01) -> torch.Tensor:
    """(B,1,H,W) -> (B,): the map's maximum, or the mean of its top `topk` share of pixels."""
    flat = maps.flatten(1)
    if kind == "max":
        return flat.max(dim=1).values
    if kind == "topk":
        k = max(1, int(round(topk * flat.shape[1])))
        return flat.topk(k, dim=1).values.mean(dim=1)
    raise ValueError(f"unknown score kind {kind!r}; expected max or topk")


# ---------------------------------------------------------------- calibration
CALIBRATIONS = ("none", "image", "pixel", "texture", "texture2", "mahalanobis")
# the calibrations fitted on normal val images, and the statistics each one stores
_NEEDS = {"pixel": ("mean", "std"), "texture": ("loc", "scale"), "texture2": ("loc", "scale"),
          "mahalanobis": ("mean", "precision")}
CALIBRATED = tuple(_NEEDS)
# A diffusion map may fuse in the PatchCore memory's distance map, the raw stack's last level:
# "<kind>+memory". Only the calibrations that put each level on its own normal scale can fuse
# levels whose units differ (pixel errors against feature distances).
MEMORY = "+memory"
FUSABLE = ("texture", "texture2", "mahalanobis")
# the memory's weight against the noise levels' mean, per suffix: equal, or three to one (texture
# and texture2; mahalanobis weighs by the joint covariance and takes "+memory" alone)
MEMORY_WEIGHTS = {"+memory": 0.5, "+memory3": 0.75}


def fused_names(kind: str) -> list[str]:
    """The fused candidates of a calibration kind ([] where it cannot fuse)."""
    if kind not in FUSABLE:
        return []
    return [kind + MEMORY] if kind == "mahalanobis" else [kind + suffix for suffix in MEMORY_WEIGHTS]


def split_kind(name: str) -> tuple[str, float]:
    """"texture+memory" -> ("texture", 0.5); "texture+memory3" -> ("texture", 0.75); "pixel" -> ("pixel", 0.0):
    the kind and the memory's weight (0: the reconstruction alone)."""
    for suffix, weight in MEMORY_WEIGHTS.items():
        if name.endswith(suffix):
            return name[:-len(suffix)], weight
    return name, 0.0
LOG_EPS = 1e-3  # error energies are |x - x_hat| in [0, 2]; log(e + eps) keeps flat regions finite


@dataclass
class Calibration:
    """How a stack of raw error maps (N, T, H, W), one per noise level, becomes one anomaly map.

    - none: the mean over noise levels, as is.
    - image: each map standardised by its own mean and spread (needs no normal images).
    - pixel: each pixel against its own mean/spread on normal val images (aligned parts).
    - texture: position-free; log error energy per noise level as a z-score against all pixels
      of the normal val images, averaged over noise levels. One-sided: only more error than
      normal counts.
    - texture2: the same, two-sided: unusually LOW error is surprising too, as where a smooth
      stain or a missing-texture patch sits in a busy surface that never reconstructs that well.
    - mahalanobis: the vector of log energies over the noise levels against their mean and
      covariance on normal val pixels: unusual in either direction at any noise level, and in
      how the error changes with the noise level.
    With `memory` (a weight), the raw stack's last map is PatchCore's memory distance: texture and
    texture2 average the noise levels' z-scores, then blend that with the memory's z-score
    ("+memory": equal weights; "+memory3": three parts memory to one); mahalanobis takes it as
    one more dimension.
    """

    kind: str
    arrays: dict = field(default_factory=dict)  # fitted statistics, plain tensors
    # the memory distance's weight (0: not fused); it is the raw stack's last level (the caller
    # passes it or not)
    memory: float = 0.0

    def __post_init__(self):
        if self.kind not in CALIBRATIONS:
            raise ValueError(f"unknown calibration {self.kind!r}; expected one of {CALIBRATIONS}")
        if self.memory and self.name not in fused_names(self.kind):
            raise ValueError(f"calibration {self.kind!r} cannot fuse the memory distance with weight "
                             f"{self.memory}; these can: {[n for k in FUSABLE for n in fused_names(k)]}")

    @classmethod
    def named(cls, name: str) -> "Calibration":
        kind, memory = split_kind(name)
        return cls(kind, memory=memory)

    @property
    def name(self) -> str:
        suffix = next((s for s, w in MEMORY_WEIGHTS.items() if w == self.memory), "") if self.memory else ""
        return self.kind + suffix

    @property
    def fitted(self) -> bool:
        return all(k in self.arrays for k in _NEEDS.get(self.kind, ()))

    def fit(self, normal_raw: torch.Tensor) -> "Calibration":
        """Statistics from normal maps (M, T, H, W); returns self."""
        if normal_raw.shape[0] < 2:
            raise ValueError("need at least two normal maps to calibrate")
        if self.kind == "pixel":
            stats = NormalStats.fit(normal_raw.mean(dim=1, keepdim=True))
            self.arrays = {"mean": stats.mean, "std": stats.std}
        elif self.kind in ("texture", "texture2"):
            g = torch.log(normal_raw.double() + LOG_EPS).transpose(0, 1).flatten(1)  # (T, M*H*W)
            self.arrays = {"loc": g.median(dim=1).values.float(), "scale": g.std(dim=1).clamp_min(1e-6).float()}
        elif self.kind == "mahalanobis":
            g = torch.log(normal_raw.double() + LOG_EPS).transpose(0, 1).flatten(1)  # (T, P)
            mean = g.mean(dim=1)
            cov = torch.atleast_2d(torch.cov(g))
            ridge = 1e-6 * float(cov.diagonal().mean()) + 1e-12
            precision = torch.linalg.inv(cov + ridge * torch.eye(len(mean), dtype=cov.dtype))
            self.arrays = {"mean": mean.float(), "precision": precision.float()}
        return self

    def apply(self, raw: torch.Tensor) -> torch.Tensor:
        """(N, T, H, W) raw maps -> (N, 1, H, W) anomaly maps."""
        if not self.fitted:
            raise ValueError(f"calibration {self.kind!r} is not fitted")
        a = self.arrays
        if self.kind == "none":
            return raw.mean(dim=1, keepdim=True)
        if self.kind == "image":
            return standardize_per_image(raw.mean(dim=1, keepdim=True))
        if self.kind == "pixel":
            return NormalStats(a["mean"], a["std"]).normalize(raw.mean(dim=1, keepdim=True))
        g = torch.log(raw + LOG_EPS)
        if self.kind in ("texture", "texture2"):
            z = (g - a["loc"].view(1, -1, 1, 1)) / a["scale"].view(1, -1, 1, 1)
            if self.memory:  # the noise levels' mean and the memory, weighted
                z = (1 - self.memory) * z[:, :-1].mean(dim=1, keepdim=True) + self.memory * z[:, -1:]
            else:
                z = z.mean(dim=1, keepdim=True)
            return z.abs() if self.kind == "texture2" else z
        d = g - a["mean"].view(1, -1, 1, 1)
        q = torch.einsum("nihw,ij,njhw->nhw", d, a["precision"], d)
        return q.clamp_min(0).sqrt().unsqueeze(1)

    def state(self, prefix: str) -> dict:
        """Flat numpy arrays to store beside the maps (prefix_<name>)."""
        return {f"{prefix}_{k}": v.numpy() for k, v in self.arrays.items()}

    @classmethod
    def from_state(cls, name: str, arrays: dict, prefix: str) -> "Calibration":
        # copies: stored arrays may be read-only (torch.from_numpy would warn) and stay the caller's
        found = {k[len(prefix) + 1:]: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()
                 if k.startswith(prefix + "_")}
        kind, memory = split_kind(name)
        return cls(kind, found, memory)
