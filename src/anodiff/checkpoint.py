"""Model checkpoints: the DDPM's UNet and the GAN's noise generator, saved and checked in one place.

A checkpoint is a dict of tensors and plain types (loads with weights_only=True, no pickled
code runs), written atomically by io.save_checkpoint: `format` names its kind, `arch` the
constructor arguments, then the weights and a `meta` dict. Every refusal is a CheckpointError
naming the file and what is wrong. A network class names its kind (`checkpoint_kind`), so this
module imports none: a change to the GAN's networks does not touch the DDPM stages' code.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from anodiff import io
from anodiff.errors import CheckpointError


@dataclass(frozen=True)
class _Kind:
    format: str
    weights: str  # the key of the weights to load
    stage: str  # the stage that writes it, when its meta does not say


KINDS = {
    "ddpm": _Kind("anodiff.ddpm/1", "ema", "pretrain_ddpm"),  # unet.UNet
    "gan_generator": _Kind("anodiff.gan_generator", "state_dict", "train_gan_noise"),  # noisegen.NoiseGenerator
}


def _cpu(state):
    """`state` with every tensor detached and on the CPU, so the file loads anywhere, and every
    string interned: pickle writes a string once per object, so a run resumed from a snapshot (its
    optimiser's keys read back from disk) would otherwise give other bytes than an uninterrupted one."""
    if torch.is_tensor(state):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {_cpu(k): _cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_cpu(v) for v in state)
    if type(state) is str:
        return sys.intern(state)
    return state


def save_ddpm(path, model: nn.Module, ema_model: nn.Module, optimizer, step: int,
              generator_state: torch.Tensor, meta: dict) -> dict:
    """Write the DDPM's checkpoint (raw and EMA weights, optimiser, step, RNG state) and return it."""
    ckpt = {
        "format": KINDS["ddpm"].format,
        "arch": model.arch_config(),
        "weights": _cpu(model.state_dict()),
        "ema": _cpu(ema_model.state_dict()),
        "optimizer": _cpu(optimizer.state_dict()),
        "step": int(step),
        "rng": {"torch_generator": generator_state.detach().cpu().to(torch.uint8)},
        "meta": dict(meta),
    }
    io.save_checkpoint(path, ckpt)
    return ckpt


def save_generator(path, net: nn.Module, meta: dict) -> None:
    """Write the GAN noise generator's checkpoint."""
    io.save_checkpoint(path, {"format": KINDS["gan_generator"].format, "arch": net.arch_config(),
                              "state_dict": _cpu(net.state_dict()), "meta": dict(meta)})


SKIPPED = "anodiff.skipped"  # the record a stage leaves in place of a model it could not train


def save_skipped(path, stage: str, reason: str) -> None:
    """In place of a model: a record that `stage` was skipped and why (every declared output of a
    stage is written, so `dvc repro` succeeds and later stages can say so)."""
    io.save_checkpoint(path, {"format": SKIPPED, "stage": stage, "reason": reason})


def skipped_reason(path) -> str | None:
    """Why the model at `path` was skipped, or None when it is a model (or anything else)."""
    ckpt = io.load_checkpoint(path)
    return str(ckpt.get("reason", "")) if isinstance(ckpt, dict) and ckpt.get("format") == SKIPPED else None


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def load(path, cls: type[nn.Module], device="cpu", expect_arch: dict | None = None) -> tuple[nn.Module, dict]:
    """-> (a `cls` network in eval mode on `device`, checkpoint dict); a DDPM's is its EMA copy.

    CheckpointError if the file is missing or unreadable, holds another kind, was built with an
    architecture that differs from `expect_arch` (only the keys given are compared; lists and
    tuples alike), or its weights do not fit its architecture.
    """
    kind = cls.checkpoint_kind
    spec = KINDS[kind]
    ckpt = io.load_checkpoint(path)
    found = ckpt.get("format")
    if found != spec.format:
        what = next((k for k, s in KINDS.items() if s.format == found), found)
        raise CheckpointError(f"{path}: not an anodiff {kind} checkpoint "
                              f"({'no format' if what is None else f'kind {what!r}'})")
    missing = [k for k in ("arch", spec.weights) if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not an anodiff {kind} checkpoint (no {' or '.join(missing)})")
    for key in ("arch", "meta"):  # a hand-made dict passes weights-only loading with anything here
        if not isinstance(ckpt.get(key, {}), dict):
            raise CheckpointError(f"{path}: not an anodiff {kind} checkpoint ({key} is not a mapping)")
    arch, stage = ckpt["arch"], ckpt.get("meta", {}).get("stage", spec.stage)
    diff = [f"{k} {_plain(arch.get(k))!r} in the file, {_plain(v)!r} asked"
            for k, v in (expect_arch or {}).items() if _plain(arch.get(k)) != _plain(v)]
    if diff:
        raise CheckpointError(f"{path}: architecture differs from the params: {'; '.join(diff)}; "
                              f"rerun `dvc repro {stage}`")
    try:
        net = cls(**arch)
        net.load_state_dict(ckpt[spec.weights])
    except (TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit the architecture stored in the file ({first}); "
                              f"rerun `dvc repro {stage}`") from None
    return net.to(device).eval(), ckpt
