"""anodiff's one benchmark: speed, memory and the cost of its shortcuts on this machine, as JSON.

    python bench/bench.py --out bench/bench.json            # everything (includes a whole dvc repro)
    python bench/bench.py --out FILE --no-repro             # reuse this checkout's data/ instead

In one run, on one machine, with params.yaml's defaults and ANODIFF_THREADS torch threads
(default 2, as the stages):

- repro_seconds, peak_rss_mb: `dvc repro` of HEAD in a fresh clone (commit first), wall time and
  the peak resident memory of its largest process (the stages run one after another). Its outputs
  (the trained DDPM, the prepared images) are what the inference figures below use.
- train_images_per_s: the real `train_ddpm` loop (first step excluded, as warm-up) on random
  images, with the params' precision (`train_amp`: bfloat16 autocast where `ddpm.amp` is on, as
  `auto` is on a CPU with native bfloat16), against the bare loop in turn: train_vs_bare_ratio
  (above 1: the real loop runs in bfloat16, faster than the yardstick).
- bare_train_images_per_s: the yardstick of the units below, a bare loop over the same network,
  batch and crops with everything made beforehand (forward, MSE, backward, clip, Adam), always in
  float32 (so units do not move with a precision setting), timed alone at the start of the
  benchmark and again at its end (`--yardstick-steps` each; _start and _end give both): the median
  over both, since a small VM's speed drifts during a run.
- repro_stage_seconds: each stage's own seconds in that `dvc repro` (metrics/timing/ of the clone;
  process start, imports and DVC are not in them: `other` is the rest of repro_seconds).
- simplex_cost_fraction: one batch of simplex noise of the training shape, as a fraction of one
  training step (goal <= 0.1).
- infer_maps_per_s: the default inference (`Detector.raw_maps`, every level and noise draw) over
  test images; infer_speedup_vs_full_chain: the same maps made with AnoDDPM's full ancestral chain
  from the same noise levels, as a ratio of seconds, and auroc_delta_vs_full_chain, pixel AUROC of
  the default's maps minus the full chain's, on the same images (uncalibrated maps: calibration
  is fitted on val and would be the same for both). The full chain is slow (t_start + 1 model
  calls a level), so this comparison uses `--chain-images` test images and one noise draw a level.
- evaluate_peak_mb: the peak resident memory of a process that runs the `evaluate` stage's metrics
  (thresholds on val, every pixel metric, per-defect blocks, ROC and PR tables) on a synthetic
  test set of `--eval-maps` maps at `--eval-size` px (500 at 256: MVTec-sized); its own process,
  so nothing else counts.

- repro_units, bench_units: the seconds of the `dvc repro` and of this whole benchmark times
  bare_train_images_per_s of the same run (the training images the bare loop would have processed
  meanwhile): a cost that travels between machines, where seconds differ several-fold.
  repro_stage_units: repro_stage_seconds in the same units, and `other`.

Goals: repro_units <= 30,000, bench_units <= 70,000, peak_rss_mb <= 2048,
infer_speedup_vs_full_chain >= 20 with |auroc_delta_vs_full_chain| <= 0.01,
simplex_cost_fraction <= 0.1, evaluate_peak_mb <= 2048. They are written beside the figures; the
benchmark reports, it does not assert.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's anodiff, not whichever is installed

from anodiff import data, io, metrics  # noqa: E402
from anodiff.config import accelerated, load_params  # noqa: E402
from anodiff.detector import Detector  # noqa: E402
from anodiff.noise import for_batch, noise_kwargs  # noqa: E402
from anodiff.schedule import Schedule  # noqa: E402
from anodiff.runtime import pick_device  # noqa: E402
from anodiff.train import random_crop, train_ddpm  # noqa: E402
from anodiff.unet import UNet  # noqa: E402

# Time goals are in units, not seconds: a run's seconds times the bare training loop's images per
# second measured in the same run (bare_train_images_per_s), i.e. how many training images the bare
# loop would have processed meanwhile. Machines differ several-fold in seconds, far less in units.
GOALS = {"repro_units": ("<=", 30_000), "bench_units": ("<=", 70_000),
         "peak_rss_mb": ("<=", 2048), "infer_speedup_vs_full_chain": (">=", 20),
         "abs_auroc_delta_vs_full_chain": ("<=", 0.01), "simplex_cost_fraction": ("<=", 0.1),
         "evaluate_peak_mb": ("<=", 2048)}


def seconds_each(fn, repeats: int) -> list[float]:
    fn()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
    return times


def median_seconds(fn, repeats: int) -> float:
    return statistics.median(seconds_each(fn, repeats))


def _mb(kib: int) -> float:
    return round(kib / 1024 if sys.platform != "darwin" else kib / 2**20, 1)  # ru_maxrss: KiB (bytes on macOS)


# ----------------------------------------------------------------------------- repro
def repro(threads: int, keep: Path | None) -> tuple[dict, Path]:
    """`dvc repro` of HEAD in a fresh clone: ({repro_seconds, peak_rss_mb}, the clone)."""
    where = keep or Path(tempfile.mkdtemp(prefix="anodiff-bench-"))
    subprocess.run(["git", "clone", "-q", str(ROOT), str(where)], check=True)
    env = {**os.environ, "ANODIFF_THREADS": str(threads), "DVC_NO_ANALYTICS": "1",
           # the stages' `python` and `dvc` are this interpreter's environment's
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    tick = time.perf_counter()
    done = subprocess.run(["dvc", "repro"], cwd=where, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - tick
    if done.returncode:
        raise SystemExit(f"error: dvc repro failed in {where}:\n{done.stderr[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    stages = {f.stem: json.loads(f.read_text()).get("seconds") for f in sorted((where / "metrics/timing").glob("*.json"))}
    # ru_maxrss of the children is the largest waited-for descendant's (the stages, through dvc). It
    # also carries this process's own high-water mark into the child spawned from it (dvc): about
    # 0.6 GB of imports here, below any training stage's peak. A measurement before this one (none:
    # repro runs first) would hide a smaller peak
    return {"repro_seconds": round(seconds, 1), "peak_rss_mb": _mb(max(peak, before)),
            "repro_stage_seconds": {k: round(v, 1) for k, v in stages.items() if v is not None}}, where


# ----------------------------------------------------------------------------- training
def _unet(params):
    ddpm = params.ddpm
    torch.manual_seed(0)
    return UNet(params.data.channels, ddpm.base_channels, list(ddpm.channel_mults), ddpm.num_res_blocks,
                list(ddpm.attention_resolutions), params.data.image_size)


def bare_loop(params, device):
    """One step of the bare loop, the units' yardstick: the default network, batch and crop, float32
    whatever the params' precision, its inputs made beforehand (forward, MSE, backward, clip, Adam)."""
    ddpm, size = params.ddpm, params.data.image_size
    batch, crop = ddpm.batch_size, ddpm.train_crop if ddpm.train_crop < size else 0
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, params.data.channels, size, size, generator=gen) * 2 - 1
    schedule = Schedule.from_config(ddpm)
    model = _unet(params).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=ddpm.lr)
    x0 = (random_crop(images, crop, gen) if crop else images).to(device)
    t = torch.randint(0, schedule.timesteps, (batch,), generator=gen).to(device)
    eps = torch.randn(x0.shape, generator=gen).to(device)
    x_t = schedule.to(device).add_noise(x0, eps, t)

    def bare():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x_t, t), eps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), ddpm.grad_clip)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return bare


def yardstick(params, device, steps: int) -> list[float]:
    """`steps` timed steps of the bare loop alone (after one warm-up step): seconds each."""
    return seconds_each(bare_loop(params, device), steps)


def training(params, device, steps: int, rounds: int = 3) -> dict:
    """The real loop and the bare one in turn, `rounds` times `steps` steps each: on a shared machine
    whose speed drifts, alternating keeps the drift out of their ratio (medians over all steps)."""
    ddpm, channels, size = params.ddpm, params.data.channels, params.data.image_size
    batch, crop = ddpm.batch_size, ddpm.train_crop if ddpm.train_crop < size else 0
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch * (steps + 1), channels, size, size, generator=gen) * 2 - 1
    schedule = Schedule.from_config(ddpm)
    kw = noise_kwargs(ddpm.noise, ddpm)
    amp, nhwc = accelerated(ddpm.amp, device, precision=True), accelerated(ddpm.channels_last, device)
    bare = bare_loop(params, device)

    real_times, bare_times = [], []
    for _ in range(rounds):
        res = train_ddpm(_unet(params), schedule, images, loss="mse", noise=ddpm.noise, noise_kw=kw, generator=gen,
                         epochs=1, batch_size=batch, lr=ddpm.lr, grad_clip=ddpm.grad_clip, ema_decay=ddpm.ema_decay,
                         train_crop=crop, device=device, stage_name="bench", progress=False, amp=amp,
                         channels_last=nhwc, lr_schedule=ddpm.lr_schedule)
        real_times += (batch / res.history.images_per_s.iloc[1:]).tolist()  # the first step is the warm-up
        bare_times += seconds_each(bare, steps)
    step_s, bare_s = statistics.median(real_times), statistics.median(bare_times)
    shape = torch.zeros(batch, channels, crop or size, crop or size)  # one training batch
    simplex_kw = {**noise_kwargs("simplex", ddpm), "image_size": size}  # a crop's noise has the image's scale
    simplex_s = median_seconds(lambda: for_batch(shape, gen, kind="simplex", simplex_kw=simplex_kw), 5)
    return {"train_images_per_s": round(batch / step_s, 2),
            "train_vs_bare_ratio": round(bare_s / step_s, 3), "train_step_seconds": round(step_s, 4),
            "train_batch": batch, "train_crop": crop, "train_noise": ddpm.noise, "train_amp": amp,
            "simplex_batch_seconds": round(simplex_s, 5), "simplex_cost_fraction": round(simplex_s / step_s, 4)}


# ----------------------------------------------------------------------------- inference
def inference(params, repo: Path, device, n_infer: int, n_chain: int) -> dict:
    prepared = repo / "data/prepared"
    ddpm_path = repo / "data/models/ddpm.pt"
    if not ddpm_path.is_file():
        raise SystemExit(f"error: {ddpm_path} is missing; run `dvc repro` first, or drop --no-repro")
    rows = data.load_rows(prepared, split="test", augmented=0)
    normal, anomalous = rows[rows.label == "normal"], rows[rows.label == "anomalous"]

    def take(n):  # half normal, half anomalous, in manifest order: the same images every run
        return pd.concat([normal.head(n - n // 2), anomalous.head(n // 2)], ignore_index=True)

    det = Detector.load(ddpm_path, params.infer, device=device)
    subset = take(n_infer)
    images = data.load_images(prepared, subset, params.data.channels)
    tick = time.perf_counter()
    det.raw_maps(images, torch.Generator().manual_seed(0), progress=False)
    infer_s = time.perf_counter() - tick

    # default against the full chain, one draw a level on both sides, the same images and noise
    subset = take(n_chain)
    images = data.load_images(prepared, subset, params.data.channels)
    masks = data.load_masks(prepared, subset)
    det.settings = params.infer.model_copy(update={"n_seeds": 1})
    out = {}
    for name, full in (("ddim", False), ("full_chain", True)):
        det.full_chain = full
        tick = time.perf_counter()
        raw, _ = det.raw_maps(images, torch.Generator().manual_seed(0), progress=False)
        out[name] = (time.perf_counter() - tick, metrics.pixel_auroc(raw.mean(dim=1).numpy(), masks))
    return {"infer_images": n_infer, "infer_levels": [list(p) for p in params.infer.plan()], "infer_noise_draws_per_level": params.infer.n_seeds,
            "infer_maps_per_s": round(n_infer / infer_s, 3),
            "chain_images": n_chain, "chain_noise_draws_per_level": 1,
            "ddim_seconds": round(out["ddim"][0], 2), "full_chain_seconds": round(out["full_chain"][0], 2),
            "infer_speedup_vs_full_chain": round(out["full_chain"][0] / out["ddim"][0], 2),
            "pixel_auroc_ddim": round(out["ddim"][1], 6), "pixel_auroc_full_chain": round(out["full_chain"][1], 6),
            "auroc_delta_vs_full_chain": round(out["ddim"][1] - out["full_chain"][1], 6)}


# ----------------------------------------------------------------------------- evaluation memory
def evaluation(n: int, size: int) -> dict:
    """The evaluate stage's metrics in a process of their own (bench/evaluate_memory.py): its peak
    resident memory is the stage's, imports included, and nothing of this process counts."""
    script = Path(__file__).with_name("evaluate_memory.py")
    done = subprocess.run([sys.executable, str(script), str(n), str(size)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"error: the evaluation measurement failed:\n{done.stderr[-2000:]}")
    return {"evaluate_maps": n, "evaluate_size": size, **json.loads(done.stdout.strip().splitlines()[-1])}


# ----------------------------------------------------------------------------- main
def units(out: dict) -> dict:
    """repro_units and bench_units: seconds times the bare loop's rate of this very run."""
    rate = out.get("bare_train_images_per_s")
    if not rate:
        return {}
    got = {"bench_units": round(out["bench_seconds"] * rate)}
    if out.get("repro_seconds") is not None:
        got["repro_units"] = round(out["repro_seconds"] * rate)
    stages = out.get("repro_stage_seconds")
    if stages:
        other = out["repro_seconds"] - sum(stages.values())  # process starts, imports, the small stages, DVC
        got["repro_stage_units"] = {**{k: round(v * rate) for k, v in stages.items()}, "other": round(other * rate)}
    return got


def verdicts(out: dict) -> dict:
    figures = {**out, "abs_auroc_delta_vs_full_chain": abs(out.get("auroc_delta_vs_full_chain", float("nan")))}
    result = {}
    for key, (op, goal) in GOALS.items():
        value = figures.get(key)
        if value is None or value != value:
            continue
        result[key] = {"goal": f"{op} {goal}", "met": value <= goal if op == "<=" else value >= goal}
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    ap.add_argument("--no-repro", action="store_true",
                    help="skip the dvc repro; the inference figures use this checkout's data/ (run dvc repro first)")
    ap.add_argument("--keep", type=Path, default=None, help="clone into this new folder and keep it")
    ap.add_argument("--train-steps", type=int, default=6, help="training steps timed a round (plus one warm-up)")
    ap.add_argument("--train-rounds", type=int, default=3, help="rounds of the real and the bare loop, in turn")
    ap.add_argument("--yardstick-steps", type=int, default=30,
                    help="bare-loop steps timed at the start and at the end for bare_train_images_per_s")
    ap.add_argument("--infer-images", type=int, default=32, help="test images for infer_maps_per_s")
    ap.add_argument("--chain-images", type=int, default=8, help="test images for the full-chain comparison")
    ap.add_argument("--eval-maps", type=int, default=500)
    ap.add_argument("--eval-size", type=int, default=256)
    args = ap.parse_args(argv)
    threads = int(os.environ.get("ANODIFF_THREADS", "2"))
    torch.set_num_threads(threads)
    device = pick_device()
    params = load_params(ROOT / "params.yaml")
    out = {"device": str(device), "torch": torch.__version__, "torch_threads": threads, "cpu_count": os.cpu_count(),
           "cpu": platform.processor() or platform.machine(), "commit": _head()}
    started = time.perf_counter()
    # the yardstick at the start and at the end: a 2-core VM's speed drifts by 10-30 % from minute to
    # minute, so the rate the whole run's seconds are multiplied by is the median over both
    start = yardstick(params, device, args.yardstick_steps)
    repo = ROOT
    if not args.no_repro:
        figures, repo = repro(threads, args.keep)
        out.update(figures)
    out.update(training(params, device, args.train_steps, args.train_rounds))
    out.update(inference(params, repo, device, args.infer_images, args.chain_images))
    out.update(evaluation(args.eval_maps, args.eval_size))
    if repo != ROOT and args.keep is None:
        shutil.rmtree(repo, ignore_errors=True)
    end = yardstick(params, device, args.yardstick_steps)
    batch = params.ddpm.batch_size
    out.update(bare_train_images_per_s=round(batch / statistics.median(start + end), 2),
               bare_train_images_per_s_start=round(batch / statistics.median(start), 2),
               bare_train_images_per_s_end=round(batch / statistics.median(end), 2))
    out["bench_seconds"] = round(time.perf_counter() - started, 1)
    out.update(units(out))
    out["goals"] = verdicts(out)
    io.write_json(args.out, out)
    print(json.dumps(out, indent=2))


def _head() -> str | None:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or None


if __name__ == "__main__":
    main()
