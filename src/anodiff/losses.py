"""Per-sample denoising losses and their explicit reduction to one training scalar.

`mse` is the DDPM loss. RDDPM's robust variants keep anomalous images hidden in the training
set from being learned as normal: `huber` grows only linearly beyond `delta`, so a sample
with a large error pulls less; `lts` (least trimmed squares) drops, in every batch, the
samples with the largest MSE and averages the `keep` fraction with the lowest.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KINDS = ("mse", "huber", "lts")


def _check(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {', '.join(KINDS)}")


def per_sample(pred: torch.Tensor, target: torch.Tensor, kind: str, delta: float = 1.0) -> torch.Tensor:
    """(B, ...) prediction and target -> (B,) loss per sample (mean over its elements)."""
    _check(kind)
    if kind == "huber":
        # torch's Huber: 0.5 e^2 for |e| <= delta, delta * (|e| - delta / 2) beyond
        elementwise = F.huber_loss(pred, target, reduction="none", delta=delta)
    else:  # mse, and lts, which trims per-sample MSEs in `reduce`
        elementwise = (pred - target).pow(2)
    return elementwise.flatten(1).mean(dim=1)


def reduce(losses: torch.Tensor, kind: str, keep: float = 1.0) -> torch.Tensor:
    """(B,) per-sample losses -> scalar: the mean, or for `lts` the mean of the ceil(keep * B)
    lowest. The trimmed samples get exactly zero gradient."""
    _check(kind)
    if kind != "lts":
        return losses.mean()
    if not 0 < keep <= 1:
        raise ValueError(f"lts keep must be in (0, 1], got {keep}")
    # round first: 0.7 * 10 is 7.000000000000001 in floats, and must keep 7, not 8
    k = max(1, math.ceil(round(keep * losses.shape[0], 9)))
    return torch.topk(losses, k, largest=False).values.mean()
