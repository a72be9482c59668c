"""One inference pathway for the pipeline's `infer` stage and for `anodiff predict`.

anomalib's users met scores that differed between its training and export paths because they
were two pieces of code (anomalib #2747); here both call `Detector.raw_maps` and `finish`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from anodiff import anomaly, gan, noise
from anodiff.errors import CheckpointError
from anodiff.schedule import Schedule
from anodiff.train import load_ddpm


@dataclass
class InferSettings:
    """The infer.* params that shape a map (stored with the maps so predict reuses them)."""

    t_start: int = 60
    steps: int = 5
    t_starts: tuple = ()
    n_seeds: int = 1
    error: str = "abs"
    sigma: float = 2.0
    normalize: str = "image"  # none | pixel | image (see anomaly.py)
    score: str = "topk"
    topk: float = 0.01
    batch_size: int = 16

    @classmethod
    def from_config(cls, cfg) -> "InferSettings":
        return cls(**{k: getattr(cfg, k) for k in cls.__dataclass_fields__})

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


@dataclass
class Detector:
    model: torch.nn.Module
    schedule: Schedule
    settings: InferSettings
    image_size: int
    channels: int
    generator_net: torch.nn.Module | None = None  # the GAN's noise generator, if any
    noise_kind: str = "gaussian"
    noise_kw: dict = field(default_factory=dict)
    fixed_t: tuple[int, int] | None = None  # (t, steps) the GAN generator was trained for
    stats: anomaly.NormalStats | None = None

    @classmethod
    def load(cls, ddpm_path, settings: InferSettings, generator_path=None, device="cpu") -> "Detector":
        model, ckpt = load_ddpm(ddpm_path, device=device)
        meta = ckpt.get("meta", {})
        if "schedule" not in meta:
            raise CheckpointError(f"{ddpm_path}: checkpoint has no schedule metadata; rerun its training stage")
        arch = ckpt["arch"]
        det = cls(model=model, schedule=Schedule(**meta["schedule"]).to(device), settings=settings,
                  image_size=int(arch["image_size"]), channels=int(arch["in_channels"]),
                  noise_kind=meta.get("noise", "gaussian"), noise_kw=dict(meta.get("noise_kw", {})))
        if generator_path is not None:
            net, gckpt = gan.load_generator(generator_path, device=device)
            gmeta = gckpt["meta"]
            det.generator_net = net
            det.fixed_t = (int(gmeta["t"]), int(gmeta["denoise_steps"]))
        return det

    @property
    def device(self):
        return next(self.model.parameters()).device

    def plan(self) -> list[tuple[int, int]]:
        """(t_start, steps) of every reconstruction averaged into one map."""
        if self.generator_net is not None:
            return [self.fixed_t] * (self.settings.n_seeds if self.generator_net.residual else 1)
        s = self.settings
        return [(t, s.steps) for t in (s.t_starts or (s.t_start,)) for _ in range(s.n_seeds)]

    def make_noise(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.generator_net is not None:
            return gan.noise_for(self.generator_net, x, generator)
        return noise.make_noise(self.noise_kind, tuple(x.shape), generator, **self.noise_kw).to(x.device)

    @torch.no_grad()
    def raw_maps(self, images: torch.Tensor, generator: torch.Generator, progress: bool = True,
                 desc: str = "infer") -> tuple[torch.Tensor, torch.Tensor]:
        """Smoothed, unnormalised maps (N,1,H,W) and the first reconstruction (N,C,H,W)."""
        self.model.eval()
        maps, recons = [], []
        bs = self.settings.batch_size
        for start in tqdm(range(0, len(images), bs), desc=desc, unit="batch", disable=not progress):
            x = images[start:start + bs].to(self.device)
            acc, first = 0.0, None
            for t, steps in self.plan():
                x_hat = anomaly.reconstruct(self.model, self.schedule, x, self.make_noise(x, generator), t, steps)
                acc = acc + anomaly.error_map(x, x_hat, self.settings.error, model=self.model)
                first = x_hat if first is None else first
            maps.append(anomaly.smooth(acc / len(self.plan()), self.settings.sigma).cpu())
            recons.append(first.cpu())
        return torch.cat(maps), torch.cat(recons)

    def fit_stats(self, normal_raw_maps: torch.Tensor) -> None:
        if self.settings.normalize == "pixel":
            self.stats = anomaly.NormalStats.fit(normal_raw_maps)

    def finish(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised maps and image scores from raw maps."""
        if self.settings.normalize == "image":
            final = anomaly.standardize_per_image(raw)
        else:
            final = self.stats.normalize(raw) if self.stats is not None else raw
        return final, anomaly.image_scores(final, self.settings.score, self.settings.topk)

    def stats_arrays(self) -> dict[str, np.ndarray]:
        if self.stats is None:
            return {}
        return {"stats_mean": self.stats.mean.numpy(), "stats_std": self.stats.std.numpy()}

    def set_stats_arrays(self, arrays: dict) -> None:
        if "stats_mean" in arrays:
            self.stats = anomaly.NormalStats(torch.from_numpy(arrays["stats_mean"]),
                                             torch.from_numpy(arrays["stats_std"]))
