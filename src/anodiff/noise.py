"""Every noise of the forward process, made by `for_batch`: Gaussian, simplex (AnoDDPM) or a GAN's.

Gaussian noise, multi-octave simplex noise (AnoDDPM's), or the noise of a GAN's noise network.

Noise is always drawn on the CPU from the caller's CPU `torch.Generator` and then moved to
the device, so a seed gives the same noise on CPU and CUDA.

Simplex noise: AnoDDPM's implementation looped over pixels in numpy and only worked at batch
size 1, a known bottleneck. Here it is vectorised over samples, channels and pixels; the only
Python loop is over octaves. Every (sample, channel) gets its own random permutation and
gradient table, so they are independent noise fields.
"""

from __future__ import annotations

import math

import torch

_F2 = 0.5 * (math.sqrt(3.0) - 1.0)  # skews (x, y) onto the simplex (triangle) lattice
_G2 = (3.0 - math.sqrt(3.0)) / 6.0  # unskews back
_TABLE = 256  # lattice period, as in Perlin's and Gustavson's reference code


def gaussian(shape, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=generator)


def _simplex2d(x, y, perm, grad_x, grad_y) -> torch.Tensor:
    """Gustavson's 2D simplex noise at the points x, y (H, W), for N random tables at once.

    perm (N, 2*_TABLE) long, a permutation written twice so that i + perm[j] needs no wrap;
    grad_x, grad_y (N, 2*_TABLE): the unit gradient hashed to each entry, i.e. already
    composed with perm (saves one gather per corner). The lattice geometry depends only on
    the points, so it is computed once for all N; only the hashed gradients differ per table.
    Returns (N, H, W), values in about [-1, 1].
    """
    N = perm.shape[0]
    s = (x + y) * _F2
    i, j = torch.floor(x + s), torch.floor(y + s)
    t = (i + j) * _G2
    x0, y0 = x - (i - t), y - (j - t)  # offsets from the cell's first corner
    # the second corner is (1, 0) in the lower triangle (x0 > y0), (0, 1) in the upper
    i1 = (x0 > y0).long()
    j1 = 1 - i1
    corners = ((0, 0, x0, y0),
               (i1, j1, x0 - i1 + _G2, y0 - j1 + _G2),
               (1, 1, x0 - 1 + 2 * _G2, y0 - 1 + 2 * _G2))
    ii = (i.long() % _TABLE).flatten()
    jj = (j.long() % _TABLE).flatten()
    total = torch.zeros(N, x.numel())
    for di, dj, cx, cy in corners:
        di, dj = torch.as_tensor(di).flatten(), torch.as_tensor(dj).flatten()
        row = torch.gather(perm, 1, (jj + dj).expand(N, -1))  # (N, HW)
        h = row + (ii + di)  # (N, HW) hash of the corner, < 2*_TABLE
        cx, cy = cx.flatten(), cy.flatten()
        falloff = (0.5 - cx * cx - cy * cy).clamp(min=0) ** 4  # (HW,)
        total += falloff * (torch.gather(grad_x, 1, h) * cx + torch.gather(grad_y, 1, h) * cy)
    return 70.0 * total.view(N, *x.shape)  # Gustavson's scale, maps to about [-1, 1]


def simplex(shape, generator: torch.Generator, octaves: int = 6, persistence: float = 0.8,
            frequency: float = 64.0, image_size: int | None = None) -> torch.Tensor:
    """Multi-octave 2D simplex noise of `shape` (B, C, H, W), zero mean and unit variance per
    sample and channel.

    `frequency` is the feature size in pixels of the first (coarsest) octave at 256 px, as in
    AnoDDPM; it is scaled by image_size / 256 so a smaller image gets the same structure
    relative to its size (64 at 256 px is 16 at 64 px). `image_size` defaults to H; pass the
    whole image's side when the noise is for a training crop of it. Each further octave halves
    the feature size and multiplies the amplitude by `persistence`.
    """
    B, C, H, W = shape
    image_size = H if image_size is None else image_size
    if octaves < 1 or frequency <= 0:
        raise ValueError(f"simplex noise needs octaves >= 1 and frequency > 0, got {octaves}, {frequency}")
    N = B * C
    # draw all randomness up front, in a fixed order, so the result depends only on the seed;
    # each (sample, channel) has its own permutation and gradients: independent fields
    perm = torch.rand(N, _TABLE, generator=generator).argsort(dim=1)
    perm = torch.cat([perm, perm], dim=1)  # (N, 2*_TABLE)
    angle = torch.rand(N, _TABLE, generator=generator) * (2 * math.pi)
    angle = torch.gather(angle, 1, perm)  # (N, 2*_TABLE): gradient of hash k is angle[perm[k]]
    grad_x, grad_y = torch.cos(angle), torch.sin(angle)
    # a random lattice offset per octave, so the octaves do not all share one lattice origin
    offsets = torch.rand(octaves, 2, generator=generator) * _TABLE

    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32),
                            torch.arange(W, dtype=torch.float32), indexing="ij")
    feature = frequency * image_size / 256.0
    amplitude = 1.0
    out = torch.zeros(N, H, W)
    for o in range(octaves):
        out += amplitude * _simplex2d(xx / feature + offsets[o, 0], yy / feature + offsets[o, 1],
                                      perm, grad_x, grad_y)
        feature /= 2
        amplitude *= persistence
    out = out.view(B, C, H * W)
    out = (out - out.mean(dim=2, keepdim=True)) / out.std(dim=2, keepdim=True).clamp(min=1e-8)
    return out.view(B, C, H, W)


def for_batch(x: torch.Tensor, generator: torch.Generator, kind: str = "gaussian",
              simplex_kw: dict | None = None, net=None) -> torch.Tensor:
    """Noise for the batch x (B, C, H, W), on x's device and dtype: the one place noise is made.

    `kind` 'gaussian' or 'simplex' (`simplex_kw` are `simplex`'s keyword arguments), drawn from the
    CPU `generator`. With `net`, the GAN's NoiseGenerator, it is net's noise for x: a residual net
    corrects Gaussian noise drawn from `generator` (kind must then be 'gaussian', what it was
    trained on); the SemanticDiffGAN paper's net draws nothing. The caller chooses grad mode and
    net's mode.
    """
    if kind not in ("gaussian", "simplex"):
        raise ValueError(f"unknown noise kind {kind!r}; expected 'gaussian' or 'simplex'")
    if net is not None:
        if kind != "gaussian":
            raise ValueError(f"a GAN noise generator corrects Gaussian noise, got kind {kind!r}")
        if not net.residual:
            return net(x)
    if kind == "gaussian":
        eps = gaussian(x.shape, generator)
    else:
        eps = simplex(x.shape, generator, **(simplex_kw or {}))
    eps = eps.to(device=x.device, dtype=x.dtype)
    return eps if net is None else net(x, eps)


def noise_kwargs(kind: str, ddpm_cfg) -> dict:
    """The `simplex_kw` that `for_batch(kind=kind)` needs, from the params' ddpm section."""
    if kind != "simplex":
        return {}
    return {"octaves": ddpm_cfg.simplex_octaves, "persistence": ddpm_cfg.simplex_persistence,
            "frequency": ddpm_cfg.simplex_frequency}
