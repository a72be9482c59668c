"""The DDPM training that pretrain_ddpm and train_robust_ddpm share; only the loss differs.

The same network, data, noise, seed and budget in both, so `dvc metrics diff` between them
isolates the loss."""

from __future__ import annotations

import torch

from _common import ROOT, split_timing, torch_generator, write_timing
from _live import write_live
from anodiff import checkpoint, data, distributed, resume
from anodiff.config import accelerated, to_dict
from anodiff.noise import noise_kwargs
from anodiff.schedule import Schedule
from anodiff.runtime import pick_device
from anodiff.train import train_ddpm
from anodiff.unet import UNet

PREPARED = ROOT / "data/prepared"


def train_stage(params, stage: str, loss: str, ckpt_path, huber_delta: float = 1.0, lts_keep: float = 1.0):
    cfg = params.ddpm
    rows = data.load_rows(PREPARED)
    rows = rows[rows["ddpm_train"] == 1].reset_index(drop=True)
    images = data.load_images(PREPARED, rows, params.data.channels)
    n_anomalous = int((rows["label"] == "anomalous").sum())
    rank, ranks = distributed.world()
    if rank == 0:  # rank 0 alone speaks (and writes)
        print(f"{stage}: {len(rows)} training images ({n_anomalous} anomalous hidden among them), loss={loss}")

    # The same seed in both stages: identical initial weights, batches, t and noise.
    torch.manual_seed(params.seed)
    model = UNet.from_config(cfg, params.data.channels, images.shape[-1])
    schedule = Schedule.from_config(cfg)
    generator = torch_generator(params.seed, offset=1)
    kw = noise_kwargs(cfg.noise, cfg)
    device = pick_device()
    # killed, then rerun: go on from the last snapshot of this very run (same params, data, code)
    used = {"seed": params.seed, "channels": params.data.channels, "ddpm": to_dict(cfg), "loss": loss,
            "huber_delta": huber_delta, "lts_keep": lts_keep}
    if ranks > 1:  # under torchrun: a snapshot is of this many ranks, and every rank reads rank 0's
        used, where = {**used, "ranks": ranks}, device.type
    else:
        where = device
    snaps = resume.for_stage(ROOT, stage, used, [PREPARED], where)
    amp = accelerated(cfg.amp, device, precision=True)  # auto: on with CUDA or a CPU with native bfloat16
    result = train_ddpm(model, schedule, images, loss=loss, noise=cfg.noise, noise_kw=kw, generator=generator,
                        epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, lr_schedule=cfg.lr_schedule, grad_clip=cfg.grad_clip,
                        ema_decay=cfg.ema_decay, train_crop=cfg.train_crop, huber_delta=huber_delta,
                        lts_keep=lts_keep, device=device, stage_name=stage, snapshots=snaps, progress=rank == 0,
                        amp=amp, channels_last=accelerated(cfg.channels_last, device))
    if rank != 0:
        return  # rank 0 alone writes the checkpoint, curves and metrics
    meta = {
        "stage": stage, "loss": loss, "huber_delta": huber_delta, "lts_keep": lts_keep,
        "noise": cfg.noise, "noise_kw": kw,
        "schedule": {"timesteps": cfg.timesteps, "kind": cfg.schedule,
                     "beta_start": cfg.beta_start, "beta_end": cfg.beta_end},
        "seed": params.seed, "ddpm": to_dict(cfg), "amp": amp, "n_train": len(rows), "n_anomalous": n_anomalous,
    }
    checkpoint.save_ddpm(ckpt_path, result.model, result.ema_model, result.optimizer, result.summary["steps"],
                         generator.get_state(), meta)
    name = stage if stage.startswith("train_") else f"train_{stage}"
    quality, timing = split_timing(result.summary)
    summary = {k: round(v, 6) if isinstance(v, float) else v for k, v in quality.items()}
    # plots/<stage>/{loss,epoch}.tsv, one row per optimiser step; the summary to metrics/
    write_live(stage, {"": result.history[["step", "loss", "epoch"]]},
               {**summary, "n_train": len(rows), "n_anomalous": n_anomalous}, ROOT / f"metrics/{name}.json")
    write_timing(stage, {**timing, "device": str(device), "amp": amp})
    snaps.done()
    print(f"{stage}: final loss {summary['final_loss']:.4f}, {timing['images_per_s']:.1f} images/s on {device}")
