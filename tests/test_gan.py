"""Exact expectations for anodiff.gan (losses and training) on tiny models (8 px, a few channels)."""

import math

import pytest
import torch
from torch import nn

from anodiff import gan as G
from anodiff import noise
from anodiff.errors import TrainingDiverged
from anodiff.gan_selection import Selection
from anodiff.noisegen import Critic, NoiseGenerator
from anodiff.schedule import Schedule
from anodiff.unet import UNet

C, S = 3, 8  # channels, image side


def _cfg(**kw):
    """train_gan's keywords (the stage unpacks them from params.gan)."""
    base = dict(lr=1e-3, batch_size=4, epochs=1, n_critic=2, gp_weight=10.0, mse_weight=1.0, t=6,
                denoise_steps=2, grad_clip=1.0, crop=0)
    return {**base, **kw}


def _ddpm():
    torch.manual_seed(0)
    return UNet(C, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(), image_size=S)


def _nets(residual=False):
    torch.manual_seed(1)
    return NoiseGenerator(C, 4, 2, 1.5, residual=residual), Critic(C, 4)


def _images(n, seed):
    return torch.rand((n, C, S, S), generator=torch.Generator().manual_seed(seed)) * 2 - 1


SCHEDULE = Schedule(20, "linear", 1e-4, 0.02)


# ---------------------------------------------------------------------- gradient penalty
class Linear(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        return (x.flatten(1) * self.w).sum(1)


@pytest.mark.parametrize("scale", [0.3, 1.0, 2.5])
def test_gradient_penalty_of_a_linear_critic_is_norm_minus_one_squared(scale):
    w = torch.randn(C * S * S, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    w = w / w.norm() * scale
    real, fake = _images(5, 1).double(), _images(5, 2).double()
    gp = G.gradient_penalty(Linear(w), real, fake, torch.Generator().manual_seed(0))
    assert gp.item() == pytest.approx((scale - 1) ** 2, abs=1e-12)


def test_gradient_penalty_draws_one_weight_per_sample_and_flattens_each_sample():
    # D(x) = 0.5 ||x||^2: grad at x_hat_i is x_hat_i, so its norm depends on the sample's own alpha_i
    critic = lambda x: 0.5 * x.flatten(1).pow(2).sum(1)  # noqa: E731
    real, fake = _images(6, 1).double(), _images(6, 2).double()
    gp = G.gradient_penalty(critic, real, fake, torch.Generator().manual_seed(7))
    alpha = torch.rand(6, 1, 1, 1, generator=torch.Generator().manual_seed(7)).double()
    x_hat = alpha * real + (1 - alpha) * fake
    expected = ((x_hat.flatten(1).norm(dim=1) - 1) ** 2).mean()
    assert gp.item() == pytest.approx(expected.item(), rel=1e-12)


def test_critic_loss_is_fake_minus_real_plus_weighted_penalty():
    w = torch.full((C * S * S,), 0.01)
    critic = Linear(w)
    real, fake = _images(4, 1), _images(4, 2)
    loss, stats = G.critic_loss(critic, real, fake, 10.0, torch.Generator().manual_seed(0))
    d_real, d_fake = critic(real).mean(), critic(fake).mean()
    gp = (w.norm() - 1) ** 2
    assert loss.item() == pytest.approx((d_fake - d_real + 10 * gp).item(), rel=1e-5)
    assert stats["wasserstein"] == pytest.approx((d_real - d_fake).item(), rel=1e-5)
    assert stats["grad_norm"] == pytest.approx(w.norm().item(), rel=1e-5)
    # the critic is trained to score the real (normal) side high: its loss falls as D(real) rises
    loss.backward()
    assert torch.allclose(critic.w.grad, (fake - real).flatten(1).mean(0) + 10 * 2 * (w.norm() - 1) * w / w.norm(),
                          atol=1e-6)


# ---------------------------------------------------------------------- gradient through the DDPM
def test_mse_term_reaches_the_generator_through_the_frozen_ddpm():
    ddpm = _ddpm().eval().requires_grad_(False)
    net, critic = _nets()
    adv, mse = G.generator_terms(net, critic, ddpm, SCHEDULE, _images(3, 0), 6, 2, torch.Generator().manual_seed(0))
    mse.backward()  # the MSE term alone: its only path to G is the denoising
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert net.conv_in.weight.grad.abs().sum() > 0  # all the way back to G's first layer
    assert all(p.grad is None for p in ddpm.parameters())


def test_activation_checkpointing_gives_the_same_gradients():
    ddpm = _ddpm().eval().requires_grad_(False)
    grads = []
    for recompute in (False, True):
        net, critic = _nets()
        _, mse = G.generator_terms(net, critic, ddpm, SCHEDULE, _images(2, 0), 6, 2, torch.Generator().manual_seed(0),
                                   recompute=recompute)
        mse.backward()
        grads.append(net.conv_in.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-8)


def test_residual_generator_starts_as_gaussian_noise_with_zero_mse():
    ddpm = _ddpm().eval()
    net, critic = _nets(residual=True)
    x = _images(3, 0)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    assert torch.equal(net(x, eps), eps)
    assert torch.equal(noise.for_batch(x, torch.Generator().manual_seed(4), net=net), eps)
    _, mse = G.generator_terms(net, critic, ddpm, SCHEDULE, x, 6, 2, torch.Generator().manual_seed(0))
    assert mse.item() == 0.0


# ---------------------------------------------------------------------- training
def _train(cfg, anomalous, normal, seed=0, **kw):
    ddpm = _ddpm()
    net, critic = _nets(kw.pop("residual", False))
    history, summary = G.train_gan(net, critic, ddpm, SCHEDULE, anomalous, normal,
                                   rng=torch.Generator().manual_seed(seed), device="cpu", progress=False,
                                   **cfg, **kw)
    return net, ddpm, history, summary


def test_a_generator_step_changes_the_generator_and_leaves_the_ddpm_bit_identical():
    ddpm = _ddpm()
    ddpm.train()
    before = {k: v.clone() for k, v in ddpm.state_dict().items()}
    net, critic = _nets()
    g_before = {k: v.clone() for k, v in net.state_dict().items()}
    history, summary = G.train_gan(net, critic, ddpm, SCHEDULE, _images(4, 0), _images(6, 1),
                                   rng=torch.Generator().manual_seed(0), device="cpu", progress=False, **_cfg())
    assert len(history) == 1
    assert any(not torch.equal(v, g_before[k]) for k, v in net.state_dict().items())
    after = ddpm.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert summary["ddpm_checksum"] == G.state_checksum(ddpm)
    # the DDPM is handed back as it came (mode and trainable flags)
    assert ddpm.training and all(p.requires_grad for p in ddpm.parameters())


def test_partial_batches_and_a_normal_set_smaller_than_a_batch():
    # 5 anomalous with batch 4: steps of 4 and 1; 3 normal images: sampled with replacement
    cfg = _cfg(epochs=2)
    _, _, history, summary = _train(cfg, _images(5, 0), _images(3, 1))
    assert list(history.columns) == G.HISTORY_COLUMNS
    assert list(history.step) == [0, 1, 2, 3] and list(history.epoch) == [0, 0, 1, 1]
    assert history.drop(columns=["step", "epoch"]).map(math.isfinite).all().all()
    assert summary["steps"] == 4 and summary["images_per_s"] > 0


def test_training_on_crops_keeps_whole_image_inference():
    big = lambda n, seed: torch.rand((n, C, 16, 16), generator=torch.Generator().manual_seed(seed)) * 2 - 1  # noqa: E731
    net, _, history, _ = _train(_cfg(crop=8), big(4, 0), big(4, 1))
    assert len(history) == 1
    assert noise.for_batch(big(2, 2), torch.Generator(), net=net).shape == (2, C, 16, 16)
    # a crop as large as the image or larger means whole images, as in train_ddpm
    whole = _train(_cfg(crop=0), big(4, 0), big(4, 1))[2]
    assert whole.equals(_train(_cfg(crop=16), big(4, 0), big(4, 1))[2])
    assert whole.equals(_train(_cfg(crop=32), big(4, 0), big(4, 1))[2])


def test_training_is_reproducible_from_the_seed():
    cfg = _cfg()
    a = _train(cfg, _images(4, 0), _images(4, 1))[2]
    b = _train(cfg, _images(4, 0), _images(4, 1))[2]
    assert a.equals(b)


def test_nan_guard_names_the_stage_step_and_losses():
    anomalous = _images(4, 0)
    anomalous[1, 0, 2, 2] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"train_gan_noise: step 0 .*not finite.*critic_loss="):
        _train(_cfg(), anomalous, _images(4, 1))


def test_training_keywords_have_no_hidden_defaults():
    for key in _cfg():
        kw = {k: v for k, v in _cfg().items() if k != key}
        with pytest.raises(TypeError, match=key):
            _train(kw, _images(4, 0), _images(4, 1))


def test_both_networks_take_the_one_learning_rate():
    def moved(lr):
        ddpm = _ddpm()
        net, critic = _nets()
        start = [{k: v.clone() for k, v in m.state_dict().items()} for m in (net, critic)]
        G.train_gan(net, critic, ddpm, SCHEDULE, _images(4, 0), _images(4, 1), rng=torch.Generator().manual_seed(0),
                    device="cpu", progress=False, **_cfg(lr=lr))
        return [max((m.state_dict()[k] - v).abs().max().item() for k, v in s.items())
                for m, s in zip((net, critic), start)]

    # Adam's first steps move each weight by about lr, whatever the gradient's scale
    assert moved(1e-3) == pytest.approx([1e-3, 2e-3], rel=0.05)  # one generator step, n_critic=2 critic steps
    assert moved(1e-5) == pytest.approx([1e-5, 2e-5], rel=0.05)


# ---------------------------------------------------------------------- model selection on val
def test_the_kept_generator_is_the_best_on_val_of_the_candidates_evaluated():
    """Scripted val figures: the start, a candidate better on maps but worse on image AUROC (not
    kept), one better on both (kept), one better on both but less so."""
    script = iter([(0.80, 0.80), (0.95, 0.70), (0.85, 0.85), (0.81, 0.82)])
    seen = []

    def evaluate(g):
        seen.append({k: v.clone() for k, v in g.state_dict().items()})
        m, i = next(script)
        return {"map_criterion": m, "image_auroc": i}

    net, _, history, summary = _train(_cfg(epochs=3, batch_size=4), _images(4, 0), _images(4, 1), residual=True,
                                      selection=Selection(evaluate, every=1))
    assert [c["step"] for c in summary["selection"]] == [0, 1, 2, 3]
    assert summary["selected_step"] == 2
    assert all(torch.equal(v, seen[2][k]) for k, v in net.state_dict().items())
    # the start of a residual generator adds no correction: it is the plain ddpm method
    assert not seen[0]["conv_out.weight"].any() and not seen[0]["conv_out.bias"].any()


def test_selection_keeps_the_start_when_nothing_beats_it_and_evaluates_the_last_step():
    calls = []

    def evaluate(g):
        calls.append({k: v.clone() for k, v in g.state_dict().items()})
        return {"map_criterion": 0.9 if len(calls) == 1 else 0.5, "image_auroc": 0.9}

    net, _, history, summary = _train(_cfg(epochs=3), _images(4, 0), _images(4, 1), residual=True,
                                      selection=Selection(evaluate, every=2))
    assert [c["step"] for c in summary["selection"]] == [0, 2, 3]  # start, every 2 steps, the last
    assert summary["selected_step"] == 0
    assert all(torch.equal(v, calls[0][k]) for k, v in net.state_dict().items())
    assert not net.conv_out.weight.any()


def test_without_a_selection_the_last_generator_is_kept():
    net, _, history, summary = _train(_cfg(epochs=2), _images(4, 0), _images(4, 1), residual=True)
    assert summary["selection"] == [] and summary["selected_step"] == summary["steps"] == 2
    assert net.conv_out.weight.any()  # trained: not the start


def test_state_checksum_is_the_weights_not_their_layout():
    torch.manual_seed(0)
    net = UNet(3, 8, (1, 2), 1, (), 16)
    plain = G.state_checksum(net)
    assert G.state_checksum(net.to(memory_format=torch.channels_last)) == plain  # 1x1 kernels included
    with torch.no_grad():
        net.conv_in.bias[0] += 1e-6
    assert G.state_checksum(net) != plain
