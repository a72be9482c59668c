"""Benchmark of DDPM training on this machine, written as JSON.

Measures, with the default UNet of params.yaml's `ddpm` section:
- training images/s (the real `train_ddpm` loop, first step excluded as warm-up), on the
  `ddpm.train_crop` crops the stages train on, and on whole images,
- the cost of one batch of simplex noise (of the training shape) as a fraction of one
  training step (goal < 10%),
- forward+backward seconds per batch for a few UNet widths (to size the default),
- peak resident memory of the process after the training run as the stages do it (before
  the whole-image run and the width sweep, which need more).

    .venv/bin/python bench/bench_train.py --out bench/results.json --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from anodiff.config import read_yaml  # noqa: E402
from anodiff.noise import for_batch, noise_kwargs  # noqa: E402
from anodiff.schedule import Schedule  # noqa: E402
from anodiff.train import pick_device, train_ddpm  # noqa: E402
from anodiff.unet import UNet  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


def peak_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def fwd_bwd_seconds(ddpm: dict, base: int, channels: int, size: int, batch: int, repeats: int) -> float:
    torch.manual_seed(0)
    model = UNet(channels, base, ddpm["channel_mults"], ddpm["num_res_blocks"],
                 ddpm["attention_resolutions"], size)
    x = torch.randn(batch, channels, size, size)
    t = torch.randint(0, ddpm["timesteps"], (batch,))

    def step():
        model.zero_grad(set_to_none=True)
        model(x, t).pow(2).mean().backward()

    return median_seconds(step, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6, help="training steps timed (plus one warm-up)")
    ap.add_argument("--widths", default="32,48,64", help="base_channels to time fwd+bwd for ('' skips)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    baseline_mib = peak_rss_mib()  # the interpreter with torch imported, before any work
    if args.threads:
        torch.set_num_threads(args.threads)

    params = read_yaml(Path(args.params).read_text())
    ddpm, channels = params["ddpm"], params["data"]["channels"]
    size, batch = args.image_size, args.batch
    device = pick_device()
    gen = torch.Generator().manual_seed(0)
    simplex_kw = noise_kwargs("simplex", SimpleNamespace(**ddpm))

    crop = ddpm.get("train_crop", 0)
    side = crop or size  # what one training step sees
    images = torch.rand(batch * (args.steps + 1), channels, size, size, generator=gen) * 2 - 1
    schedule = Schedule(ddpm["timesteps"], ddpm["schedule"], ddpm["beta_start"], ddpm["beta_end"])

    def train_step_seconds(train_crop: int) -> tuple[float, torch.nn.Module]:
        """Median seconds of one step of the real loop on random images, warm-up step excluded."""
        torch.manual_seed(0)
        model = UNet(channels, ddpm["base_channels"], ddpm["channel_mults"], ddpm["num_res_blocks"],
                     ddpm["attention_resolutions"], size)
        res = train_ddpm(model, schedule, images, loss="mse", noise=ddpm["noise"],
                         noise_kw=noise_kwargs(ddpm["noise"], SimpleNamespace(**ddpm)), generator=gen, epochs=1,
                         batch_size=batch, lr=ddpm["lr"], grad_clip=ddpm["grad_clip"], ema_decay=ddpm["ema_decay"],
                         train_crop=train_crop, device=device, stage_name="bench", progress=False)
        return statistics.median((batch / res.history.images_per_s.iloc[1:]).tolist()), model

    step_seconds, model = train_step_seconds(crop)
    # read now: ru_maxrss only grows, and the runs below use bigger inputs and models
    peak_mib = peak_rss_mib()
    whole_seconds = train_step_seconds(0)[0] if crop else step_seconds

    x = torch.zeros(batch, channels, side, side, device=device)  # a batch of the training shape
    crop_kw = {**simplex_kw, "image_size": size}  # a crop's noise has the whole image's scale
    simplex_s = median_seconds(lambda: for_batch(x, gen, kind="simplex", simplex_kw=crop_kw), 5)
    gaussian_s = median_seconds(lambda: for_batch(x, gen), 5)

    widths = [int(w) for w in args.widths.split(",") if w.strip()]
    fwd_bwd = {str(w): round(fwd_bwd_seconds(ddpm, w, channels, size, batch, 2), 4) for w in widths}

    out = {
        "device": str(device),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "load_average_1min": os.getloadavg()[0],
        "image_size": size,
        "batch": batch,
        "channels": channels,
        "unet": model.arch_config(),
        "unet_parameters": sum(p.numel() for p in model.parameters()),
        "train_noise": ddpm["noise"],
        "train_crop": crop,
        "train_steps_timed": args.steps,
        "train_step_seconds": round(step_seconds, 4),
        "train_images_per_s": round(batch / step_seconds, 2),
        "whole_image_step_seconds": round(whole_seconds, 4),
        "whole_image_images_per_s": round(batch / whole_seconds, 2),
        "simplex_batch_seconds": round(simplex_s, 5),
        "gaussian_batch_seconds": round(gaussian_s, 5),
        "simplex_fraction_of_step": round(simplex_s / step_seconds, 4),
        "simplex_fraction_goal": 0.10,
        "fwd_bwd_seconds_by_base_channels": fwd_bwd,
        "rss_mib_after_import": round(baseline_mib, 1),
        "peak_rss_mib_training": round(peak_mib, 1),
        "peak_rss_mib_total": round(peak_rss_mib(), 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
