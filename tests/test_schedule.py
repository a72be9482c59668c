import math

import pytest
import torch

from anodiff.schedule import Schedule


@pytest.fixture
def sched():
    return Schedule(300, "linear", 1e-4, 0.02)


def test_constants_match_float64_closed_form(sched):
    betas = torch.linspace(1e-4, 0.02, 300, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    assert sched.alpha_bar.dtype == torch.float32
    assert torch.equal(sched.alpha_bar, abar.float())
    assert sched.alpha_bar[0].item() == pytest.approx(1 - 1e-4)
    assert sched.posterior_var[0].item() == 0.0


def test_cosine_schedule_is_decreasing_and_bounded():
    s = Schedule(100, "cosine")
    ab = s.alpha_bar
    assert torch.all(ab[1:] < ab[:-1]) and ab[-1] > 0 and s.betas.max() <= 0.999
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule(10, "quadratic")


def test_from_config_reads_ddpm_section():
    class Cfg:
        timesteps, schedule, beta_start, beta_end = 50, "cosine", 1e-4, 0.02
    s = Schedule.from_config(Cfg)
    assert s.timesteps == 50 and s.kind == "cosine"


def test_add_noise_at_t0_is_almost_x0_and_exact_formula(sched):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    x = sched.add_noise(x0, eps, 0)
    assert torch.allclose(x, x0, atol=0.011 * eps.abs().max().item() + 1e-6)
    t = torch.tensor([0, 10, 100, 299])
    x = sched.add_noise(x0, eps, t)
    ab = sched.alpha_bar[t].view(-1, 1, 1, 1)
    assert torch.allclose(x, ab.sqrt() * x0 + (1 - ab).sqrt() * eps, atol=1e-6)


def test_predict_x0_and_eps_invert_add_noise(sched):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 2, 8, 8, generator=g), torch.randn(3, 2, 8, 8, generator=g)
    t = torch.tensor([5, 150, 299])
    x_t = sched.add_noise(x0, eps, t)
    assert torch.allclose(sched.predict_x0(x_t, eps, t), x0, atol=1e-4)
    assert torch.allclose(sched.predict_eps(x_t, x0, t), eps, atol=1e-4)


def test_posterior_matches_bayes_formula(sched):
    x0, x_t = torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    t = 10
    b, ab, abp = (sched.betas[t].double(), sched.alpha_bar[t].double(), sched.alpha_bar[t - 1].double())
    mean, var = sched.posterior(x0, x_t, t)
    assert mean[0, 0, 0, 0].item() == pytest.approx((b * abp.sqrt() / (1 - ab)).item(), rel=1e-5)
    assert var.item() == pytest.approx((b * (1 - abp) / (1 - ab)).item(), rel=1e-5)


def test_ddim_step_to_minus_one_returns_x0_and_is_exact_with_true_eps(sched):
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(2, 1, 8, 8, generator=g) * 1.6 - 0.8
    eps = torch.randn(2, 1, 8, 8, generator=g)
    x_t = sched.add_noise(x0, eps, 80)
    assert torch.allclose(sched.ddim_step(x_t, eps, 80, -1), x0, atol=1e-4)
    # with the true eps a DDIM step lands exactly on q(x_{t_prev} | x0) with the same eps
    assert torch.allclose(sched.ddim_step(x_t, eps, 80, 40), sched.add_noise(x0, eps, 40), atol=1e-4)
    tt = torch.tensor([80, 80])
    assert torch.allclose(sched.ddim_step(x_t, eps, tt, torch.tensor([-1, -1])), x0, atol=1e-4)


def test_clip_keeps_predicted_x0_in_range(sched):
    x_t = torch.full((1, 1, 2, 2), 5.0)
    eps = torch.zeros_like(x_t)
    assert sched.ddim_step(x_t, eps, 10, -1, clip=True).max().item() == pytest.approx(1.0)
    assert sched.ddim_step(x_t, eps, 10, -1, clip=False).max().item() > 5.0


@pytest.mark.parametrize("t_start,steps,expected", [
    (60, 5, [60, 48, 36, 24, 12]),
    (299, 3, [299, 199, 99]),
    (4, 5, [4, 3, 2, 1, 0]),
    (0, 1, [0]),
    (10, 1, [10]),
])
def test_respace(sched, t_start, steps, expected):
    assert sched.respace(t_start, steps) == expected


def test_respace_always_distinct_descending(sched):
    for t_start in range(0, 300, 7):
        for steps in range(1, min(t_start + 1, 40) + 1):
            ts = sched.respace(t_start, steps)
            assert len(ts) == steps and ts[0] == t_start and ts[-1] >= 0
            assert all(a > b for a, b in zip(ts, ts[1:]))


def test_respace_rejects_bad_args(sched):
    with pytest.raises(ValueError):
        sched.respace(300, 5)
    with pytest.raises(ValueError):
        sched.respace(3, 5)


def test_denoise_with_oracle_model_recovers_x0_and_counts_calls(sched):
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(2, 1, 8, 8, generator=g) * 1.8 - 0.9
    eps = torch.randn(2, 1, 8, 8, generator=g)
    calls = []

    def oracle(x, t):  # knows x0, so returns the exact eps of x
        calls.append(t.clone())
        return sched.predict_eps(x, x0, t)

    out = sched.denoise(oracle, sched.add_noise(x0, eps, 60), 60, 5)
    assert len(calls) == 5 and calls[0].tolist() == [60, 60] and calls[0].dtype == torch.long
    assert torch.allclose(out, x0, atol=1e-4)


def test_denoise_golden_value_with_dummy_model():
    s = Schedule(10, "linear", 0.1, 0.2)
    x = torch.ones(1, 1, 1, 1)
    out = s.denoise(lambda x, t: 0.5 * x, x, 9, 3, clip=False)
    assert s.respace(9, 3) == [9, 6, 3]
    # hand computation in float64 of the same three DDIM steps (9 -> 6 -> 3 -> clean)
    ab = torch.cumprod(1 - torch.linspace(0.1, 0.2, 10, dtype=torch.float64), 0)
    v = 1.0
    for t, tp in ((9, 6), (6, 3), (3, None)):
        e = 0.5 * v
        x0 = (v - math.sqrt(1 - ab[t]) * e) / math.sqrt(ab[t])
        v = x0 if tp is None else math.sqrt(ab[tp]) * x0 + math.sqrt(1 - ab[tp]) * e
    assert out.item() == pytest.approx(v, rel=1e-5)


def test_denoise_is_differentiable(sched):
    x = torch.zeros(1, 1, 4, 4, requires_grad=True)
    w = torch.tensor(0.1, requires_grad=True)
    out = sched.denoise(lambda x, t: w * x, x + 0.5, 30, 3)
    out.sum().backward()
    assert w.grad is not None and x.grad is not None and x.grad.abs().sum() > 0


def test_denoise_recompute_gives_the_same_result_and_gradients(sched):
    """Activation checkpointing trades memory for time; values and gradients stay the same."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Tanh(),
                                torch.nn.Conv2d(4, 1, 3, padding=1))
    outs, grads = [], []
    for recompute in (False, True):
        x = torch.full((2, 1, 6, 6), 0.3, requires_grad=True)
        out = sched.denoise(lambda x, t: model(x), x, 30, 3, recompute=recompute)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append(x.grad)
    assert torch.equal(outs[0], outs[1])
    assert torch.allclose(grads[0], grads[1], rtol=1e-6, atol=0) and grads[0].abs().sum() > 0


def test_guided_denoise_is_ddad_and_w_over_one_minus_abar_heals_nothing(sched):
    """DDAD's step eps - w sqrt(1-abar) (y_t - x_t), checked in closed form with a model that says eps = 0:
    then y_t - x_t = -sqrt(1-abar) n, the guided eps is w (1-abar) n, and one DDIM step returns
    y + sqrt(1-abar) n (1 - w (1-abar)) / sqrt(abar): w = 1/(1-abar) gives back the input exactly."""
    g = torch.Generator().manual_seed(5)
    y = torch.rand(2, 1, 6, 6, generator=g) * 1.6 - 0.8
    n = torch.randn(2, 1, 6, 6, generator=g)
    t = 40
    x_t = sched.add_noise(y, n, t)
    ab = sched.alpha_bar[t].double().item()

    def zero(x, tt):
        return torch.zeros_like(x)

    for w in (0.0, 0.5 / (1 - ab), 1 / (1 - ab)):
        out = sched.denoise(zero, x_t, t, 1, clip=False, guide=y, guidance=w)
        expected = y + math.sqrt(1 - ab) * n * (1 - w * (1 - ab)) / math.sqrt(ab)
        torch.testing.assert_close(out, expected.float(), atol=1e-4, rtol=0)
    unguided = sched.denoise(zero, x_t, t, 1, clip=False)
    assert torch.equal(unguided, sched.denoise(zero, x_t, t, 1, clip=False, guide=y, guidance=0.0))
    assert (unguided - y).abs().mean() > 0.1  # without guidance the zero model does not give y back


def test_guided_denoise_pulls_toward_the_input(sched):
    """With an oracle that knows a different clean image, guidance moves the result towards the input."""
    g = torch.Generator().manual_seed(6)
    y, other = (torch.rand(2, 1, 8, 8, generator=g) * 1.6 - 0.8 for _ in range(2))
    x_t = sched.add_noise(y, torch.randn(2, 1, 8, 8, generator=g), 100)

    def oracle(x, t):
        return sched.predict_eps(x, other, t)

    errs = [(sched.denoise(oracle, x_t, 100, 5, guide=y, guidance=w) - y).abs().mean() for w in (0.0, 2.0, 5.0)]
    assert errs[0] > errs[1] > errs[2]


def test_ancestral_chain_takes_every_step_and_an_oracle_ends_at_x0(sched):
    """AnoDDPM's full chain: t_start + 1 model calls, t_start down to 0; with a model that knows x0 the
    posterior mean at t=0 is x0 whatever noise was drawn on the way; the noise comes from the generator."""
    g = torch.Generator().manual_seed(7)
    x0 = torch.rand(2, 1, 8, 8, generator=g) * 1.8 - 0.9
    x_t = sched.add_noise(x0, torch.randn(2, 1, 8, 8, generator=g), 20)
    calls = []

    def oracle(x, t):
        calls.append(int(t[0]))
        return sched.predict_eps(x, x0, t)

    out = sched.ancestral(oracle, x_t, 20, torch.Generator().manual_seed(1))
    assert calls == list(range(20, -1, -1))
    assert torch.allclose(out, x0, atol=1e-4)

    def zero(x, t):
        return torch.zeros_like(x)

    a, b, c = (sched.ancestral(zero, x_t, 20, torch.Generator().manual_seed(s)) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)  # seeded, and the chain does sample
    with pytest.raises(ValueError, match="t_start"):
        sched.ancestral(zero, x_t, sched.timesteps, torch.Generator())
