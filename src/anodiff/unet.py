"""A small time-conditioned UNet: it sees only (x_t, t) and predicts the noise eps.

Layout (DDPM / improved-diffusion style, sized down for CPU): a sinusoidal embedding of t
goes through an MLP and is added inside every residual block; each resolution level has
`num_res_blocks` blocks (plus self-attention where the feature map's side is listed in
`attention_resolutions`, the middle block included), then a stride-2 downsample; the decoder
mirrors it with skip connections. GroupNorm only (no BatchNorm: batch statistics would couple the samples and
change with the batch size between training and inference).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, ch), ch)  # at most 8 groups, and always a divisor of ch


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al.) of integer steps t (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


_ACTS = {"silu": F.silu, "leaky": lambda x: F.leaky_relu(x, 0.2)}


class ResBlock(nn.Module):
    """skip(x) + conv2(act(norm2(conv1(act(norm1(x))) [+ time(temb)]))): both convs reach the output.

    The UNet's blocks take a time embedding (time_dim > 0), use SiLU and start as the identity
    (conv2 zero-initialised), which makes early training stable; the GAN generator's take no
    time, use LeakyReLU(0.2), may dilate conv1, and keep conv2's random initialisation.
    """

    def __init__(self, in_ch: int, out_ch: int, time_dim: int = 0, dilation: int = 1, act: str = "silu",
                 zero_init: bool = True):
        super().__init__()
        if act not in _ACTS:
            raise ValueError(f"act must be one of {sorted(_ACTS)}, got {act!r}")
        self.act = act
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation)
        self.time = nn.Linear(time_dim, out_ch) if time_dim else None
        self.norm2 = group_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if zero_init:
            nn.init.zeros_(self.conv2.weight)
            nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x, temb=None):
        act = _ACTS[self.act]
        h = self.conv1(act(self.norm1(x)))
        if self.time is not None:
            h = h + self.time(temb)[:, :, None, None]  # (B, out_ch, 1, 1) broadcast over pixels
        h = self.conv2(act(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the pixels of a feature map, residual."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x, temb=None):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)  # each (B, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C)
        return x + self.proj(h.transpose(1, 2).reshape(B, C, H, W))


class Stage(nn.Module):
    """A residual block, followed by self-attention at the listed resolutions."""

    def __init__(self, in_ch: int, out_ch: int, time_dim: int, attention: bool):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, time_dim)
        self.attn = Attention(out_ch) if attention else None

    def forward(self, x, temb):
        x = self.res(x, temb)
        return x if self.attn is None else self.attn(x)


class UNet(nn.Module):
    checkpoint_kind = "ddpm"  # see checkpoint.py

    def __init__(self, in_channels: int, base_channels: int = 32, channel_mults=(1, 2, 2),
                 num_res_blocks: int = 1, attention_resolutions=(16,), image_size: int = 64):
        super().__init__()
        self._arch = dict(in_channels=int(in_channels), base_channels=int(base_channels),
                          channel_mults=[int(m) for m in channel_mults],
                          num_res_blocks=int(num_res_blocks),
                          attention_resolutions=[int(r) for r in attention_resolutions],
                          image_size=int(image_size))
        n_levels = len(channel_mults)
        if n_levels < 1 or image_size % 2 ** (n_levels - 1):
            raise ValueError(f"image_size {image_size} must be divisible by 2 ** (len(channel_mults) - 1)")
        time_dim = 4 * base_channels
        self.base_channels = base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, time_dim), nn.SiLU(),
                                      nn.Linear(time_dim, time_dim))
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        attn_at = set(attention_resolutions)
        ch, res = base_channels, image_size
        skip_chs = [ch]  # channels of every tensor the encoder hands to the decoder
        self.down_stages, self.downsample = nn.ModuleList(), nn.ModuleList()
        for level, mult in enumerate(channel_mults):
            stages = nn.ModuleList()
            for _ in range(num_res_blocks):
                stages.append(Stage(ch, base_channels * mult, time_dim, res in attn_at))
                ch = base_channels * mult
                skip_chs.append(ch)
            self.down_stages.append(stages)
            if level < n_levels - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skip_chs.append(ch)
                res //= 2

        # attention in the middle too only if its resolution is listed: with none listed the
        # network is fully convolutional, so it can train on crops and run on whole images
        self.mid = nn.ModuleList([Stage(ch, ch, time_dim, res in attn_at), Stage(ch, ch, time_dim, False)])

        self.up_stages, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(n_levels)):
            stages = nn.ModuleList()
            for _ in range(num_res_blocks + 1):  # one more than the encoder: its downsample's skip
                out = base_channels * channel_mults[level]
                stages.append(Stage(ch + skip_chs.pop(), out, time_dim, res in attn_at))
                ch = out
            self.up_stages.append(stages)
            if level > 0:
                self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1))
                res *= 2

        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)

    @classmethod
    def from_config(cls, ddpm_cfg, channels: int, image_size: int) -> "UNet":
        return cls(channels, ddpm_cfg.base_channels, ddpm_cfg.channel_mults, ddpm_cfg.num_res_blocks,
                   ddpm_cfg.attention_resolutions, image_size)

    @classmethod
    def from_arch(cls, arch: dict) -> "UNet":
        return cls(**arch)

    def arch_config(self) -> dict:
        """Plain dict of the constructor arguments (ints and lists), stored in checkpoints."""
        return {k: list(v) if isinstance(v, list) else v for k, v in self._arch.items()}

    def forward(self, x, t):
        """eps prediction (B, C, H, W) for x_t (B, C, H, W) and t (B,) or int."""
        if not torch.is_tensor(t) or t.dim() == 0:
            t = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        temb = self.time_mlp(timestep_embedding(t, self.base_channels))
        h = self.conv_in(x)
        skips = [h]
        for level, stages in enumerate(self.down_stages):
            for stage in stages:
                h = stage(h, temb)
                skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
                skips.append(h)
        for stage in self.mid:
            h = stage(h, temb)
        for level, stages in enumerate(self.up_stages):
            for stage in stages:
                h = stage(torch.cat([h, skips.pop()], dim=1), temb)
            if level < len(self.upsample):
                h = self.upsample[level](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        eps = self.conv_out(F.silu(self.norm_out(h)))
        return eps
