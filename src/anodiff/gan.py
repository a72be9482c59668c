"""SemanticDiffGAN's losses and training loop: learn the noise that lets a frozen DDPM heal an image.

G (noisegen.NoiseGenerator) maps an anomalous image x_a to a noise field; `add_noise(x_a, G(x_a), t)`
should look to a WGAN-GP critic D like a normal image noised with Gaussian noise, so the frozen
DDPM denoises it to a normal-looking image and |x_a - reconstruction| marks the defect. The
SemanticDiffGAN paper's Eq. 9 with the original code's defects fixed (docs/method.md, SemanticDiffGAN):

critic:    L_D = mean D(fake) - mean D(real) + gp_weight * mean_i (||grad D(x_hat_i)|| - 1)^2
generator: L_G = -mean D(fake) + mse_weight * MSE(denoise(fake), denoise(add_noise(x_a, eps, t)))
"""

from __future__ import annotations

import hashlib
import math
import time

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from anodiff import distributed, noise
from anodiff.errors import TrainingDiverged
from anodiff.train import random_crop

HISTORY_COLUMNS = ["step", "epoch", "critic_loss", "wasserstein", "grad_norm", "gen_loss", "mse"]


# ----------------------------------------------------------------------------- losses
# Under torchrun (anodiff.distributed) every rank draws the whole global batch of b samples, and
# every random number of it, exactly as one process does; `part` = (positions, valid, b) is this
# rank's share (distributed.my_shard). The losses are then this rank's terms of the global batch's
# means (a sum over its valid samples / b), which the ranks' terms sum to.
def _mine(tensor: torch.Tensor, part) -> torch.Tensor:
    """This rank's samples of a global batch (all of them without `part`)."""
    return tensor if part is None else tensor[part[0].to(tensor.device)]


def _penalty(critic, real, fake, rng: torch.Generator, part=None):
    """(per-sample (||grad|| - 1)^2, per-sample gradient norms); see gradient_penalty."""
    n = real.shape[0] if part is None else part[2]
    alpha = _mine(torch.rand(n, *([1] * (real.dim() - 1)), generator=rng), part)
    alpha = alpha.to(device=real.device, dtype=real.dtype)  # (B, 1, 1, 1): one weight per sample
    x_hat = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    norms = grad.flatten(1).norm(2, dim=1)  # (B,) over each whole flattened sample
    return (norms - 1) ** 2, norms.detach()


def gradient_penalty(critic, real, fake, rng: torch.Generator) -> torch.Tensor:
    """mean_i (||grad_x D(x_hat_i)||_2 - 1)^2 at x_hat_i = a_i real_i + (1 - a_i) fake_i, a_i ~ U(0, 1).

    Differentiable in the critic's weights (create_graph=True), as the critic step needs.
    """
    return _penalty(critic, real, fake, rng)[0].mean()


def _share(per_sample: torch.Tensor, part) -> torch.Tensor:
    """This rank's term of the global batch's mean of `per_sample` (this rank's samples)."""
    return (per_sample * part[1].to(per_sample.device, per_sample.dtype)).sum() / part[2]


def critic_loss(critic, real, fake, gp_weight: float, rng: torch.Generator, part=None):
    """The SemanticDiffGAN paper's Eq. 9: mean D(fake) - mean D(real) + gp_weight * GP -> (loss, stats).

    `real`: normal images noised with Gaussian noise; `fake`: anomalous images noised with G's
    noise. The critic scores normal-looking inputs high. stats: floats `wasserstein`
    (mean D(real) - mean D(fake), the critic's distance estimate), `grad_norm` (mean
    ||grad D|| at the interpolates; 1 when the penalty is satisfied), `gp` and `critic_loss`.
    With `part` (this rank's share, see above) the loss is this rank's term, scaled by the number
    of ranks for DDP's gradient average, and the stats are the global batch's.
    """
    if part is None:
        d_real, d_fake = critic(real).mean(), critic(fake.detach()).mean()
        gp, norms = _penalty(critic, real, fake, rng)
        gp = gp.mean()
        loss = d_fake - d_real + gp_weight * gp
        stats = dict(critic_loss=loss.item(), wasserstein=(d_real - d_fake).item(), grad_norm=norms.mean().item(),
                     gp=gp.item())
        return loss, stats
    d_real, d_fake = critic(real), critic(fake.detach())
    gp, norms = _penalty(critic, real, fake, rng, part)
    loss = _share(d_fake - d_real + gp_weight * gp, part)
    totals = distributed.global_sums([loss, _share(d_real - d_fake, part), _share(norms, part), _share(gp, part)])
    stats = dict(zip(("critic_loss", "wasserstein", "grad_norm", "gp"), totals))
    return loss * distributed.world()[1], stats


def _fake(net, schedule, x, t: int, rng: torch.Generator, part=None):
    """(x noised to t with G's noise, the Gaussian eps drawn for it): this rank's share with `part`
    (the noise is drawn for the whole global batch x all the same).

    eps is drawn for every G, residual or not: the MSE target needs it."""
    eps = noise.for_batch(x, rng)
    x, eps = _mine(x, part), _mine(eps, part)
    return schedule.add_noise(x, net(x, eps), t), eps


def generator_terms(net, critic, ddpm, schedule, anomalous, t: int, steps: int, rng: torch.Generator,
                    recompute: bool = False, part=None):
    """(adversarial term -mean D(fake), MSE term): both differentiable in G's weights.

    The MSE's prediction is denoised with gradients through the frozen DDPM (recompute: see
    Schedule.denoise); its target, under no_grad, is the DDPM's own reconstruction of the same
    image noised with Gaussian noise. With `part`: this rank's terms of the global batch's
    (their sums over the ranks are the global terms).
    """
    if part is not None:
        fake, eps = _fake(net, schedule, anomalous, t, rng, part)
        x = _mine(anomalous, part)
        adv = _share(-critic(fake), part)
        recon = schedule.denoise(ddpm, fake, t, steps, recompute=recompute)
        with torch.no_grad():
            target = schedule.denoise(ddpm, schedule.add_noise(x, eps, t), t, steps)
        return adv, _share((recon - target).pow(2).flatten(1).mean(dim=1), part)
    # Why this target: the SemanticDiffGAN paper's "MSE between the DDPM's output for the
    # anomalous input and its output for a normal input", read literally, pairs image i with an
    # unrelated normal image, which pulls every reconstruction to the mean normal image and erases
    # the texture that separates a defect from its surroundings (it lost, as did the input itself
    # as target). Against the plain DDPM's reconstruction of the same image, G must stay as
    # faithful everywhere and pay for healing the defect with the critic's gain: a minimal,
    # local change, as in fixed-point translation (Siddiquee et al., ICCV 2019). A residual G
    # starts at exactly eps, so the term starts at 0.
    fake, eps = _fake(net, schedule, anomalous, t, rng)
    adv = -critic(fake).mean()
    recon = schedule.denoise(ddpm, fake, t, steps, recompute=recompute)
    with torch.no_grad():
        target = schedule.denoise(ddpm, schedule.add_noise(anomalous, eps, t), t, steps)
    return adv, F.mse_loss(recon, target)


# ----------------------------------------------------------------------------- training
def state_checksum(module: nn.Module) -> str:
    """sha256 of every parameter and buffer, bit for bit (names included), whatever their memory
    layout (channels_last weights give the checksum of the same weights stored contiguously)."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _sample(n: int, size: int, rng: torch.Generator) -> torch.Tensor:
    """`size` indices into range(n): without replacement when n allows it."""
    if n >= size:
        return torch.randperm(n, generator=rng)[:size]
    return torch.randint(n, (size,), generator=rng)


def _step(optimizer, net, loss, clip: float, check) -> None:
    """Backward, clip, `check(norm)` (raises on a non-finite norm), then step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    check(float(torch.nn.utils.clip_grad_norm_(net.parameters(), clip)))
    optimizer.step()


def train_gan(net, critic, ddpm, schedule, anomalous, normal, *, rng: torch.Generator, device, lr: float,
              batch_size: int, epochs: int, n_critic: int, gp_weight: float, mse_weight: float, t: int,
              denoise_steps: int, grad_clip: float, crop: int, recompute: bool = False, selection=None,
              stage_name: str = "train_gan_noise", progress: bool = True, snapshots=None):
    """Train G (`net`) and the critic against the frozen `ddpm` at step t; returns (history, summary).

    Model selection: `selection` (a `gan_selection.Selection`, duck-typed: `consider(net, step)`,
    `due(step)`, `keep(net)`, `candidates`, `state_dict`, `load_state_dict`) is handed G before the
    first step, after every generator step it says is due and after the last, and `net` ends with
    the weights it keeps. Without it `net` ends with the last weights. summary["selection"] lists
    every candidate's figures (none without a selection); summary["selected_step"] is the one kept.

    anomalous (Na, C, H, W), normal (Nn, C, H, W) in [-1, 1] (sizes may differ). An epoch is one
    pass over the anomalous set in generator steps (the last batch may be partial); before each
    the critic takes n_critic steps on fresh random batches of the same size. 0 < crop < image
    side trains on random crops (all three networks are convolutional; a crop may miss the
    defect, which D sees as a mixture). Adam with betas (0.5, 0.9) and learning rate `lr` for
    both networks, gradient norms clipped; all randomness from `rng`. history: one row per
    generator step, critic columns averaged over its steps. A non-finite loss or gradient raises
    TrainingDiverged naming the step and the losses. The DDPM's weights are checked bit-identical
    at the end. `snapshots` (resume.Snapshots): save the state at epochs' ends, and resume from it
    when it matches.

    Under torchrun (anodiff.distributed) G and D are wrapped in DistributedDataParallel and each
    rank computes its share of every global batch, which every rank draws whole (see `part`
    above): the weights follow a one-process run up to float rounding, and the global batch stays
    `batch_size`. Rank 0 alone saves snapshots; pass `selection` on rank 0 only (it selects and
    keeps G there, the rank that writes it).
    """
    device = torch.device(device)
    net.to(device).train()
    critic.to(device).train()
    ddpm.to(device)
    ddpm_state = (ddpm.training, [p.requires_grad for p in ddpm.parameters()])
    ddpm.eval().requires_grad_(False)
    checksum = state_checksum(ddpm)
    schedule.to(device)

    opt_g = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(critic.parameters(), lr=lr, betas=(0.5, 0.9))
    rank, ranks = distributed.world()
    n_a, n_n, bs = len(anomalous), len(normal), batch_size
    if n_a == 0 or n_n == 0:
        raise ValueError(f"need anomalous and normal images, got {n_a} and {n_n}")
    per_epoch = math.ceil(n_a / bs)
    if crop and crop >= min(*anomalous.shape[-2:], *normal.shape[-2:]):
        crop = 0  # a crop as large as the image is the whole image (as in train_ddpm)
    rows, step, first_epoch, before = [], 0, 0, 0.0
    state = snapshots.load() if snapshots is not None else None
    if state is not None:
        net.load_state_dict(state["net"])
        critic.load_state_dict(state["critic"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        rng.set_state(state["rng"])
        if selection is not None and state["selection"] is not None:
            selection.load_state_dict(state["selection"])
        rows = state["rows"]
        step, first_epoch, before = state["step"], state["epoch"], state["seconds"]
    # DDP where gradients are all-reduced: G in its own step, D in the critic's. G's no-grad calls and
    # D's frozen use in G's step go to the plain modules (a DDP forward would wait for a backward)
    g_net, d_net = (distributed.wrap(net, device), distributed.wrap(critic, device)) if ranks > 1 else (net, critic)
    started = time.perf_counter()

    def guard(what: str, value: float, **losses):
        if not math.isfinite(value):
            shown = ", ".join(f"{k}={v:.4g}" for k, v in losses.items())
            raise TrainingDiverged(f"{stage_name}: step {step} (epoch {epoch}): {what} is not finite "
                                   f"({shown}); no checkpoint written; try a lower gan.lr or gan.grad_clip")

    def batch(images, idx):
        x = images[idx]
        return (random_crop(x, crop, rng) if crop else x).to(device, non_blocking=True)

    bar = tqdm(total=epochs * per_epoch, initial=step, desc=stage_name, disable=not progress, leave=False)
    try:
        epoch = first_epoch
        if state is None and selection is not None:
            selection.consider(net, 0)
        for epoch in range(first_epoch, epochs):
            perm = torch.randperm(n_a, generator=rng)
            for start in range(0, n_a, bs):
                idx = perm[start:start + bs]
                b = len(idx)
                part = (*distributed.my_shard(b), b) if ranks > 1 else None
                crit = []
                for _ in range(n_critic):
                    x_a = batch(anomalous, _sample(n_a, b, rng))
                    x_n = batch(normal, _sample(n_n, b, rng))
                    with torch.no_grad():
                        fake = _fake(net, schedule, x_a, t, rng, part)[0]
                    eps_n = noise.for_batch(x_n, rng)
                    real = schedule.add_noise(_mine(x_n, part), _mine(eps_n, part), t)
                    loss_d, stats = critic_loss(d_net, real, fake, gp_weight, rng, part)
                    guard("critic loss", stats["critic_loss"], **stats)
                    _step(opt_d, critic, loss_d, grad_clip, lambda n: guard("critic gradient norm", n, **stats))
                    crit.append(stats)

                x_a = batch(anomalous, idx)
                critic.requires_grad_(False)  # the G step needs gradients through D, not for D
                adv, mse = generator_terms(g_net, critic, ddpm, schedule, x_a, t, denoise_steps, rng, recompute, part)
                loss_g = adv + mse_weight * mse
                values = [loss_g.item(), adv.item(), mse.item()] if part is None else \
                    distributed.global_sums([loss_g, adv, mse])
                losses = dict(zip(("gen_loss", "adversarial", "mse"), values), critic_loss=crit[-1]["critic_loss"])
                if ranks > 1:
                    loss_g = loss_g * ranks  # DDP averages the ranks' gradients: this rank's term, scaled
                guard("generator loss", losses["gen_loss"], **losses)
                _step(opt_g, net, loss_g, grad_clip, lambda n: guard("generator gradient norm", n, **losses))
                critic.requires_grad_(True)

                row = dict(step=step, epoch=epoch, gen_loss=losses["gen_loss"], mse=losses["mse"])
                for key in ("critic_loss", "wasserstein", "grad_norm"):
                    row[key] = sum(c[key] for c in crit) / len(crit)
                rows.append(row)
                step += 1
                bar.update(1)
                bar.set_postfix(W=f"{row['wasserstein']:.3f}", G=f"{row['gen_loss']:.3f}", mse=f"{row['mse']:.4f}")
                if selection is not None and selection.due(step):
                    selection.consider(net, step)
            if snapshots is not None and epoch + 1 < epochs and rank == 0:
                snapshots.maybe_save(lambda: {
                    "net": net.state_dict(), "critic": critic.state_dict(), "opt_g": opt_g.state_dict(),
                    "opt_d": opt_d.state_dict(), "rng": rng.get_state(), "rows": rows,
                    "selection": selection.state_dict() if selection is not None else None,
                    "step": step, "epoch": epoch + 1, "seconds": before + time.perf_counter() - started})
        if selection is not None:
            selection.consider(net, step)
    finally:
        bar.close()
        critic.requires_grad_(True)
        ddpm.train(ddpm_state[0])
        for p, flag in zip(ddpm.parameters(), ddpm_state[1]):
            p.requires_grad_(flag)

    selected = selection.keep(net) if selection is not None else None
    seconds = before + time.perf_counter() - started
    if state_checksum(ddpm) != checksum:  # cannot happen unless a bug gives the DDPM an optimizer
        raise AssertionError(f"{stage_name}: the frozen DDPM's weights changed during GAN training")
    history = pd.DataFrame(rows, columns=HISTORY_COLUMNS)
    last = history[history.epoch == history.epoch.max()]
    summary = {k: float(last[k].mean()) for k in HISTORY_COLUMNS[2:]}  # means over the last epoch
    summary.update(steps=step, epochs=epochs, seconds=seconds,
                   images_per_s=epochs * n_a / seconds if seconds > 0 else float("nan"), ddpm_checksum=checksum,
                   selected_step=step if selected is None else selected,
                   selection=list(selection.candidates) if selection is not None else [])
    return history, summary
