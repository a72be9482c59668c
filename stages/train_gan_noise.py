"""train_gan_noise: learn the noise that lets the frozen pretrained DDPM heal anomalous images.

Reads the labelled training images (split=train: label=anomalous, and label=normal with its
augmented copies), the val images and data/models/ddpm.pt; writes data/models/gan_generator.pt,
the loss and critic curves, the model-selection table and a metrics JSON. The diffusion schedule
comes from the DDPM checkpoint (it was trained with it). Params read: `seed`, `data.channels`,
`gan.*`, and `infer.*`, because G is selected on val with the very maps `infer@gan` will draw
(anodiff.gan_selection).

Under torchrun (`ANODIFF_NPROC=N dvc repro train_gan_noise`, anodiff.distributed) G and D train
with DistributedDataParallel on shares of the same global batches; rank 0 alone selects G on
val and writes the generator, curves and metrics.
"""

import pandas as pd
import torch

from _common import ROOT, run_stage, split_timing, torch_generator, write_timing
from _live import write_live
from anodiff import checkpoint, data, distributed, gan, gan_selection, resume
from anodiff.config import to_dict
from anodiff.errors import CheckpointError, DataError
from anodiff.schedule import Schedule
from anodiff.noisegen import Critic, NoiseGenerator
from anodiff.runtime import pick_device
from anodiff.unet import UNet

STAGE = "train_gan_noise"
PREPARED = ROOT / "data/prepared"
DDPM = ROOT / "data/models/ddpm.pt"
OUT = ROOT / "data/models/gan_generator.pt"


def skip(reason: str) -> None:
    """Normal-only data: no GAN to train. Every declared output is still written, saying why."""
    checkpoint.save_skipped(OUT, STAGE, reason)
    write_live(STAGE, {}, {"skipped": reason}, ROOT / f"metrics/{STAGE}.json")
    write_timing(STAGE, {"seconds": 0.0, "skipped": reason})
    print(f"{STAGE}: skipped: {reason}")


def main(params):
    cfg, channels = params.gan, params.data.channels
    rows = data.load_rows(PREPARED)
    if not ((rows["split"] == "train") & (rows["label"] == "anomalous")).any():
        why = ("the data has no anomalous images" if data.normal_only(rows) else
               "no anomalous image went to training (data.train_anomalous_fraction is 0)")
        return skip(f"{why}, and the GAN learns from labelled anomalous ones (ddpm, rddpm and patchcore still run)")
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
    rank, ranks = distributed.world()
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"{STAGE}: {len(anomalous)} anomalous, {len(normal)} normal ({int(rows_n.augmented.sum())} augmented) "
          f"images at {size} px (training crops {side} px), t={cfg.t}, {cfg.denoise_steps} denoising steps, "
          f"device {device}" + (f", {ranks} ranks" if ranks > 1 else ""))

    torch.manual_seed(params.seed)  # initial weights
    net = NoiseGenerator(channels, cfg.base_channels, cfg.n_blocks, cfg.bound, residual=cfg.residual)
    critic = Critic(channels, cfg.base_channels)
    selection = None
    if cfg.eval_every and rank == 0:  # model selection on rank 0, the rank that keeps and writes G
        selection = gan_selection.on_val(
            PREPARED, ddpm, ckpt, net, settings=params.infer, t=cfg.t, steps=cfg.denoise_steps, seed=params.seed,
            channels=channels, feature_size=params.patchcore.image_size, every=cfg.eval_every, where=DDPM)
        print(f"{STAGE}: model selection on {selection.evaluate.describe()}")
    used = {"seed": params.seed, "channels": channels, "gan": to_dict(cfg), "infer": to_dict(params.infer)}
    if ranks > 1:  # as the DDPM stages: a snapshot is of this many ranks, and every rank reads rank 0's
        used = {**used, "ranks": ranks}
    snaps = resume.for_stage(ROOT, STAGE, used, [PREPARED, DDPM], device.type if ranks > 1 else device)
    history, summary = gan.train_gan(
        net, critic, ddpm, schedule, anomalous, normal, rng=torch_generator(params.seed, offset=2),
        device=device, lr=cfg.lr, batch_size=cfg.batch_size, epochs=cfg.epochs, n_critic=cfg.n_critic,
        gp_weight=cfg.gp_weight, mse_weight=cfg.mse_weight, t=cfg.t, denoise_steps=cfg.denoise_steps,
        grad_clip=cfg.grad_clip, crop=cfg.crop, stage_name=STAGE, selection=selection,
        recompute=side >= 256, snapshots=snaps, progress=rank == 0)  # paper scale: recompute activations
    if rank != 0:
        return  # rank 0 alone writes the generator, curves and metrics

    checkpoint.save_generator(OUT, net, {
        "stage": STAGE, "seed": params.seed, "gan": to_dict(cfg), "t": cfg.t, "denoise_steps": cfg.denoise_steps,
        "ddpm_checksum": summary["ddpm_checksum"],
        "schedule": dict(meta["schedule"]), "image_size": size, "channels": channels,
        "n_anomalous": len(anomalous), "n_normal": len(normal),
    })
    candidates = summary.pop("selection")
    quality, timing = split_timing(summary)
    out = {k: round(v, 6) if isinstance(v, float) else v for k, v in quality.items() if k != "ddpm_checksum"}
    # one row per candidate evaluated on val; none when selection is off (eval_every 0)
    table = pd.DataFrame(candidates, columns=gan_selection.COLUMNS)
    if candidates:
        chosen = table[table.step == summary["selected_step"]].iloc[0]
        for prefix, row in (("val", chosen), ("start_val", table.iloc[0])):
            for key in ("map_criterion", "image_auroc", "pixel_auroc", "aupro"):
                out[f"{prefix}_{key}"] = None if pd.isna(row[key]) else round(float(row[key]), 6)
        out["candidates"] = len(table)
    # plots/train_gan_noise/<curve>.tsv per generator step, .../selection/<figure>.tsv per candidate
    write_live(STAGE, {"": history[["step", "critic_loss", "wasserstein", "grad_norm", "gen_loss", "mse"]],
                       "selection/": table},
               {**out, "n_anomalous": len(anomalous), "n_normal": len(normal)}, ROOT / f"metrics/{STAGE}.json")
    write_timing(STAGE, {**timing, "device": str(device)})
    snaps.done()
    print(f"{STAGE}: wasserstein {summary['wasserstein']:.4f}, gen_loss {summary['gen_loss']:.4f}, "
          f"mse {summary['mse']:.5f}, {timing['images_per_s']:.2f} images/s; kept step {summary['selected_step']}"
          + (f" (val map {out['val_map_criterion']}, image AUROC {out['val_image_auroc']}; start "
             f"{out['start_val_map_criterion']}, {out['start_val_image_auroc']})" if candidates else ""))


if __name__ == "__main__":
    run_stage(main, setup=distributed.setup)
