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
    level_steps: tuple = ()  # DDIM steps per entry of t_starts (empty: `steps` for each)
    guidance: tuple = ()  # DDAD weight per entry of t_starts (empty: 0, unconditioned, for each)
    error: str = "abs"
    sigma: float = 2.0
    normalize: str = "image"  # auto (chosen on val) or one of anomaly.CALIBRATIONS
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
    fixed_t: tuple[int, int] | None = None  # (t, steps) the GAN generator was trained for; unguided
    map_cal: anomaly.Calibration | None = None  # fitted by calibrate(), or restored by set_stats_arrays()
    score_cal: anomaly.Calibration | None = None

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

    def plan(self) -> list[tuple[int, int, float]]:
        """(t_start, steps, guidance) of every reconstruction averaged into one map.

        A GAN's noise was learned for the unconditioned denoising at its own t, so its plan is
        that, unguided."""
        if self.generator_net is not None:
            return [(*self.fixed_t, 0.0)] * (self.settings.n_seeds if self.generator_net.residual else 1)
        s = self.settings
        ts = s.t_starts or (s.t_start,)
        steps = s.level_steps or (s.steps,) * len(ts)
        guidance = s.guidance or (0.0,) * len(ts)
        return [(t, int(k), float(w)) for t, k, w in zip(ts, steps, guidance, strict=True)
                for _ in range(s.n_seeds)]

    def make_noise(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.generator_net is not None:
            return gan.noise_for(self.generator_net, x, generator)
        return noise.make_noise(self.noise_kind, tuple(x.shape), generator, **self.noise_kw).to(x.device)

    def levels(self) -> list[int]:
        """The distinct noise levels of the plan, in order: the T axis of raw maps."""
        return list(dict.fromkeys(t for t, _, _ in self.plan()))

    @torch.no_grad()
    def raw_maps(self, images: torch.Tensor, generator: torch.Generator, progress: bool = True,
                 desc: str = "infer") -> tuple[torch.Tensor, torch.Tensor]:
        """Smoothed, uncalibrated maps (N, T, H, W), one per noise level (each the mean over its
        noise draws), and the first reconstruction (N, C, H, W)."""
        self.model.eval()
        maps, recons = [], []
        bs = self.settings.batch_size
        plan, levels = self.plan(), self.levels()
        for start in tqdm(range(0, len(images), bs), desc=desc, unit="batch", disable=not progress):
            x = images[start:start + bs].to(self.device)
            acc = torch.zeros(x.shape[0], len(levels), *x.shape[-2:], device=x.device)
            count = [0] * len(levels)
            first = None
            for t, steps, guidance in plan:
                x_hat = anomaly.reconstruct(self.model, self.schedule, x, self.make_noise(x, generator), t, steps,
                                            guidance=guidance)
                i = levels.index(t)
                acc[:, i:i + 1] += anomaly.error_map(x, x_hat, self.settings.error, model=self.model)
                count[i] += 1
                first = x_hat if first is None else first
            acc = acc / torch.tensor(count, dtype=acc.dtype, device=acc.device).view(1, -1, 1, 1)
            maps.append(anomaly.smooth(acc, self.settings.sigma).cpu())
            recons.append(first.cpu())
        return torch.cat(maps), torch.cat(recons)

    def calibrate(self, normal_raw: torch.Tensor, map_kind: str | None = None, score_kind: str | None = None) -> None:
        """Fit the map's and the image score's calibrations on normal val maps (M, T, H, W).

        Kinds default to `settings.normalize`; `infer` passes the ones chosen on val (select.py)."""
        map_kind = map_kind or self.settings.normalize
        score_kind = score_kind or map_kind
        self.map_cal = anomaly.Calibration(map_kind)
        self.score_cal = self.map_cal if score_kind == map_kind else anomaly.Calibration(score_kind)
        for cal in {id(self.map_cal): self.map_cal, id(self.score_cal): self.score_cal}.values():
            if cal.kind in anomaly.CALIBRATED:
                cal.fit(normal_raw)

    def fit_stats(self, normal_raw_maps: torch.Tensor) -> None:
        """Calibrate with the fixed `settings.normalize` (not `auto`)."""
        self.calibrate(normal_raw_maps)

    @property
    def stats(self):
        """The map's fitted calibration, or None when it needs no normal images."""
        cal = self.map_cal
        return cal if cal is not None and cal.kind in anomaly.CALIBRATED else None

    def finish(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Calibrated maps (N, 1, H, W) and image scores (N,) from raw maps (N, T, H, W).

        The image score is a statistic of the score calibration's map, which may differ from
        the map's: a position-free calibration can rank images best while per-image
        standardisation draws the sharpest maps."""
        if self.map_cal is None or not self.map_cal.fitted:
            final = raw.mean(dim=1, keepdim=True)
            return final, anomaly.image_scores(final, self.settings.score, self.settings.topk)
        final = self.map_cal.apply(raw)
        score_map = final if self.score_cal is self.map_cal else self.score_cal.apply(raw)
        return final, anomaly.image_scores(score_map, self.settings.score, self.settings.topk)

    def calibration_kinds(self) -> dict:
        return {"map": self.map_cal.kind if self.map_cal else None,
                "score": self.score_cal.kind if self.score_cal else None}

    def stats_arrays(self) -> dict[str, np.ndarray]:
        out = {}
        if self.map_cal is not None:
            out.update(self.map_cal.state("stats"))
        if self.score_cal is not None and self.score_cal is not self.map_cal:
            out.update(self.score_cal.state("score"))
        return out

    def set_stats_arrays(self, arrays: dict, kinds: dict | None = None) -> None:
        kinds = kinds or {}
        map_kind = kinds.get("map") or self.settings.normalize
        score_kind = kinds.get("score") or map_kind
        self.map_cal = anomaly.Calibration.from_state(map_kind, arrays, "stats")
        self.score_cal = (self.map_cal if score_kind == map_kind
                          else anomaly.Calibration.from_state(score_kind, arrays, "score"))
