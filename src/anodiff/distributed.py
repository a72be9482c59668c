"""Data-parallel training under `torchrun` (the DDPM stages and the GAN's), with PyTorch's DDP.

The networks are wrapped in PyTorch's own DistributedDataParallel.

    ANODIFF_NPROC=2 dvc repro pretrain_ddpm        # the stage re-launches itself under torchrun
    torchrun --standalone --nproc_per_node=2 stages/pretrain_ddpm.py   # or by hand

Every rank draws the whole global batch (shuffle, crops, t, noise) from the same seeded CPU
generator, exactly as a single process does, and trains on its share of it: the positions a
DistributedSampler (shuffle off) gives the rank within the batch. DDP averages the ranks'
gradients, so each rank's loss is scaled to make that average the gradient of the global
batch's loss (`share`): the weights follow a single-process run over the same global batch,
up to float rounding. The global batch stays `ddpm.batch_size`, whatever the number of ranks.
A DistributedSampler over the whole data set would reshuffle with its own seed and give each
rank its own batches, so a two-process run would no longer be the one-process run it scales.

Rank 0 alone writes checkpoints, curves, metrics and resume snapshots; every rank reads the
same inputs (and the same snapshot when resuming). CPU ranks talk over gloo, CUDA ranks over
NCCL, one GPU each (LOCAL_RANK).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

from anodiff.errors import ConfigError
from anodiff.losses import per_sample


def world() -> tuple[int, int]:
    """(rank, number of ranks): (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def nproc_from_env() -> int:
    """ANODIFF_NPROC: the processes to train with (default 1: no torchrun)."""
    value = os.environ.get("ANODIFF_NPROC")
    if value is None:
        return 1
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ConfigError(f"ANODIFF_NPROC: {value!r} must be a positive integer (training processes), or unset")
    return int(text)


def relaunch_under_torchrun() -> None:
    """ANODIFF_NPROC=N > 1 outside torchrun: run this script again under `torchrun --nproc_per_node=N`
    and exit with its status. dvc.yaml stays one pipeline; the environment picks the launcher."""
    n = nproc_from_env()
    if n > 1 and "LOCAL_RANK" not in os.environ:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               sys.argv[0], *sys.argv[1:]]
        sys.exit(subprocess.call(cmd))


def init_from_env() -> bool:
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1); True if this is a DDP run."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def setup():
    """run_stage's setup for a training stage: with ANODIFF_NPROC=N > 1 the script runs again under
    `torchrun --nproc_per_node=N` (this process exits with its status); under torchrun, each process
    joins the process group. Returns the teardown."""
    relaunch_under_torchrun()
    init_from_env()
    return close


def my_shard(b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`shard` of a global batch of b samples for this rank."""
    return shard(b, *world())


def global_sums(values: list[torch.Tensor]) -> list[float]:
    """The sums over every rank of 0-d tensors (one all_reduce for all of them), as floats."""
    total = torch.stack([v.detach().float() for v in values])
    dist.all_reduce(total)
    return total.tolist()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `model` (which keeps its weights: the optimiser and EMA use it)."""
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def shard(b: int, rank: int, ranks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, valid) of this rank's share of a global batch of b samples: a DistributedSampler's
    indices (shuffle off, padded to equal shares by repeating samples) and which are not padding."""
    sampler = DistributedSampler(range(b), num_replicas=ranks, rank=rank, shuffle=False)
    positions = torch.tensor(list(sampler), dtype=torch.long)
    valid = torch.arange(rank, sampler.total_size, ranks) < b
    return positions, valid


def share(losses: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor, b: int, kind: str,
          keep: float = 1.0) -> torch.Tensor:
    """This rank's term of the global batch's loss (`losses.reduce` over all b samples): the terms of
    all ranks sum to it. `losses` (m,) are this rank's per-sample losses at `positions` (global,
    `valid` False for padding). For `lts` the kept samples are the global batch's lowest, found
    from every rank's losses (all_gather), as one process would find them."""
    valid = valid.to(losses.device)
    if kind != "lts":
        return (losses * valid).sum() / b
    _, ranks = world()
    gathered = [torch.empty_like(losses) for _ in range(ranks)]
    dist.all_gather(gathered, losses.detach())
    full = torch.full((b,), float("inf"), dtype=losses.dtype, device=losses.device)
    for r, values in enumerate(gathered):  # back to the global batch's order
        pos, ok = shard(b, r, ranks)
        full[pos[ok].to(losses.device)] = values[ok.to(losses.device)]
    k = max(1, math.ceil(round(keep * b, 9)))  # as losses.reduce
    kept = torch.zeros(b, dtype=torch.bool, device=losses.device)
    kept[torch.topk(full, k, largest=False).indices] = True
    mine = kept[positions.to(losses.device)] & valid
    return (losses * mine).sum() / k


def step_loss(net, schedule, x0, eps, t, kind: str, delta: float, keep: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(what this rank backpropagates, the global batch's loss as a 0-d tensor, the same on every rank) for one DDP
    training step on the global batch x0, eps, t (identical on every rank). `net` (DDP) must outlive
    the backward pass: its hooks all-reduce the gradients there."""
    rank, ranks = world()
    b = x0.shape[0]
    pos, valid = shard(b, rank, ranks)
    p = pos.to(x0.device)
    pred = net(schedule.add_noise(x0[p], eps[p], t[p]), t[p])
    term = share(per_sample(pred.float(), eps[p], kind, delta=delta), valid, pos, b, kind, keep)
    total = term.detach().clone()
    dist.all_reduce(total)  # the global loss, for the log and the divergence check
    # DDP averages gradients over the ranks: scale so the average is the global loss's gradient
    return term * ranks, total
