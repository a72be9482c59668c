"""Where the arithmetic runs and where its random numbers come from: device, precision, layout, seeds.

The device, mixed precision's dtype (and whether the CPU has native bfloat16), the memory layout,
and the seeded random-number generators. One module, so that every stage,
the library and `anodiff predict` pick the same device and draw the same numbers for the same
params (predict reproduces infer's maps because both seed here).

Streams: `seeded(seed, offset)` is the generator of params `seed` for one purpose; the offsets in
use are 1 (the DDPMs' training), 2 (the GAN's training), 3 (PatchCore's coreset), 101 (the maps'
noise: `noise_rng`), 103 and 104 (the GAN's model selection on val).
"""

from __future__ import annotations

import hashlib
import os

import torch

NOISE_OFFSET = 101  # separates the maps' noise from the training streams of the same params seed


def pick_device() -> torch.device:
    """CUDA when present (under torchrun, this rank's GPU: LOCAL_RANK), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def autocast_dtype(device: torch.device) -> torch.dtype:
    """Mixed precision's dtype on `device`: bfloat16, or float16 on a GPU without bfloat16
    (training then scales its loss: GradScaler)."""
    return torch.float16 if device.type == "cuda" and not torch.cuda.is_bf16_supported() else torch.bfloat16


def native_bf16() -> bool:
    """Whether this CPU does bfloat16 arithmetic natively (AVX512-BF16 or AMX tiles): then
    bfloat16 autocast is faster than float32 there; elsewhere it is emulated, and slower."""
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def memory_format(model: torch.nn.Module) -> torch.memory_format:
    """channels_last if the model's first convolution kernel (wider than 1x1) is stored so, else contiguous."""
    for p in model.parameters():
        if p.dim() == 4 and p.shape[-1] * p.shape[-2] > 1:
            return torch.channels_last if p.is_contiguous(memory_format=torch.channels_last) \
                and not p.is_contiguous() else torch.contiguous_format
    return torch.contiguous_format


def seeded(seed: int, offset: int = 0) -> torch.Generator:
    """A CPU torch.Generator seeded from params `seed` (`offset` separates independent streams)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + offset)


def noise_rng(seed: int) -> torch.Generator:
    """The random-number generator `infer` and `anodiff predict` both draw a map's noise from, for params `seed`."""
    return seeded(seed, NOISE_OFFSET)


def image_rngs(images: torch.Tensor, rng: torch.Generator) -> list[torch.Generator]:
    """One random-number generator per image, seeded from one draw of `rng` and the image's own 8-bit
    pixels: an image gets the same noise whichever batch, position or call it comes in, so
    `anodiff predict` gives an image the very score `infer` gave it."""
    base = int(torch.randint(2**62, (1,), generator=rng))
    out = []
    for x in images:
        pixels = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy().tobytes()
        digest = hashlib.sha256(base.to_bytes(8, "little") + pixels).digest()
        out.append(torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1))
    return out
