"""The one inference path of `infer`, `anodiff predict` and GAN model selection: maps and scores.

Raw maps per noise level (`Detector.raw_maps`), their calibration, final maps and image scores.

anomalib's users met scores that differed between its training and export paths because they
were two pieces of code; here all three call `Detector.raw_maps` (and `infer` and predict `finish`).

Names: a GAN's noise network is a `NoiseModel` (the net, and the level `t` and DDIM `steps` it was
trained for), loaded from `noise_model_path`; `rng` is always a torch random-number generator.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from anodiff import anomaly, checkpoint, config, noise
from anodiff.runtime import (  # noqa: F401  (image_rngs, NOISE_OFFSET: part of this module's API)
    NOISE_OFFSET, autocast_dtype, image_rngs, memory_format, noise_rng)
from anodiff.config import Infer
from anodiff.errors import CheckpointError
from anodiff.noisegen import NoiseGenerator
from anodiff.schedule import Schedule
from anodiff.unet import UNet


class NoiseModel(NamedTuple):
    """A GAN's noise network and the level it was trained for: its maps use its noise at noise
    level `t`, denoised in `steps` DDIM steps, unguided."""

    net: torch.nn.Module
    t: int
    steps: int


@dataclass
class Detector:
    model: torch.nn.Module
    schedule: Schedule
    settings: Infer  # the infer.* params that shape a map (stored with the maps so predict reuses them)
    image_size: int
    channels: int
    noise_model: NoiseModel | None = None  # the GAN's noise network and its level, if any
    noise_kind: str = "gaussian"
    noise_kw: dict = field(default_factory=dict)
    map_cal: anomaly.Calibration | None = None  # fitted by calibrate(), or restored by set_stats_arrays()
    score_cal: anomaly.Calibration | None = None
    full_chain: bool = False  # AnoDDPM's full ancestral chain instead of DDIM steps (bench/bench.py's reference)
    # a level's noise draws reconstructed as one batch (None: on CUDA, where that is faster; on a
    # 2-core CPU one batch of 64 ran at 19 images/s against 35 for 16, so the draws go one by one)
    batch_draws: bool | None = None
    # the pretrained extractor of `settings.error: feature` (DDAD's feature-space distance)
    extractor: torch.nn.Module | None = None

    @classmethod
    def load(cls, ddpm_path, settings: Infer, noise_model_path=None, device="cpu",
             expect_arch: dict | None = None) -> "Detector":
        """From checkpoint files: the DDPM and, for `gan`, the GAN's noise network
        (`noise_model_path`, data/models/gan_generator.pt). `expect_arch` (e.g. {"in_channels":
        data.channels}) is compared with the DDPM's stored architecture, and the noise network
        must match the DDPM's channels."""
        model, ckpt = checkpoint.load(ddpm_path, UNet, device=device, expect_arch=expect_arch)
        noise_model = None
        if noise_model_path is not None:
            net, gckpt = checkpoint.load(noise_model_path, NoiseGenerator, device=device)
            if gckpt["arch"].get("channels") != ckpt["arch"].get("in_channels"):
                raise CheckpointError(f"{noise_model_path}: generator has {gckpt['arch'].get('channels')} channels but "
                                      f"the DDPM {ddpm_path} has {ckpt['arch'].get('in_channels')}; "
                                      f"rerun `dvc repro train_gan_noise`")
            meta = gckpt.get("meta", {})
            if not all(type(meta.get(k)) is int and meta[k] >= 1 for k in ("t", "denoise_steps")):
                raise CheckpointError(f"{noise_model_path}: generator checkpoint has no valid 't' and 'denoise_steps' "
                                      f"in its meta; rerun `dvc repro train_gan_noise`")
            noise_model = NoiseModel(net, meta["t"], meta["denoise_steps"])
        return cls.from_models(model, ckpt, settings, noise_model, where=ddpm_path)

    @classmethod
    def from_models(cls, model, ckpt: dict, settings: Infer, noise_model: NoiseModel | None = None,
                    where="the DDPM") -> "Detector":
        """From a loaded DDPM (`ckpt` its checkpoint dict) and optionally a GAN's `NoiseModel`;
        the GAN's model selection (gan_selection) builds its detector this way."""
        meta = ckpt.get("meta", {})
        if "schedule" not in meta:
            raise CheckpointError(f"{where}: checkpoint has no schedule metadata; rerun its training stage")
        try:
            schedule = Schedule(**meta["schedule"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: checkpoint's schedule metadata {meta['schedule']!r} is not valid "
                                  f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}); "
                                  "rerun its training stage") from None
        arch = ckpt["arch"]
        device = next(model.parameters()).device
        det = cls(model=model, schedule=schedule.to(device), settings=settings,
                  image_size=int(arch["image_size"]), channels=int(arch["in_channels"]),
                  noise_kind=meta.get("noise", "gaussian"), noise_kw=dict(meta.get("noise_kw", {})))
        if noise_model is not None:
            det.noise_model = NoiseModel(*noise_model)
        return det

    def with_noise_net(self, net: torch.nn.Module) -> "Detector":
        """This detector with another noise network at the same level (the DDPM, settings and
        calibrations shared, nothing copied): the GAN's model selection draws each candidate's
        maps this way, leaving this detector as it is."""
        if self.noise_model is None:
            raise ValueError("with_noise_net needs a detector with a noise model (a GAN's)")
        return dataclasses.replace(self, noise_model=self.noise_model._replace(net=net))

    @property
    def device(self):
        return next(self.model.parameters()).device

    def plan(self) -> list[tuple[int, int, float]]:
        """(t_start, steps, guidance) of every reconstruction averaged into one map: each level of
        `settings.plan()`, `settings.n_seeds` times.

        With a noise model (a GAN's) the map is the `ddpm` method's map with its noise at its
        own level: the level at its t takes its steps, unguided (its noise was learned for that
        denoising), or is added first when the plan has no level at that t. The SemanticDiffGAN
        paper's network (not residual) draws no noise, so its level is reconstructed once."""
        levels = list(self.settings.plan())
        noise_model = self.noise_model
        if noise_model is not None:
            own = (noise_model.t, noise_model.steps, 0.0)
            if any(t == own[0] for t, _, _ in levels):
                levels = [own if level[0] == own[0] else level for level in levels]
            else:
                levels = [own] + levels
        out = []
        for level in levels:
            once = noise_model is not None and level[0] == noise_model.t and not noise_model.net.residual
            out += [level] * (1 if once else self.settings.n_seeds)
        return out

    @staticmethod
    def noise_rng(seed: int) -> torch.Generator:
        """The torch random-number generator `infer` and `anodiff predict` both draw a map's noise
        from, for params `seed`."""
        return noise_rng(seed)

    def make_noise(self, x: torch.Tensor, rng, t: int | None = None) -> torch.Tensor:
        """The noise x is noised with at level t: the noise model's at its own level, whatever the
        DDPM was trained on (it corrects Gaussian noise); the DDPM's training noise elsewhere. A
        residual noise network draws its Gaussian noise exactly as the DDPM's noise is drawn, so
        one that adds no correction gives the `ddpm` method's maps bit for bit.

        `rng`: one torch.Generator for the batch, or a list of them, one per image (each image's
        own stream: see `image_rngs`)."""
        noise_model = self.noise_model
        own = noise_model is not None and (t is None or t == noise_model.t)
        if isinstance(rng, torch.Generator):
            if own:
                return noise.for_batch(x, rng, net=noise_model.net)
            return noise.for_batch(x, rng, kind=self.noise_kind, simplex_kw=self.noise_kw)
        if own and not noise_model.net.residual:
            return noise.for_batch(x, rng[0], net=noise_model.net)  # draws nothing
        kind = "gaussian" if own else self.noise_kind
        eps = torch.cat([noise.for_batch(x[i:i + 1], g, kind=kind, simplex_kw=self.noise_kw)
                         for i, g in enumerate(rng)])
        return noise_model.net(x, eps) if own else eps

    def levels(self) -> list[int]:
        """The distinct noise levels of the plan, in order: the T axis of raw maps."""
        return list(dict.fromkeys(t for t, _, _ in self.plan()))

    @torch.no_grad()
    def raw_maps(self, images: torch.Tensor, rng: torch.Generator, progress: bool = True,
                 desc: str = "infer", only: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Smoothed, uncalibrated maps (N, T, H, W), one per noise level (each the mean over its
        noise draws), and the first reconstruction (N, C, H, W). Each image's noise comes from its
        own stream, seeded by one draw of `rng` and its pixels (`image_rngs`). `only`: just
        these levels (T of them, in plan order), as the GAN's model selection recomputes the noise
        model's level alone."""
        self.model.eval()
        layout = torch.channels_last if config.accelerated(self.settings.channels_last, self.device) else None
        # the model in that layout for these maps only: it may be shared (train_gan_noise trains G through
        # the same DDPM, and an inference setting must not change how training computes)
        before = memory_format(self.model) if layout is not None else None
        if layout is not None and before != layout:
            self.model.to(memory_format=layout)
        try:
            return self._raw_maps(images, rng, progress, desc, only, layout)
        finally:
            if layout is not None and before != layout:
                self.model.to(memory_format=before)

    def _raw_maps(self, images, rng, progress, desc, only, layout):
        amp = config.accelerated(self.settings.amp, self.device, precision=True)
        cuda = self.device.type == "cuda"
        half = autocast_dtype(self.device)
        maps, recons = [], []
        bs = self.settings.batch_size
        together = (cuda if self.batch_draws is None else self.batch_draws) and not self.full_chain
        plan, levels = self.plan(), self.levels()
        if only is not None:
            plan = [p for p in plan if p[0] in only]
            levels = [t for t in levels if t in only]
        streams = image_rngs(images, rng)
        for start in tqdm(range(0, len(images), bs), desc=desc, unit="batch", disable=not progress):
            x = images[start:start + bs].to(self.device, memory_format=layout or torch.preserve_format)
            rngs = streams[start:start + bs]
            acc = torch.zeros(x.shape[0], len(levels), *x.shape[-2:], device=x.device)
            features = None
            if self.settings.error == "feature":
                if self.extractor is None:
                    raise ValueError("infer.error: feature needs the detector's feature extractor")
                features = (self.extractor(x.contiguous()), self.extractor)
            count = [0] * len(levels)
            first = None
            for (t, steps, guidance), k in self._runs(plan, together):
                # the noises in the plan's order, one draw after another, batched or not
                noises = torch.cat([self.make_noise(x, rngs, t) for _ in range(k)])
                with torch.autocast(self.device.type, dtype=half, enabled=amp):
                    x_hats = anomaly.reconstruct(self.model, self.schedule, x.repeat(k, 1, 1, 1), noises, t, steps,
                                                 guidance=guidance,
                                                 ancestral=rng if self.full_chain else None).float()
                i = levels.index(t)
                for x_hat in x_hats.split(x.shape[0]):
                    acc[:, i:i + 1] += anomaly.error_map(x, x_hat, self.settings.error, features)
                    count[i] += 1
                    first = x_hat if first is None else first
            acc = acc / torch.tensor(count, dtype=acc.dtype, device=acc.device).view(1, -1, 1, 1)
            maps.append(anomaly.smooth(acc, self.settings.sigma).cpu())
            recons.append(first.cpu())
        return torch.cat(maps), torch.cat(recons)

    @staticmethod
    def _runs(plan, together: bool):
        """The plan as (level, draws) runs: each level's consecutive draws as one run when `together`,
        else one run a draw. The noise is drawn in the plan's order either way."""
        runs = []
        for level in plan:
            if together and runs and runs[-1][0] == level:
                runs[-1][1] += 1
            else:
                runs.append([level, 1])
        return [tuple(r) for r in runs]

    def calibrate(self, normal_raw: torch.Tensor, map_kind: str | None = None, score_kind: str | None = None) -> None:
        """Fit the map's and the image score's calibrations on normal val maps (M, T, H, W).

        Kinds default to `settings.normalize`; `infer` passes the ones chosen on val
        (calibration_choice.py)."""
        map_kind = map_kind or self.settings.normalize
        score_kind = score_kind or map_kind
        self.map_cal = anomaly.Calibration.named(map_kind)
        self.score_cal = self.map_cal if score_kind == map_kind else anomaly.Calibration.named(score_kind)
        for cal in {id(self.map_cal): self.map_cal, id(self.score_cal): self.score_cal}.values():
            if cal.kind in anomaly.CALIBRATED:
                cal.fit(self._view(normal_raw, cal))

    def uses_memory(self) -> bool:
        """Whether a calibration fuses the memory distance (then raw maps must carry it last)."""
        return any(c is not None and c.memory for c in (self.map_cal, self.score_cal))

    def _view(self, raw: torch.Tensor, cal: anomaly.Calibration) -> torch.Tensor:
        """The levels of raw (N, T[+1], H, W) that `cal` reads: the noise levels, plus the memory
        distance (the last level) for a fused calibration."""
        n = len(self.levels())
        if cal.memory:
            if raw.shape[1] != n + 1:
                raise ValueError(f"calibration {cal.name} needs the {n} noise levels and the memory distance, "
                                 f"got {raw.shape[1]} maps")
            return raw
        return raw[:, :n]

    def finish(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Calibrated maps (N, 1, H, W) and image scores (N,) from raw maps (N, T, H, W).

        The image score is a statistic of the score calibration's map, which may differ from
        the map's: a position-free calibration can rank images best while per-image
        standardisation draws the sharpest maps."""
        if self.map_cal is None or not self.map_cal.fitted:
            final = raw[:, :len(self.levels())].mean(dim=1, keepdim=True)
            return final, anomaly.image_scores(final, self.settings.score, self.settings.topk)
        final = self.map_cal.apply(self._view(raw, self.map_cal))
        score_map = final if self.score_cal is self.map_cal else self.score_cal.apply(self._view(raw, self.score_cal))
        return final, anomaly.image_scores(score_map, self.settings.score, self.settings.topk)

    def calibration_kinds(self) -> dict:
        return {"map": self.map_cal.name if self.map_cal else None,
                "score": self.score_cal.name if self.score_cal else None}

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
