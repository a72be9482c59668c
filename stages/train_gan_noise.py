"""train_gan_noise: learn the noise that lets the frozen pretrained DDPM heal anomalous images.

Reads the labelled training images (split=train: label=anomalous, and label=normal with its
augmented copies) and data/models/ddpm.pt; writes data/models/gan_generator.pt, the loss and
critic curves and a metrics JSON. The diffusion schedule comes from the DDPM checkpoint (it was
trained with it), so only `seed`, `data.channels` and `gan.*` are read from params.
"""

import torch

from _common import ROOT, run_stage, torch_generator
from anodiff import checkpoint, data, gan, io
from anodiff.config import to_dict
from anodiff.errors import CheckpointError, DataError
from anodiff.schedule import Schedule
from anodiff.noisegen import Critic, NoiseGenerator
from anodiff.train import pick_device
from anodiff.unet import UNet

STAGE = "train_gan_noise"
PREPARED = ROOT / "data/prepared"
DDPM = ROOT / "data/models/ddpm.pt"
OUT = ROOT / "data/models/gan_generator.pt"


def main(params):
    cfg, channels = params.gan, params.data.channels
    device = pick_device()
    ddpm, ckpt = checkpoint.load(DDPM, UNet, device=device)
    arch, meta = ckpt["arch"], ckpt.get("meta", {})
    if "schedule" not in meta:
        raise CheckpointError(f"{DDPM}: checkpoint has no schedule metadata; rerun pretrain_ddpm")
    if arch["in_channels"] != channels:
        raise CheckpointError(f"{DDPM}: DDPM has {arch['in_channels']} channels but data.channels is {channels}; "
                              "rerun pretrain_ddpm")
    schedule = Schedule(**meta["schedule"])
    if cfg.t >= schedule.timesteps:
        raise CheckpointError(f"{DDPM}: gan.t {cfg.t} must be below the DDPM's {schedule.timesteps} timesteps")

    size = int(arch["image_size"])
    rows_a = data.load_rows(PREPARED, split="train", label="anomalous")
    rows_n = data.load_rows(PREPARED, split="train", label="normal")  # augmented copies included
    if rows_a.empty or rows_n.empty:
        raise DataError(f"{PREPARED}: the GAN needs labelled training images, found {len(rows_a)} anomalous "
                        f"and {len(rows_n)} normal (split=train)")
    anomalous = data.load_images(PREPARED, rows_a, channels, size)
    normal = data.load_images(PREPARED, rows_n, channels, size)
    side = cfg.crop or size  # what the networks see in training
    print(f"{STAGE}: {len(anomalous)} anomalous, {len(normal)} normal ({int(rows_n.augmented.sum())} augmented) "
          f"images at {size} px (training crops {side} px), t={cfg.t}, {cfg.denoise_steps} denoising steps, "
          f"device {device}")

    torch.manual_seed(params.seed)  # initial weights
    net = NoiseGenerator(channels, cfg.base_channels, cfg.n_blocks, cfg.bound, residual=cfg.residual)
    critic = Critic(channels, cfg.base_channels)
    history, summary = gan.train_gan(
        net, critic, ddpm, schedule, anomalous, normal, generator=torch_generator(params.seed, offset=2),
        device=device, lr=cfg.lr, batch_size=cfg.batch_size, epochs=cfg.epochs, n_critic=cfg.n_critic,
        gp_weight=cfg.gp_weight, mse_weight=cfg.mse_weight, t=cfg.t, denoise_steps=cfg.denoise_steps,
        grad_clip=cfg.grad_clip, crop=cfg.crop, stage_name=STAGE,
        recompute=side >= 256)  # paper scale: recompute, not store, activations

    checkpoint.save_generator(OUT, net, {
        "stage": STAGE, "seed": params.seed, "gan": to_dict(cfg), "t": cfg.t, "denoise_steps": cfg.denoise_steps,
        "ddpm_checksum": summary["ddpm_checksum"],
        "schedule": dict(meta["schedule"]), "image_size": size, "channels": channels,
        "n_anomalous": len(anomalous), "n_normal": len(normal),
    })
    io.write_csv(ROOT / f"plots/{STAGE}/loss.csv",
                 history[["step", "critic_loss", "wasserstein", "grad_norm", "gen_loss", "mse"]])
    out = {k: round(v, 6) if isinstance(v, float) else v for k, v in summary.items() if k != "ddpm_checksum"}
    io.write_json(ROOT / f"metrics/{STAGE}.json", {**out, "n_anomalous": len(anomalous), "n_normal": len(normal)})
    print(f"{STAGE}: wasserstein {summary['wasserstein']:.4f}, gen_loss {summary['gen_loss']:.4f}, "
          f"mse {summary['mse']:.5f}, {summary['images_per_s']:.2f} images/s")


if __name__ == "__main__":
    run_stage(main)
