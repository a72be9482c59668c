"""Run by tests/test_distributed.py under torchrun (two CPU ranks, gloo) or as one plain process over the
same global batches, once for all its jobs (each launch costs seconds of imports): one global batch's
gradient with the lts loss (`grad-lts`: the gradients after DDP's all-reduce), a few DDPM training
steps (`train-mse`: the weights and losses) and a few GAN training steps against a frozen DDPM
(`gan`: G, D and the history). Rank 0 saves each job's result to <argv[1]>/<job>.pt."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from anodiff import distributed, gan  # noqa: E402
from anodiff.losses import per_sample, reduce  # noqa: E402
from anodiff.noisegen import Critic, NoiseGenerator  # noqa: E402
from anodiff.schedule import Schedule  # noqa: E402
from anodiff.train import train_ddpm  # noqa: E402
from anodiff.unet import UNet  # noqa: E402


def gradients(loss: str) -> dict:
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(7, 1, 16, 16, generator=g) * 2 - 1
    eps, t = torch.randn(x0.shape, generator=g), torch.randint(0, 50, (7,), generator=g)
    torch.manual_seed(0)
    model = UNet(1, 8, (1, 2), 1, (), 16)
    schedule = Schedule(50)
    if distributed.world()[1] > 1:
        net = distributed.wrap(model, torch.device("cpu"))  # kept alive: its hooks all-reduce in backward
        value, _ = distributed.step_loss(net, schedule, x0, eps, t, loss, 1.0, 0.6)
    else:
        value = reduce(per_sample(model(schedule.add_noise(x0, eps, t), t), eps, loss), loss, keep=0.6)
    value.backward()
    return {name: p.grad for name, p in model.named_parameters()}


def gan_run() -> dict:
    """Two epochs over 5 anomalous images in batches of 3 (on two ranks: 2 + 2 with one padding
    sample, then 1 + 1), two critic steps each, 8 px crops of 16 px images, MSE through 2 DDIM steps."""
    g = torch.Generator().manual_seed(0)
    anomalous, normal = torch.rand(5, 1, 16, 16, generator=g) * 2 - 1, torch.rand(7, 1, 16, 16, generator=g) * 2 - 1
    torch.manual_seed(0)
    ddpm = UNet(1, 8, (1, 2), 1, (), 16)
    net = NoiseGenerator(1, 8, 2, 1.5, residual=False)
    critic = Critic(1, 8)
    history, _ = gan.train_gan(net, critic, ddpm, Schedule(50), anomalous, normal,
                               rng=torch.Generator().manual_seed(1), device="cpu", lr=1e-3, batch_size=3,
                               epochs=2, n_critic=2, gp_weight=10.0, mse_weight=1.0, t=6, denoise_steps=2,
                               grad_clip=1.0, crop=8, progress=False)
    return {"net": net.state_dict(), "critic": critic.state_dict(),
            "history": history.drop(columns=["step", "epoch"]).to_numpy().tolist()}


def ddpm_run(loss: str) -> dict:
    images = torch.rand(11, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.manual_seed(0)
    model = UNet(1, 8, (1, 2), 1, (), 16)
    result = train_ddpm(model, Schedule(50), images, loss=loss, noise="gaussian",
                        generator=torch.Generator().manual_seed(1), epochs=2, batch_size=5, lr=1e-3,
                        grad_clip=1.0, ema_decay=0.9, train_crop=8, lts_keep=0.6, device="cpu", progress=False)
    return {"model": result.model.state_dict(), "ema": result.ema_model.state_dict(),
            "loss": result.history.loss.tolist()}


JOBS = {"grad-lts": lambda: gradients("lts"), "train-mse": lambda: ddpm_run("mse"),
        "gan": gan_run}


def main(out: str) -> None:
    torch.set_num_threads(1)
    distributed.init_from_env()
    try:
        for name, job in JOBS.items():
            result = job()
            if distributed.is_main():
                torch.save(result, Path(out) / f"{name}.pt")
    finally:
        distributed.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
