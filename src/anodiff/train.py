"""One DDPM training loop for both DDPM stages (the loss is its argument), and checkpoints.

`pretrain_ddpm` calls it with loss="mse", `train_robust_ddpm` with robust.loss; everything
else (network, budget, data, noise, seed) is the same, so a metrics diff isolates the loss.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from anodiff import io
from anodiff.errors import CheckpointError, TrainingDiverged
from anodiff.losses import per_sample, reduce
from anodiff.noise import make_noise
from anodiff.unet import UNet

CHECKPOINT_FORMAT = "anodiff.ddpm/1"


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class TrainResult:
    ema_model: torch.nn.Module  # the EMA copy, in eval mode: use it for inference
    history: pd.DataFrame  # one row per optimiser step: step, epoch, loss, images_per_s
    summary: dict  # final_loss (mean of the last epoch), seconds, images_per_s, steps
    model: torch.nn.Module  # the raw trained weights (also the `model` passed in)
    optimizer: torch.optim.Optimizer


class EMA:
    """Exponential moving average of a model's weights.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates: our CPU runs are a
    few hundred steps, and with a fixed 0.995 the random initial weights would still carry
    about 0.995^400 = 13% of the average at the end.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for avg, new in zip(self.model.parameters(), model.parameters()):
            avg.lerp_(new, 1 - d)
        for avg, new in zip(self.model.buffers(), model.buffers()):
            avg.copy_(new)


def random_crop(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A random size x size window of each image in x (B, C, H, W), offsets from `generator`."""
    B, _, H, W = x.shape
    top = torch.randint(0, H - size + 1, (B,), generator=generator).tolist()
    left = torch.randint(0, W - size + 1, (B,), generator=generator).tolist()
    return torch.stack([img[:, i:i + size, j:j + size] for img, i, j in zip(x, top, left)])


def train_ddpm(model, schedule, images, *, loss: str, noise: str, cfg, generator: torch.Generator,
               device=None, stage_name: str = "train", huber_delta: float = 1.0, lts_keep: float = 1.0,
               noise_kw: dict | None = None, progress: bool = True) -> TrainResult:
    """Train `model` (in place) to predict the noise added to `images` (N, C, H, W) in [-1, 1].

    cfg: epochs, batch_size, lr, grad_clip, ema_decay, and optionally train_crop (> 0: train
    on a random crop of that side per image; the UNet must then be fully convolutional, i.e.
    no attention, to run on whole images later). All randomness (shuffling, crops, t, noise)
    comes from the CPU `generator`, so a seed gives bit-identical weights on CPU.
    Raises TrainingDiverged on a NaN/Inf loss; nothing is written to disk here.
    """
    device = torch.device(device) if device is not None else pick_device()
    model.to(device).train()
    schedule.to(device)
    noise_kw = noise_kw or {}
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    ema = EMA(model, cfg.ema_decay)
    n, bs = images.shape[0], cfg.batch_size
    crop = getattr(cfg, "train_crop", 0)
    if crop and crop >= min(images.shape[-2:]):
        crop = 0  # a crop as large as the image is the whole image
    if crop and noise == "simplex":
        # simplex feature sizes scale with the image, not the crop: same noise as at inference
        noise_kw = {"image_size": images.shape[-2], **noise_kw}
    if n == 0:
        raise ValueError(f"{stage_name}: no training images")
    steps_per_epoch = math.ceil(n / bs)  # the last batch may be smaller; it is still used
    rows, last_finite, step = [], None, 0
    started = time.perf_counter()
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=stage_name, disable=not progress,
               unit="step", dynamic_ncols=True)
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=generator)
        for first in range(0, n, bs):
            tick = time.perf_counter()
            x0 = images[order[first:first + bs]]  # (b, C, H, W), b <= bs
            if crop:
                x0 = random_crop(x0, crop, generator)  # (b, C, crop, crop)
            x0 = x0.to(device)
            b = x0.shape[0]
            t = torch.randint(0, schedule.timesteps, (b,), generator=generator).to(device)
            eps = make_noise(noise, x0.shape, generator, device=device, **noise_kw)
            pred = model(schedule.add_noise(x0, eps, t), t)
            value = reduce(per_sample(pred, eps, loss, delta=huber_delta), loss, keep=lts_keep)
            loss_value = value.item()
            if not math.isfinite(loss_value):
                bar.close()
                last = "none" if last_finite is None else f"{last_finite:.6g}"
                raise TrainingDiverged(f"{stage_name}: loss became {loss_value} at step {step + 1}; "
                                       f"last finite loss {last}; checkpoint not written")
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            ema.update(model)
            step += 1
            last_finite = loss_value
            if device.type == "cuda":
                torch.cuda.synchronize()  # honest images/s: wait for the queued kernels
            rate = b / max(time.perf_counter() - tick, 1e-9)
            rows.append((step, epoch, loss_value, rate))
            bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{rate:.1f}")
            bar.update()
    bar.close()
    seconds = time.perf_counter() - started
    history = pd.DataFrame(rows, columns=["step", "epoch", "loss", "images_per_s"])
    last_epoch = history[history.epoch == history.epoch.max()]
    summary = {"final_loss": float(last_epoch.loss.mean()), "seconds": seconds,
               "images_per_s": cfg.epochs * n / seconds, "steps": step}
    return TrainResult(ema.model, history, summary, model, optimizer)


# ---------------------------------------------------------------- checkpoints
def _cpu(state):
    """A state dict with every tensor on the CPU, so the file loads anywhere."""
    if torch.is_tensor(state):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: _cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_cpu(v) for v in state)
    return state


def save_ddpm(path, model, ema, optimizer, step: int, generator_state: torch.Tensor, arch: dict,
              train_meta: dict) -> dict:
    """Write a checkpoint atomically (the previous file survives any failure) and return it.

    Holds only tensors, dicts, lists, numbers and strings, so it loads with weights_only=True.
    """
    ema_model = ema.model if isinstance(ema, EMA) else ema
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "arch": dict(arch),
        "weights": _cpu(model.state_dict()),
        "ema": _cpu(ema_model.state_dict()),
        "optimizer": _cpu(optimizer.state_dict()),
        "step": int(step),
        "rng": {"torch_generator": generator_state.detach().cpu().to(torch.uint8)},
        "meta": dict(train_meta),
    }
    io.save_checkpoint(path, ckpt)
    return ckpt


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def load_ddpm(path, expect_arch: dict | None = None, device="cpu"):
    """-> (EMA UNet in eval mode on `device`, checkpoint dict). Refuses a checkpoint whose
    stored architecture differs from `expect_arch`, naming the differing keys."""
    ckpt = io.load_checkpoint(path)
    missing = [k for k in ("arch", "ema") if k not in ckpt]
    if ckpt.get("format") != CHECKPOINT_FORMAT or missing:
        raise CheckpointError(f"{path}: not an anodiff DDPM checkpoint "
                              f"(format {ckpt.get('format')!r}, missing {missing or 'nothing'})")
    arch = ckpt["arch"]
    if expect_arch is not None:
        keys = sorted(set(arch) | set(expect_arch))
        diff = [f"{k}: checkpoint {arch.get(k)!r} != expected {expect_arch.get(k)!r}"
                for k in keys if _plain(arch.get(k)) != _plain(expect_arch.get(k))]
        if diff:
            raise CheckpointError(f"{path}: built for a different model config ({'; '.join(diff)}); "
                                  "rerun its training stage")
    try:
        model = UNet.from_arch(arch)
        model.load_state_dict(ckpt["ema"])
    except (TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path}: EMA weights do not fit the stored architecture ({first})") from None
    return model.to(device).eval(), ckpt
