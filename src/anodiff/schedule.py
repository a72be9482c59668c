"""The diffusion maths for T steps, in one object: noising, x0 prediction, posterior, samplers.

Noise always comes from the caller (Gaussian, simplex or a GAN's output all go through
`add_noise`), and the network is only ever asked for eps given `(x_t, t)`.

Indexing: `t` runs over 0..T-1, `alpha_bar[t] = prod_{s<=t} (1 - beta_s)`; `t = -1` stands for
the clean image (alpha_bar = 1). Every `t` argument may be a Python int or a LongTensor `(B,)`.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

_BUFFERS = ("betas", "alphas", "alpha_bar", "alpha_bar_prev", "alpha_bar_ext",
            "sqrt_alpha_bar", "sqrt_one_minus_alpha_bar", "sqrt_recip_alpha_bar",
            "sqrt_recipm1_alpha_bar", "posterior_var", "posterior_coef_x0", "posterior_coef_xt")


def _betas(kind: str, T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if kind == "cosine":
        # Nichol & Dhariwal 2021: alpha_bar follows cos^2; betas capped so the last step is not 1
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown schedule kind {kind!r}; expected 'linear' or 'cosine'")


class Schedule:
    """Beta schedule and the closed forms derived from it (float64 maths, float32 buffers)."""

    def __init__(self, timesteps: int = 300, kind: str = "linear",
                 beta_start: float = 1e-4, beta_end: float = 0.02):
        if timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {timesteps}")
        self.timesteps, self.kind = int(timesteps), kind
        b = _betas(kind, self.timesteps, beta_start, beta_end)
        a = 1 - b
        ab = torch.cumprod(a, 0)
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        consts = {
            "betas": b, "alphas": a, "alpha_bar": ab, "alpha_bar_prev": ab_prev,
            # alpha_bar_ext[t + 1] = alpha_bar[t], alpha_bar_ext[0] = 1: lets t_prev = -1 index
            "alpha_bar_ext": torch.cat([ab.new_ones(1), ab]),
            "sqrt_alpha_bar": ab.sqrt(), "sqrt_one_minus_alpha_bar": (1 - ab).sqrt(),
            "sqrt_recip_alpha_bar": (1 / ab).sqrt(), "sqrt_recipm1_alpha_bar": (1 / ab - 1).sqrt(),
            # q(x_{t-1} | x_t, x0); at t=0 alpha_bar_prev = 1 so the variance is exactly 0
            "posterior_var": b * (1 - ab_prev) / (1 - ab),
            "posterior_coef_x0": b * ab_prev.sqrt() / (1 - ab),
            "posterior_coef_xt": (1 - ab_prev) * a.sqrt() / (1 - ab),
        }
        for name in _BUFFERS:
            setattr(self, name, consts[name].to(torch.float32))  # cast once

    @classmethod
    def from_config(cls, ddpm_cfg) -> "Schedule":
        return cls(ddpm_cfg.timesteps, ddpm_cfg.schedule, ddpm_cfg.beta_start, ddpm_cfg.beta_end)

    def to(self, device) -> "Schedule":
        for name in _BUFFERS:
            setattr(self, name, getattr(self, name).to(device))
        return self

    def __repr__(self) -> str:
        return f"Schedule(timesteps={self.timesteps}, kind={self.kind!r})"

    # ------------------------------------------------------------------ closed forms
    @staticmethod
    def _at(values: torch.Tensor, t, x: torch.Tensor) -> torch.Tensor:
        """values[t], shaped to broadcast against x (B, C, H, W)."""
        values = values.to(x.device)
        if not torch.is_tensor(t):
            return values[int(t)]
        t = t.to(values.device).long()
        return values[t].view(-1, *([1] * (x.dim() - 1)))  # (B, 1, 1, 1)

    def add_noise(self, x0, noise, t):
        """Sample q(x_t | x0) = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        a, b = self._at(self.sqrt_alpha_bar, t, x0), self._at(self.sqrt_one_minus_alpha_bar, t, x0)
        return a * x0 + b * noise

    def predict_x0(self, x_t, eps, t):
        """Invert add_noise: x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        a, b = self._at(self.sqrt_recip_alpha_bar, t, x_t), self._at(self.sqrt_recipm1_alpha_bar, t, x_t)
        return a * x_t - b * eps

    def predict_eps(self, x_t, x0, t):
        """The eps that add_noise would need to turn x0 into x_t."""
        a, b = self._at(self.sqrt_recip_alpha_bar, t, x_t), self._at(self.sqrt_recipm1_alpha_bar, t, x_t)
        return (a * x_t - x0) / b

    def posterior(self, x0, x_t, t):
        """Mean and variance of q(x_{t-1} | x_t, x0)."""
        mean = self._at(self.posterior_coef_x0, t, x_t) * x0 + self._at(self.posterior_coef_xt, t, x_t) * x_t
        return mean, self._at(self.posterior_var, t, x_t)

    # ------------------------------------------------------------------ samplers
    def ddim_step(self, x_t, eps, t, t_prev, clip: bool = True):
        """Deterministic DDIM step (eta=0) from t to t_prev < t; t_prev = -1 returns the x0 estimate."""
        x0 = self.predict_x0(x_t, eps, t)
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = self.predict_eps(x_t, x0, t)  # keep eps consistent with the clipped x0
        t_prev = t_prev.long() + 1 if torch.is_tensor(t_prev) else int(t_prev) + 1
        ab_prev = self._at(self.alpha_bar_ext, t_prev, x_t)
        return ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps

    def respace(self, t_start: int, steps: int) -> list[int]:
        """`steps` distinct timesteps, descending, the first exactly t_start.

        They split the t_start + 1 steps down to the clean image evenly: with t_start=60 and
        steps=5 that is [60, 48, 36, 24, 12], and the last DDIM step goes from 12 to clean.
        """
        if not 0 <= t_start < self.timesteps:
            raise ValueError(f"t_start must be in [0, {self.timesteps}), got {t_start}")
        if not 1 <= steps <= t_start + 1:
            raise ValueError(f"steps must be in [1, t_start + 1 = {t_start + 1}], got {steps}")
        n = t_start + 1
        # ceil(n * k / steps) - 1 for k = steps..1; consecutive values differ by >= 1 as steps <= n
        return [-(-n * k // steps) - 1 for k in range(steps, 0, -1)]

    def denoise(self, model, x_t, t_start: int, steps: int, clip: bool = True,
                guide: torch.Tensor | None = None, guidance: float = 0.0, recompute: bool = False):
        """Strided DDIM from x_t at t_start back to a clean image with `steps` model calls.

        With `guide` (the input image) and `guidance` w > 0, each step is conditioned on the
        input as in DDAD (Mousakhan et al. 2023): eps <- eps - w sqrt(1 - abar_t) (y_t - x_t),
        where y_t is the guide noised with the model's own eps. Normal texture is then kept
        even from a high noise level, which alone would re-draw it, while a defect, far from
        anything the model knows, is still healed.
        Differentiable: the caller decides on torch.no_grad (the GAN backpropagates through it).
        recompute=True recomputes each model call's activations in the backward pass instead of
        storing them (large images on a GPU); the result is the same.
        """
        ts = self.respace(t_start, steps)
        x = x_t
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            eps = checkpoint(model, x, t_batch, use_reentrant=False) if recompute else model(x, t_batch)
            x = self.ddim_step(x, self._guided(eps, x, t, guide, guidance), t, t_prev, clip=clip)
        return x

    def _guided(self, eps, x_t, t: int, guide, guidance: float):
        """DDAD's conditioning of the model's eps on the input `guide` (see denoise); eps unchanged without it."""
        if guide is None or guidance <= 0:
            return eps
        y_t = self.add_noise(guide, eps, t)
        return eps - guidance * self._at(self.sqrt_one_minus_alpha_bar, t, x_t) * (y_t - x_t)

    def ancestral(self, model, x_t, t_start: int, generator: torch.Generator, clip: bool = True,
                  guide: torch.Tensor | None = None, guidance: float = 0.0):
        """AnoDDPM's sampler: the full ancestral DDPM chain from x_t at t_start down to a clean image,
        t_start + 1 model calls, each step sampling the posterior with fresh Gaussian noise drawn
        from the CPU `generator` (none at the last step). Guidance as in `denoise`. The reference
        that `denoise`'s few DDIM steps are measured against (bench/bench.py)."""
        if not 0 <= t_start < self.timesteps:
            raise ValueError(f"t_start must be in [0, {self.timesteps}), got {t_start}")
        x = x_t
        for t in range(t_start, -1, -1):
            t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            eps = self._guided(model(x, t_batch), x, t, guide, guidance)
            x0 = self.predict_x0(x, eps, t)
            mean, var = self.posterior(x0.clamp(-1, 1) if clip else x0, x, t)
            if t > 0:
                z = torch.randn(tuple(x.shape), generator=generator).to(device=x.device, dtype=x.dtype)
                mean = mean + var.sqrt() * z
            x = mean
        return x
