"""SemanticDiffGAN done right: learn the noise that lets a frozen DDPM heal an anomalous image.

A generator G maps an anomalous image x_a (model resolution, no resizing) to a bounded noise
field. Noised with it, `x_t = add_noise(x_a, G(x_a), t)` should look to a WGAN-GP critic
like a normal image noised the ordinary way, `add_noise(x_n, eps, t)`; the frozen pretrained
DDPM then denoises x_t back to a normal-looking image, and `|x_a - reconstruction|` marks the
defect. The report's losses (Eq. 9 and its MSE term), with the original code's defects fixed
(see DESIGN.md): a critic with no sigmoid and no batch norm, a gradient penalty, real and fake
the right way round, a generator whose residual blocks use their convolutions and whose output
can be negative, and an MSE term that reaches G through the DDPM's denoising.

critic:    L_D = mean D(fake) - mean D(real) + gp_weight * mean_i (||grad D(x_hat_i)|| - 1)^2
generator: L_G = -mean D(fake) + mse_weight * MSE(denoise(fake), target)

The MSE target (`mse_target`): the report asks for "the MSE between the DDPM's output for the
anomalous input and its output for a normal input". Read literally (`"paired"`), that compares
the reconstruction of anomalous image i with that of an unrelated normal image i of the batch;
as the pairing is random, the expected per-pixel loss is minimised by the *mean* normal image,
so it pulls every reconstruction towards a flat average slab and erases the texture that
separates a defect from its surroundings. The default, `"gaussian"`, reads "normal input" as
the same anomalous image noised the normal way, with Gaussian noise: the target is the DDPM's
own reconstruction `denoise(add_noise(x_a, eps, t))`. The MSE then keeps the learned-noise
reconstruction as faithful as the plain DDPM's everywhere, and departing from it (healing the
defect) has to be paid for by the critic's gain: G learns a minimal, local change, the
"fixed-point" idea of translating a sick image into a healthy one with as little change as
possible (Siddiquee et al., ICCV 2019), whose difference is the localisation. `"input"` uses
x_a itself as the target (a stricter faithfulness anchor).

Noise modes (`NoiseGenerator(residual=...)`): the report's generator returns the whole noise
field (`residual=False`, default). With `residual=True` it returns `eps + bound * tanh(f(x))`,
a learned bounded correction on top of Gaussian noise; its last conv starts at zero, so
training starts from the plain `ddpm` method exactly and with the `"gaussian"` target (same
eps) the MSE term is 0 until G moves.
"""

from __future__ import annotations

import hashlib
import math
import time

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint
from tqdm.auto import tqdm

from anodiff import io
from anodiff.errors import CheckpointError, TrainingDiverged
from anodiff.train import random_crop

MSE_TARGETS = ("gaussian", "paired", "input")
HISTORY_COLUMNS = ["step", "epoch", "critic_loss", "wasserstein", "grad_norm", "gen_loss", "mse"]
CHECKPOINT_FORMAT = "anodiff.gan_generator"


def _groups(ch: int) -> int:
    return math.gcd(8, ch)


# ----------------------------------------------------------------------------- networks
class ResBlock(nn.Module):
    """x + conv(act(norm(conv(act(norm(x)))))): both convolutions reach the output."""

    def __init__(self, ch: int, dilation: int = 1):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(ch), ch)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=dilation, dilation=dilation)
        self.norm2 = nn.GroupNorm(_groups(ch), ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        h = self.conv1(F.leaky_relu(self.norm1(x), 0.2))
        h = self.conv2(F.leaky_relu(self.norm2(h), 0.2))
        return x + h


class NoiseGenerator(nn.Module):
    """Anomalous image (B, C, H, W) -> noise field (B, C, H, W), |noise| <= bound.

    Full resolution throughout; block i dilates its first conv by 2**i (at most 8), so four
    blocks see a 65-pixel window: enough context to tell a defect from the slab around it
    without the original's resize to 64 px and back. GroupNorm (per sample) is fine here:
    only the critic must avoid batch statistics.
    """

    def __init__(self, channels: int, base_channels: int = 32, n_blocks: int = 4, bound: float = 1.5,
                 residual: bool = False):
        super().__init__()
        if bound <= 0:
            raise ValueError(f"bound must be > 0, got {bound}")
        self._arch = dict(channels=int(channels), base_channels=int(base_channels), n_blocks=int(n_blocks),
                          bound=float(bound), residual=bool(residual))
        self.bound, self.residual = float(bound), bool(residual)
        self.conv_in = nn.Conv2d(channels, base_channels, 3, padding=1)
        self.blocks = nn.ModuleList(ResBlock(base_channels, 2 ** min(i, 3)) for i in range(n_blocks))
        self.norm_out = nn.GroupNorm(_groups(base_channels), base_channels)
        self.conv_out = nn.Conv2d(base_channels, channels, 3, padding=1)
        if residual:  # start as pure Gaussian noise: the plain ddpm method
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    def arch_config(self) -> dict:
        return dict(self._arch)

    def forward(self, x, eps=None):
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h)
        delta = self.bound * torch.tanh(self.conv_out(F.leaky_relu(self.norm_out(h), 0.2)))
        if self.residual:
            if eps is None:
                raise ValueError("a residual NoiseGenerator needs the Gaussian noise eps it corrects")
            return eps + delta
        return delta


class Critic(nn.Module):
    """WGAN critic: plain LeakyReLU convs (no batch norm, no sigmoid), mean-pooled to one score.

    Three stride-2 convs then a global average, so any batch size (1 included) and any image
    size (divisible by 8 keeps the strides exact) work; output (B,), unbounded.
    """

    def __init__(self, channels: int, base_channels: int = 32):
        super().__init__()
        b = base_channels
        self.net = nn.Sequential(
            nn.Conv2d(channels, b, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(b, 2 * b, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * b, 4 * b, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * b, 8 * b, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
        )
        self.head = nn.Linear(8 * b, 1)

    def forward(self, x):
        h = self.net(x).mean(dim=(2, 3))  # (B, 8b)
        return self.head(h).squeeze(1)  # (B,)


# ----------------------------------------------------------------------------- losses
def _penalty(critic, real, fake, generator: torch.Generator):
    """(GP, per-sample gradient norms); see gradient_penalty."""
    alpha = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), generator=generator)
    alpha = alpha.to(device=real.device, dtype=real.dtype)  # (B, 1, 1, 1): one weight per sample
    x_hat = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    norms = grad.flatten(1).norm(2, dim=1)  # (B,) over each whole flattened sample
    return ((norms - 1) ** 2).mean(), norms.detach()


def gradient_penalty(critic, real, fake, generator: torch.Generator) -> torch.Tensor:
    """mean_i (||grad_x D(x_hat_i)||_2 - 1)^2 at x_hat_i = a_i real_i + (1 - a_i) fake_i, a_i ~ U(0, 1).

    Differentiable in the critic's weights (create_graph=True), as the critic step needs.
    """
    return _penalty(critic, real, fake, generator)[0]


def critic_loss(critic, real, fake, gp_weight: float, generator: torch.Generator):
    """Report Eq. 9: mean D(fake) - mean D(real) + gp_weight * GP -> (loss, stats).

    `real`: normal images noised with Gaussian noise; `fake`: anomalous images noised with G's
    noise. The critic scores normal-looking inputs high. stats: floats `wasserstein`
    (mean D(real) - mean D(fake), the critic's distance estimate), `grad_norm` (mean
    ||grad D|| at the interpolates; 1 when the penalty is satisfied) and `gp`.
    """
    d_real, d_fake = critic(real).mean(), critic(fake.detach()).mean()
    gp, norms = _penalty(critic, real, fake, generator)
    loss = d_fake - d_real + gp_weight * gp
    stats = dict(wasserstein=(d_real - d_fake).item(), grad_norm=norms.mean().item(), gp=gp.item())
    return loss, stats


def denoise_through(ddpm, schedule, x_t, t: int, steps: int, checkpoint: bool = False):
    """The DDPM's strided DDIM denoising from t to 0, with gradients to x_t.

    checkpoint=True recomputes each step's activations in the backward pass instead of
    storing them (for large images on a GPU); the result is the same.
    """
    if not checkpoint:
        return schedule.denoise(ddpm, x_t, t, steps)
    ts = schedule.respace(t, steps)
    x = x_t
    for i, step in enumerate(ts):
        prev = ts[i + 1] if i + 1 < len(ts) else -1
        t_batch = torch.full((x.shape[0],), step, dtype=torch.long, device=x.device)
        eps = activation_checkpoint(ddpm, x, t_batch, use_reentrant=False)
        x = schedule.ddim_step(x, eps, step, prev)
    return x


def _randn_like(x, generator: torch.Generator):
    return torch.randn(x.shape, generator=generator).to(device=x.device, dtype=x.dtype)


def make_noise(generator_net, x, eps):
    """G's noise for x; eps is the Gaussian noise a residual generator corrects (else unused)."""
    return generator_net(x, eps) if generator_net.residual else generator_net(x)


def generator_terms(generator_net, critic, ddpm, schedule, anomalous, normal, t: int, steps: int,
                    generator: torch.Generator, mse_target: str = "gaussian", checkpoint: bool = False):
    """(adversarial term -mean D(fake), MSE term): both differentiable in G's weights.

    The MSE's prediction side is denoised with gradients through the frozen DDPM; its target
    (see the module docstring) under no_grad. `normal` must have the batch size of
    `anomalous` (used by `paired` only).
    """
    if mse_target not in MSE_TARGETS:
        raise ValueError(f"mse_target must be one of {MSE_TARGETS}, got {mse_target!r}")
    eps = _randn_like(anomalous, generator)
    fake = schedule.add_noise(anomalous, make_noise(generator_net, anomalous, eps), t)
    adv = -critic(fake).mean()
    recon = denoise_through(ddpm, schedule, fake, t, steps, checkpoint)
    with torch.no_grad():
        if mse_target == "gaussian":
            target = schedule.denoise(ddpm, schedule.add_noise(anomalous, eps, t), t, steps)
        elif mse_target == "paired":
            if normal.shape != anomalous.shape:
                raise ValueError(f"paired MSE needs equal batches, got {tuple(normal.shape)} "
                                 f"and {tuple(anomalous.shape)}")
            target = schedule.denoise(ddpm, schedule.add_noise(normal, _randn_like(normal, generator), t), t, steps)
        else:
            target = anomalous
    return adv, F.mse_loss(recon, target)


# ----------------------------------------------------------------------------- training
def state_checksum(module: nn.Module) -> str:
    """sha256 of every parameter and buffer, bit for bit (names included)."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _sample(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """`size` indices into range(n): without replacement when n allows it."""
    if n >= size:
        return torch.randperm(n, generator=generator)[:size]
    return torch.randint(n, (size,), generator=generator)


def _step(optimizer, net, loss, clip: float, check) -> None:
    """Backward, clip, `check(norm)` (raises on a non-finite norm), then step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    check(float(torch.nn.utils.clip_grad_norm_(net.parameters(), clip)))
    optimizer.step()


def train_gan(generator_net, critic, ddpm, schedule, anomalous, normal, cfg, torch_gen, device,
              progress: bool = True, *, stage_name: str = "train_gan_noise", mse_target: str = "gaussian",
              checkpoint: bool = False):
    """Train G and the critic against the frozen `ddpm`; returns (history, summary).

    anomalous (Na, C, H, W), normal (Nn, C, H, W) in [-1, 1] (sizes may differ). cfg: the
    `gan` params (lr, batch_size, epochs, n_critic, gp_weight, mse_weight, t, denoise_steps,
    grad_clip, and optionally crop: 0 < crop < image side trains on a random crop of every image,
    all three networks being convolutional; a crop of an anomalous image may miss its defect,
    which the critic sees as a mixture, at a quarter of the cost for 32 of 64 px). An epoch is one pass over the anomalous set in generator steps (the last batch
    may be partial); before each generator step the critic takes n_critic steps on fresh
    random batches of the same size. Adam with betas (0.5, 0.9), gradient norms clipped.
    history: one row per generator step, critic columns averaged over its critic steps.
    A non-finite loss or gradient raises TrainingDiverged naming the step and the losses.
    The DDPM's weights are checked bit-identical at the end.
    """
    device = torch.device(device)
    generator_net.to(device).train()
    critic.to(device).train()
    ddpm.to(device)
    ddpm_state = (ddpm.training, [p.requires_grad for p in ddpm.parameters()])
    ddpm.eval().requires_grad_(False)
    checksum = state_checksum(ddpm)
    schedule.to(device)

    opt_g = torch.optim.Adam(generator_net.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(critic.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    n_a, n_n, bs, t = len(anomalous), len(normal), cfg.batch_size, cfg.t
    if n_a == 0 or n_n == 0:
        raise ValueError(f"need anomalous and normal images, got {n_a} and {n_n}")
    per_epoch = math.ceil(n_a / bs)
    crop = getattr(cfg, "crop", 0)
    if crop and crop >= min(*anomalous.shape[-2:], *normal.shape[-2:]):
        crop = 0  # a crop as large as the image is the whole image (as in train_ddpm)
    rows, step, started = [], 0, time.perf_counter()

    def guard(what: str, value: float, **losses):
        if not math.isfinite(value):
            shown = ", ".join(f"{k}={v:.4g}" for k, v in losses.items())
            raise TrainingDiverged(f"{stage_name}: step {step} (epoch {epoch}): {what} is not finite "
                                   f"({shown}); no checkpoint written; try a lower gan.lr or gan.grad_clip")

    def batch(images, idx):
        x = images[idx]
        return (random_crop(x, crop, torch_gen) if crop else x).to(device, non_blocking=True)

    bar = tqdm(total=cfg.epochs * per_epoch, desc=stage_name, disable=not progress, leave=False)
    try:
        for epoch in range(cfg.epochs):
            perm = torch.randperm(n_a, generator=torch_gen)
            for start in range(0, n_a, bs):
                idx = perm[start:start + bs]
                b = len(idx)
                crit = []
                for _ in range(cfg.n_critic):
                    x_a = batch(anomalous, _sample(n_a, b, torch_gen))
                    x_n = batch(normal, _sample(n_n, b, torch_gen))
                    with torch.no_grad():
                        noise = make_noise(generator_net, x_a, _randn_like(x_a, torch_gen))
                        fake = schedule.add_noise(x_a, noise, t)
                    real = schedule.add_noise(x_n, _randn_like(x_n, torch_gen), t)
                    loss_d, stats = critic_loss(critic, real, fake, cfg.gp_weight, torch_gen)
                    stats = dict(critic_loss=loss_d.item(), **stats)
                    guard("critic loss", stats["critic_loss"], **stats)
                    _step(opt_d, critic, loss_d, cfg.grad_clip, lambda n: guard("critic gradient norm", n, **stats))
                    crit.append(stats)

                x_a, x_n = batch(anomalous, idx), batch(normal, _sample(n_n, b, torch_gen))
                critic.requires_grad_(False)  # the G step needs gradients through D, not for D
                adv, mse = generator_terms(generator_net, critic, ddpm, schedule, x_a, x_n, t, cfg.denoise_steps,
                                           torch_gen, mse_target, checkpoint)
                loss_g = adv + cfg.mse_weight * mse
                losses = dict(gen_loss=loss_g.item(), adversarial=adv.item(), mse=mse.item(),
                              critic_loss=crit[-1]["critic_loss"])
                guard("generator loss", losses["gen_loss"], **losses)
                _step(opt_g, generator_net, loss_g, cfg.grad_clip,
                      lambda n: guard("generator gradient norm", n, **losses))
                critic.requires_grad_(True)

                row = dict(step=step, epoch=epoch, gen_loss=losses["gen_loss"], mse=losses["mse"])
                for key in ("critic_loss", "wasserstein", "grad_norm"):
                    row[key] = sum(c[key] for c in crit) / len(crit)
                rows.append(row)
                step += 1
                bar.update(1)
                bar.set_postfix(W=f"{row['wasserstein']:.3f}", G=f"{row['gen_loss']:.3f}", mse=f"{row['mse']:.4f}")
    finally:
        bar.close()
        critic.requires_grad_(True)
        ddpm.train(ddpm_state[0])
        for p, flag in zip(ddpm.parameters(), ddpm_state[1]):
            p.requires_grad_(flag)

    seconds = time.perf_counter() - started
    if state_checksum(ddpm) != checksum:  # cannot happen unless a bug gives the DDPM an optimizer
        raise AssertionError(f"{stage_name}: the frozen DDPM's weights changed during GAN training")
    history = pd.DataFrame(rows, columns=HISTORY_COLUMNS)
    last = history[history.epoch == history.epoch.max()]
    summary = {k: float(last[k].mean()) for k in HISTORY_COLUMNS[2:]}  # means over the last epoch
    summary.update(steps=step, epochs=cfg.epochs, seconds=seconds,
                   images_per_s=cfg.epochs * n_a / seconds if seconds > 0 else float("nan"),
                   ddpm_checksum=checksum, mse_target=mse_target)
    return history, summary


# ----------------------------------------------------------------------------- inference and files
@torch.no_grad()
def noise_for(generator_net, x, generator: torch.Generator | None = None):
    """G's noise for images x (B, C, H, W), in eval mode; a residual G draws its eps from `generator`."""
    was_training = generator_net.training
    generator_net.eval()
    try:
        eps = None
        if generator_net.residual:
            if generator is None:
                raise ValueError("a residual NoiseGenerator needs a torch.Generator for its Gaussian part")
            eps = _randn_like(x, generator)
        return make_noise(generator_net, x, eps)
    finally:
        generator_net.train(was_training)


def save_generator(path, net: NoiseGenerator, arch: dict | None = None, meta: dict | None = None) -> None:
    """Atomic, weights_only-loadable checkpoint: format, arch, state_dict, meta (plain types)."""
    arch = net.arch_config() if arch is None else dict(arch)
    if arch != net.arch_config():
        raise ValueError(f"arch {arch} does not describe this generator ({net.arch_config()})")
    io.save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "arch": arch,
                              "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                              "meta": dict(meta or {})})


def load_generator(path, device="cpu", expect_arch: dict | None = None):
    """(generator in eval mode, checkpoint dict). CheckpointError if the file is not a generator
    checkpoint, its arch differs from `expect_arch` (only the keys given are compared), or its
    weights do not fit its arch."""
    ckpt = io.load_checkpoint(path)
    if ckpt.get("format") != CHECKPOINT_FORMAT or "arch" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a GAN generator checkpoint (rerun train_gan_noise)")
    arch = ckpt["arch"]
    wrong = {k: (arch.get(k), v) for k, v in (expect_arch or {}).items() if arch.get(k) != v}
    if wrong:
        shown = ", ".join(f"{k}: saved {a!r}, expected {e!r}" for k, (a, e) in wrong.items())
        raise CheckpointError(f"{path}: generator built for another configuration ({shown}); rerun train_gan_noise")
    try:
        net = NoiseGenerator(**arch)
        net.load_state_dict(ckpt["state_dict"])
    except (TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path}: generator weights do not match its arch ({first})") from None
    return net.to(device).eval(), ckpt
