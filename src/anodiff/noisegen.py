"""The GAN's networks: the noise generator G and the WGAN critic D.

G maps an anomalous image to the noise that lets the frozen DDPM heal it; D tells normal images
noised the ordinary way from anomalous ones noised with G's noise (see gan.py for the losses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anodiff.unet import ResBlock, group_norm


class NoiseGenerator(nn.Module):
    """Image (B, C, H, W) -> noise field (B, C, H, W).

    residual=False (the SemanticDiffGAN paper's G): the noise is `bound * tanh(f(x))`.
    residual=True: it is `eps + bound * tanh(f(x))`, a bounded correction of the Gaussian noise eps
    passed in; the last conv starts at zero, so training starts from the plain `ddpm` method exactly.
    """

    checkpoint_kind = "gan_generator"  # see checkpoint.py

    def __init__(self, channels: int, base_channels: int = 32, n_blocks: int = 4, bound: float = 1.5,
                 residual: bool = False):
        super().__init__()
        if bound <= 0:
            raise ValueError(f"bound must be > 0, got {bound}")
        self._arch = dict(channels=int(channels), base_channels=int(base_channels), n_blocks=int(n_blocks),
                          bound=float(bound), residual=bool(residual))
        self.bound, self.residual = float(bound), bool(residual)
        self.conv_in = nn.Conv2d(channels, base_channels, 3, padding=1)
        # full resolution throughout (no resize to 64 px and back, as the original did): block i
        # dilates its first conv by 2**i (at most 8), so four blocks see a 65-pixel window, enough
        # to tell a defect from the slab around it. GroupNorm is per sample: only D must avoid
        # batch statistics.
        self.blocks = nn.ModuleList(ResBlock(base_channels, base_channels, dilation=2 ** min(i, 3), act="leaky",
                                             zero_init=False) for i in range(n_blocks))
        self.norm_out = group_norm(base_channels)
        self.conv_out = nn.Conv2d(base_channels, channels, 3, padding=1)
        if residual:  # start as pure Gaussian noise: the plain ddpm method
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    def arch_config(self) -> dict:
        return dict(self._arch)

    def forward(self, x, eps=None):
        """G's noise for x; eps is the Gaussian noise a residual G corrects (ignored otherwise)."""
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h)
        delta = self.bound * torch.tanh(self.conv_out(F.leaky_relu(self.norm_out(h), 0.2)))
        if self.residual:
            if eps is None:
                raise ValueError("a residual NoiseGenerator needs the Gaussian noise eps it corrects")
            return eps + delta
        return delta


class Critic(nn.Module):
    """WGAN critic: image (B, C, H, W) -> unbounded score (B,), high for normal-looking inputs.

    LeakyReLU convs with no batch norm (a gradient penalty needs per-sample scores) and no
    sigmoid; three stride-2 convs then a global mean, so any batch size (1 included) and any
    image size (divisible by 8 keeps the strides exact) work.
    """

    def __init__(self, channels: int, base_channels: int = 32):
        super().__init__()
        b = base_channels
        self.net = nn.Sequential(
            nn.Conv2d(channels, b, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(b, 2 * b, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * b, 4 * b, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * b, 8 * b, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
        )
        self.head = nn.Linear(8 * b, 1)

    def forward(self, x):
        h = self.net(x).mean(dim=(2, 3))  # (B, 8b)
        return self.head(h).squeeze(1)  # (B,)
