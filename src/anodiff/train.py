"""One DDPM training loop for both DDPM stages (the loss is its argument).

`pretrain_ddpm` calls it with loss="mse", `train_robust_ddpm` with robust.loss; everything
else (network, budget, data, noise, seed) is the same, so a metrics diff isolates the loss.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from anodiff import distributed
from anodiff.errors import TrainingDiverged
from anodiff.losses import per_sample, reduce
from anodiff.noise import for_batch
from anodiff.runtime import autocast_dtype, pick_device


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
        # one fused call over every tensor (the same lerp, element by element, as a loop of lerp_)
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1 - d)
        for avg, new in zip(self.model.buffers(), model.buffers()):
            avg.copy_(new)


def random_crop(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A random size x size window of each image in x (B, C, H, W), offsets from `generator`."""
    B, _, H, W = x.shape
    top = torch.randint(0, H - size + 1, (B,), generator=generator).tolist()
    left = torch.randint(0, W - size + 1, (B,), generator=generator).tolist()
    return torch.stack([img[:, i:i + size, j:j + size] for img, i, j in zip(x, top, left)])


def train_ddpm(model, schedule, images, *, loss: str, noise: str, generator: torch.Generator, epochs: int,
               batch_size: int, lr: float, grad_clip: float, ema_decay: float, train_crop: int,
               noise_kw: dict | None = None, huber_delta: float = 1.0, lts_keep: float = 1.0, device=None,
               stage_name: str = "train", progress: bool = True, snapshots=None, amp: bool = False,
               channels_last: bool = False, lr_schedule: str = "constant") -> TrainResult:
    """Train `model` (in place) to predict the `noise` ('gaussian' or 'simplex', with `noise_kw`)
    added to `images` (N, C, H, W) in [-1, 1], with Adam, clipped gradients and an EMA copy.

    train_crop > 0 trains on a random crop of that side per image (the UNet must then be fully
    convolutional, i.e. no attention, to run on whole images later). All randomness (shuffling,
    crops, t, noise) comes from the CPU `generator`, so a seed gives bit-identical weights on CPU.
    Raises TrainingDiverged on a NaN/Inf loss. `snapshots` (resume.Snapshots) saves the state at
    epochs' ends and, when its file matches, resumes from it: a killed run, rerun, ends with the
    weights of an uninterrupted one. Without it nothing is written to disk here.

    Under torchrun (anodiff.distributed) each rank trains on its share of the same global batch,
    with DistributedDataParallel; only rank 0 writes snapshots.

    `lr_schedule`: "constant", or "cosine" (torch's CosineAnnealingLR from `lr` down to 0 over
    every step of the run, stepped after each optimiser step).

    `amp`: the forward pass under autocast, in bfloat16 (float16 with a gradient scaler on a GPU
    without bfloat16); the loss and the weights stay float32. `channels_last`: the network and
    its inputs in NHWC memory layout (faster convolutions on tensor-core GPUs). Both off by
    default; the stages turn them on with a GPU (params `ddpm.amp`, `ddpm.channels_last`). On CUDA
    the loop never waits for the GPU mid-epoch: the losses are read, and checked, once an epoch,
    and images/s is the epoch's.
    """
    device = torch.device(device) if device is not None else pick_device()
    layout = torch.channels_last if channels_last else torch.preserve_format
    model.to(device, memory_format=layout).train()
    half = autocast_dtype(device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and half == torch.float16)
    lazy = device.type == "cuda"  # no per-step synchronisation
    rank, ranks = distributed.world()
    net = distributed.wrap(model, device) if ranks > 1 else model
    schedule.to(device)
    noise_kw = noise_kw or {}
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    ema = EMA(model, ema_decay)
    n, bs, crop = images.shape[0], batch_size, train_crop
    if crop and crop >= min(images.shape[-2:]):
        crop = 0  # a crop as large as the image is the whole image
    if crop and noise == "simplex":
        # simplex feature sizes scale with the image, not the crop: same noise as at inference
        noise_kw = {"image_size": images.shape[-2], **noise_kw}
    if n == 0:
        raise ValueError(f"{stage_name}: no training images")
    steps_per_epoch = math.ceil(n / bs)  # the last batch may be smaller; it is still used
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"{stage_name}: lr_schedule {lr_schedule!r} is not constant or cosine")
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch) \
        if lr_schedule == "cosine" else None
    rows, last_finite, step, first_epoch, before = [], None, 0, 0, 0.0
    state = snapshots.load() if snapshots is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        ema.model.load_state_dict(state["ema"])
        ema.updates = state["ema_updates"]
        generator.set_state(state["rng"])
        rows, last_finite = [tuple(r) for r in state["rows"]], state["last_finite"]
        step, first_epoch, before = state["step"], state["epoch"], state["seconds"]
    started = time.perf_counter()
    bar = tqdm(total=epochs * steps_per_epoch, initial=step, desc=stage_name, disable=not progress,
               unit="step", dynamic_ncols=True)
    def check(loss_value: float, at_step: int) -> None:
        if not math.isfinite(loss_value):
            bar.close()
            last = "none" if last_finite is None else f"{last_finite:.6g}"
            raise TrainingDiverged(f"{stage_name}: loss became {loss_value} at step {at_step}; "
                                   f"last finite loss {last}; checkpoint not written")

    for epoch in range(first_epoch, epochs):
        order = torch.randperm(n, generator=generator)
        pending, epoch_tick = [], time.perf_counter()  # CUDA: (step, loss on the GPU, images), read at the end
        for first in range(0, n, bs):
            tick = time.perf_counter()
            x0 = images[order[first:first + bs]]  # (b, C, H, W), b <= bs
            if crop:
                x0 = random_crop(x0, crop, generator)  # (b, C, crop, crop)
            x0 = x0.to(device, memory_format=layout)
            b = x0.shape[0]
            t = torch.randint(0, schedule.timesteps, (b,), generator=generator).to(device)
            eps = for_batch(x0, generator, kind=noise, simplex_kw=noise_kw)
            with torch.autocast(device.type, dtype=half, enabled=amp):
                if ranks > 1:  # this rank's share of the global batch; the loss is the global batch's
                    value, loss_t = distributed.step_loss(net, schedule, x0, eps, t, loss, huber_delta, lts_keep)
                else:
                    pred = model(schedule.add_noise(x0, eps, t), t)
                    value = reduce(per_sample(pred.float() if amp else pred, eps, loss, delta=huber_delta), loss,
                                   keep=lts_keep)
                    loss_t = value.detach()
            if not lazy:
                loss_value = loss_t.item()
                check(loss_value, step + 1)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(value).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if scheduler is not None:
                scheduler.step()
            ema.update(model)
            step += 1
            if lazy:
                pending.append((step, loss_t, b))
                bar.update()
                continue
            last_finite = loss_value
            rate = b / max(time.perf_counter() - tick, 1e-9)
            rows.append((step, epoch, loss_value, rate))
            bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{rate:.1f}")
            bar.update()
        if pending:  # one synchronisation an epoch
            values = torch.stack([v for _, v, _ in pending]).float().cpu().tolist()
            rate = sum(b for _, _, b in pending) / max(time.perf_counter() - epoch_tick, 1e-9)
            for (at_step, _, _), loss_value in zip(pending, values):
                check(loss_value, at_step)
                last_finite = loss_value
                rows.append((at_step, epoch, loss_value, rate))
            bar.set_postfix(loss=f"{values[-1]:.4f}", img_s=f"{rate:.1f}")
        if snapshots is not None and epoch + 1 < epochs and rank == 0:
            snapshots.maybe_save(lambda: {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema.model.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "ema_updates": ema.updates, "rng": generator.get_state(), "rows": rows, "last_finite": last_finite,
                "step": step, "epoch": epoch + 1, "seconds": before + time.perf_counter() - started})
    bar.close()
    seconds = before + time.perf_counter() - started
    history = pd.DataFrame(rows, columns=["step", "epoch", "loss", "images_per_s"])
    last_epoch = history[history.epoch == history.epoch.max()]
    summary = {"final_loss": float(last_epoch.loss.mean()), "seconds": seconds,
               "images_per_s": epochs * n / seconds, "steps": step}
    return TrainResult(ema.model, history, summary, model, optimizer)
