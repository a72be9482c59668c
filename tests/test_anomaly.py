"""Exact tests of the anomaly-map steps (reconstruct, error_map, smooth, NormalStats,
image_scores) and of the Detector that chains them for `infer` and `predict`."""

import math

import pytest
import torch
from torch import nn

from anodiff import anomaly
from anodiff.detector import Detector, NoiseModel, image_rngs, memory_format
from anodiff.gan import state_checksum
from conftest import infer_settings
from anodiff.schedule import Schedule
from anodiff.unet import UNet



def _images(n=4, c=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g) * 1.8 - 0.9  # inside [-1, 1]: clip is a no-op


class ExactNoise(nn.Module):
    """A 'perfect denoiser' for one known noise: always predicts exactly that noise."""

    def __init__(self, noise):
        super().__init__()
        self.noise = noise
        self.calls = []

    def forward(self, x_t, t):
        self.calls.append(t.clone())
        return self.noise


class Identity(nn.Module):
    """Dummy 'reconstruction model' for error_map tests: hands the input back."""

    def forward(self, x):
        return x


def _tiny_unet(channels=3, seed=0):
    torch.manual_seed(seed)
    return UNet(channels, base_channels=4, channel_mults=(1, 2), num_res_blocks=1,
                attention_resolutions=(), image_size=8)


# ------------------------------------------------------------------ reconstruct
@pytest.mark.parametrize("t_start,steps", [(5, 1), (9, 3), (9, 10), (0, 1)])
def test_reconstruct_with_true_noise_returns_x0(t_start, steps):
    x0 = _images()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    model = ExactNoise(noise)
    x_hat = anomaly.reconstruct(model, Schedule(timesteps=10), x0, noise, t_start, steps)
    assert x_hat.shape == x0.shape
    torch.testing.assert_close(x_hat, x0, atol=1e-5, rtol=0)
    # one model call per DDIM step, starting exactly at t_start, batch-shaped t
    assert len(model.calls) == steps
    assert model.calls[0].tolist() == [t_start] * len(x0)


def test_reconstruct_wrong_noise_does_not_return_x0():
    x0 = _images()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    x_hat = anomaly.reconstruct(ExactNoise(torch.zeros_like(noise)), Schedule(timesteps=10), x0, noise, 9, 2)
    assert (x_hat - x0).abs().max() > 1e-2


# ------------------------------------------------------------------ error_map
@pytest.mark.parametrize("kind", ["abs", "sq"])
def test_perfect_reconstruction_gives_all_zero_map(kind):
    x = _images()
    m = anomaly.error_map(x, Identity()(x), kind)
    assert m.shape == (4, 1, 8, 8)
    assert torch.count_nonzero(m) == 0


def test_error_map_exact_values():
    x = torch.zeros(1, 3, 4, 4)
    x_hat = x.clone()
    x_hat[0, 0, 1, 2] = 0.6  # one channel of one pixel off by 0.6: channel mean is 0.2
    x_hat[0, :, 3, 3] = -0.5  # all three channels of another pixel off by 0.5
    a = anomaly.error_map(x, x_hat, "abs")
    s = anomaly.error_map(x, x_hat, "sq")
    expect_a = torch.zeros(1, 1, 4, 4)
    expect_a[0, 0, 1, 2], expect_a[0, 0, 3, 3] = 0.2, 0.5
    expect_s = torch.zeros(1, 1, 4, 4)
    expect_s[0, 0, 1, 2], expect_s[0, 0, 3, 3] = 0.36 / 3, 0.25
    torch.testing.assert_close(a, expect_a)
    torch.testing.assert_close(s, expect_s)


def test_unknown_error_kind():
    with pytest.raises(ValueError, match="unknown error kind"):
        anomaly.error_map(_images(), _images(), "l1")


# ------------------------------------------------------------------ smooth
@pytest.mark.parametrize("sigma", [0.5, 1.0, 4.0])
def test_smooth_keeps_constant_map(sigma):
    m = torch.full((2, 1, 8, 8), 3.25)
    out = anomaly.smooth(m, sigma)
    assert out.shape == m.shape
    assert out.mean().item() == pytest.approx(3.25, abs=1e-6)
    torch.testing.assert_close(out, m, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sigma", [0, 0.0, -1.0])
def test_smooth_sigma_zero_is_identity(sigma):
    m = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(anomaly.smooth(m, sigma), m)


def test_smooth_spreads_a_peak_and_keeps_its_mass_in_the_interior():
    m = torch.zeros(1, 1, 16, 16)
    m[0, 0, 8, 8] = 1.0
    out = anomaly.smooth(m, 1.0)
    assert out[0, 0, 8, 8] < 1.0 and out[0, 0, 8, 9] > 0
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5)  # kernel +-3 px stays off the border
    assert torch.argmax(out).item() == 8 * 16 + 8


# ------------------------------------------------------------------ NormalStats
def _known_stats_maps(mean, std):
    """Two maps whose per-pixel sample mean is `mean` and sample std (unbiased) is `std`."""
    d = std / math.sqrt(2.0)  # values mean +- std/sqrt(2): unbiased std over N=2 is exactly std
    return torch.stack([mean + d, mean - d])


def test_normal_stats_fit_constant_mean_std_standardises():
    mean = torch.full((1, 8, 8), 3.0)
    std = torch.full((1, 8, 8), 2.0)
    maps = _known_stats_maps(mean, std)
    stats = anomaly.NormalStats.fit(maps)  # default smoothing: a constant field is unchanged
    torch.testing.assert_close(stats.mean, mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.std, std, atol=1e-5, rtol=0)
    z = stats.normalize(maps)
    assert z.shape == maps.shape
    torch.testing.assert_close(z.mean(dim=0), torch.zeros(1, 8, 8), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dim=0), torch.ones(1, 8, 8), atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.normalize(mean.unsqueeze(0) + 4.0), torch.full((1, 1, 8, 8), 2.0))


def test_normal_stats_fit_per_pixel_without_smoothing():
    g = torch.Generator().manual_seed(0)
    mean = torch.rand(1, 8, 8, generator=g) * 5
    std = torch.rand(1, 8, 8, generator=g) + 0.5  # all above the 10% floor
    maps = _known_stats_maps(mean, std)
    stats = anomaly.NormalStats.fit(maps, smooth_sigma=0)
    torch.testing.assert_close(stats.mean, mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.std, std, atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.normalize(maps).mean(dim=0), torch.zeros(1, 8, 8), atol=1e-5, rtol=0)


def test_normal_stats_floor_on_spread():
    mean = torch.zeros(1, 4, 4)
    std = torch.ones(1, 4, 4)
    std[0, 0, 0] = 0.0  # a pixel that never varied: its spread is floored at 10% of the mean spread
    stats = anomaly.NormalStats.fit(_known_stats_maps(mean, std), smooth_sigma=0)
    floor = 0.1 * (15 / 16) + 1e-8
    assert stats.std[0, 0, 0].item() == pytest.approx(floor, rel=1e-5)
    assert torch.isfinite(stats.normalize(torch.ones(1, 1, 4, 4))).all()


def test_normal_stats_needs_two_maps():
    with pytest.raises(ValueError, match="at least two"):
        anomaly.NormalStats.fit(torch.zeros(1, 1, 8, 8))


# ------------------------------------------------------------------ image_scores
def _ramp_map():
    """(2,1,10,10): image 0 holds 0..99 in a shuffled order, image 1 is image 0 minus 50."""
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(0)).float()
    m0 = perm.view(1, 10, 10)
    return torch.stack([m0, m0 - 50])


def test_image_scores_max():
    s = anomaly.image_scores(_ramp_map(), "max")
    assert s.tolist() == [99.0, 49.0]


def test_image_scores_topk():
    m = _ramp_map()
    assert anomaly.image_scores(m, "topk", 0.05).tolist() == [97.0, 47.0]  # mean of 95..99
    assert anomaly.image_scores(m, "topk", 0.10).tolist() == [94.5, 44.5]  # mean of 90..99
    assert anomaly.image_scores(m, "topk", 0.001).tolist() == [99.0, 49.0]  # at least one pixel
    assert anomaly.image_scores(m, "topk", 1.0).tolist() == [49.5, -0.5]  # whole-map mean


def test_image_scores_unknown_kind():
    with pytest.raises(ValueError, match="unknown score kind"):
        anomaly.image_scores(_ramp_map(), "mean")


# ------------------------------------------------------------------ Detector
SETTINGS = infer_settings(t_start=5, steps=1, n_seeds=2, batch_size=3, normalize="pixel", score="topk", topk=0.01,
                          sigma=2.0, error="abs")


def _detector(channels=3, settings=SETTINGS):
    return Detector(model=_tiny_unet(channels), schedule=Schedule(timesteps=10), settings=settings,
                    image_size=8, channels=channels)


@pytest.mark.parametrize("channels", [1, 3])
def test_detector_raw_maps_shapes(channels):
    det = _detector(channels)
    x = _images(n=5, c=channels)  # 5 images in batches of 3: one full, one partial
    maps, recon = det.raw_maps(x, torch.Generator().manual_seed(0), progress=False)
    assert maps.shape == (5, 1, 8, 8)
    assert recon.shape == (5, channels, 8, 8)
    assert torch.isfinite(maps).all() and (maps >= 0).all()
    assert recon.min() >= -1 and recon.max() <= 1


def test_detector_same_seed_same_maps():
    det = _detector()
    x = _images(n=5)
    a = det.raw_maps(x, torch.Generator().manual_seed(7), progress=False)
    b = det.raw_maps(x, torch.Generator().manual_seed(7), progress=False)
    c = det.raw_maps(x, torch.Generator().manual_seed(8), progress=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_detector_batches_a_levels_draws_into_one_reconstruction_with_the_same_maps():
    """batch_draws (the default on CUDA): a level's noise draws, drawn in the same order, go through
    the DDPM as one batch; the maps are the one-by-one maps up to the batched convolutions' rounding."""
    settings = infer_settings(t_start=(3, 6), steps=(1, 2), guidance=(0.0, 2.0), n_seeds=3, batch_size=2,
                              channels_last=False)  # the stand-in model below has no .to()
    det = _detector(settings=settings)
    x = _images(n=3)
    calls = []
    model = det.model
    det.model = lambda xt, t: calls.append(xt.shape[0]) or model(xt, t)  # noqa: E731
    det.model.eval = model.eval
    det.model.parameters = model.parameters
    one = det.raw_maps(x, torch.Generator().manual_seed(4), progress=False)
    assert calls[:3] == [2, 2, 2]  # one draw a call (CPU default)
    calls.clear()
    det.batch_draws = True
    together = det.raw_maps(x, torch.Generator().manual_seed(4), progress=False)
    assert calls[:3] == [6, 6, 6]  # level 3 (1 step), then level 6 (2 steps): 3 draws x 2 images a call
    torch.testing.assert_close(together[0], one[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(together[1], one[1], rtol=1e-4, atol=1e-5)


def test_detector_in_channels_last_draws_the_same_maps_and_gives_the_model_back_as_it_was():
    """infer.channels_last (on by default, CPU included): the same maps up to the convolutions'
    rounding, and the model, which train_gan_noise shares with its training, keeps its layout and
    its bits."""
    x = _images(n=4)
    plain = _detector(settings=infer_settings(t_start=5, n_seeds=2, batch_size=3, channels_last=False))
    nhwc = _detector(settings=infer_settings(t_start=5, n_seeds=2, batch_size=3, channels_last=True))
    nhwc.model.load_state_dict(plain.model.state_dict())
    before = state_checksum(nhwc.model)
    a = plain.raw_maps(x, torch.Generator().manual_seed(3), progress=False)
    b = nhwc.raw_maps(x, torch.Generator().manual_seed(3), progress=False)
    torch.testing.assert_close(b[0], a[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b[1], a[1], rtol=1e-4, atol=1e-6)
    assert memory_format(nhwc.model) == torch.contiguous_format
    assert nhwc.model.conv_in.weight.is_contiguous()
    assert state_checksum(nhwc.model) == before
    nhwc.model.to(memory_format=torch.channels_last)  # a model kept in channels_last stays so
    nhwc.raw_maps(x, torch.Generator().manual_seed(3), progress=False)
    assert memory_format(nhwc.model) == torch.channels_last


def test_detector_plan():
    assert _detector().plan() == [(5, 1, 0.0), (5, 1, 0.0)]
    multi = infer_settings(t_start=(3, 6), steps=2, n_seeds=2)  # one number of steps for every level
    assert _detector(settings=multi).plan() == [(3, 2, 0.0), (3, 2, 0.0), (6, 2, 0.0), (6, 2, 0.0)]
    per_level = infer_settings(t_start=(3, 6), steps=(1, 3), guidance=(0.0, 4.0), n_seeds=1)
    assert _detector(settings=per_level).plan() == [(3, 1, 0.0), (6, 3, 4.0)]
    # a GAN's noise model: the ddpm plan, with its own level (its steps, unguided) in place of the
    # level at its t, or added first when the plan has none at that t
    two_draws = per_level.model_copy(update=dict(n_seeds=2))
    net = nn.Identity()
    det = _detector(settings=two_draws)
    det.noise_model = NoiseModel(net, 6, 2)
    net.residual = True  # eps + learned correction: one pass per noise draw
    assert det.plan() == [(3, 1, 0.0), (3, 1, 0.0), (6, 2, 0.0), (6, 2, 0.0)]
    assert det.levels() == [3, 6]
    net.residual = False  # learned noise alone is a function of the image: one pass
    assert det.plan() == [(3, 1, 0.0), (3, 1, 0.0), (6, 2, 0.0)]
    det.noise_model = NoiseModel(net, 4, 2)
    assert det.plan() == [(4, 2, 0.0), (3, 1, 0.0), (3, 1, 0.0), (6, 3, 4.0), (6, 3, 4.0)]
    assert det.levels() == [4, 3, 6]


def test_gan_without_correction_gives_the_ddpm_maps_bit_for_bit():
    """A residual generator that adds nothing (its start) draws the same noise as the ddpm method,
    so its maps are the same bytes: model selection can always fall back on ddpm."""
    from anodiff.noisegen import NoiseGenerator

    settings = infer_settings(t_start=(3, 6), steps=(1, 2), guidance=(0.0, 2.0), n_seeds=2)
    x = _images(n=3)
    plain = _detector(settings=settings)
    a, ra = plain.raw_maps(x, torch.Generator().manual_seed(5), progress=False)
    gan = _detector(settings=settings)
    gan.model = plain.model
    torch.manual_seed(0)
    start = NoiseGenerator(x.shape[1], 4, 1, residual=True)
    gan.noise_model = NoiseModel(start, 3, 1)
    b, rb = gan.raw_maps(x, torch.Generator().manual_seed(5), progress=False)
    assert torch.equal(a, b) and torch.equal(ra, rb)
    corrects = NoiseGenerator(x.shape[1], 4, 1, residual=True)
    with torch.no_grad():  # a generator that corrects changes G's level only
        corrects.conv_out.bias.fill_(0.5)
    other = gan.with_noise_net(corrects)  # the same detector with another noise network
    c, _ = other.raw_maps(x, torch.Generator().manual_seed(5), progress=False)
    assert not torch.equal(a[:, 0], c[:, 0])
    assert torch.equal(a[:, 1], c[:, 1])
    assert gan.noise_model.net is start and other.noise_model == NoiseModel(corrects, 3, 1)  # gan left as it was
    assert other.model is gan.model and other.settings is gan.settings
    assert torch.equal(gan.raw_maps(x, torch.Generator().manual_seed(5), progress=False)[0], b)
    only, _ = other.raw_maps(x, torch.Generator().manual_seed(5), progress=False, only=[6])
    assert only.shape[1] == 1
    with pytest.raises(ValueError, match="noise model"):
        plain.with_noise_net(corrects)


def test_detector_maps_average_the_plan():
    """The raw map is the mean of the per-reconstruction error maps, one fresh noise per plan entry."""
    x = _images(n=3)
    det = _detector()

    class Zero(nn.Module):  # eps = 0: the reconstruction is x_t rescaled, known in closed form
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(()))

        def forward(self, x_t, t):
            return torch.zeros_like(x_t)

    det.model = Zero()
    det.settings = SETTINGS.model_copy(update=dict(t_start=0, steps=1, n_seeds=3, sigma=0.0, batch_size=3))  # t=0: closed form
    maps, recon = det.raw_maps(x, torch.Generator().manual_seed(0), progress=False)
    # t_start=0: x_t = sqrt(abar_0) x + sqrt(1 - abar_0) n, and eps=0 gives x_hat = x_t / sqrt(abar_0)
    sched = Schedule(timesteps=10)
    gens = image_rngs(x, torch.Generator().manual_seed(0))  # each image's own noise stream
    errs = []
    for _ in range(3):
        n = torch.cat([torch.randn((1, *x.shape[1:]), generator=g) for g in gens])
        x_hat = (sched.add_noise(x, n, 0) / sched.sqrt_alpha_bar[0]).clamp(-1, 1)
        errs.append((x - x_hat).abs().mean(dim=1, keepdim=True))
    torch.testing.assert_close(maps, sum(errs) / 3, atol=1e-6, rtol=0)


def test_detector_finish_without_stats_returns_raw():
    det = _detector()
    raw = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    final, scores = det.finish(raw)
    assert torch.equal(final, raw)
    torch.testing.assert_close(scores, anomaly.image_scores(raw, "topk", 0.01))
    assert det.stats_arrays() == {}


def test_detector_finish_with_stats_normalises():
    det = _detector()
    mean, std = torch.full((1, 8, 8), 1.0), torch.full((1, 8, 8), 0.5)
    det.calibrate(_known_stats_maps(mean, std))  # (2,1,8,8)
    raw = torch.full((3, 1, 8, 8), 2.0)
    final, scores = det.finish(raw)
    torch.testing.assert_close(final, torch.full((3, 1, 8, 8), 2.0), atol=1e-4, rtol=0)  # (2-1)/0.5
    torch.testing.assert_close(scores, torch.full((3,), 2.0), atol=1e-4, rtol=0)
    arrays = det.stats_arrays()
    assert arrays["stats_mean"].shape == (1, 8, 8) and arrays["stats_std"].shape == (1, 8, 8)
    other = _detector()
    other.set_stats_arrays(arrays)
    assert torch.equal(other.finish(raw)[0], final)


def test_detector_fit_stats_respects_normalize_false():
    det = _detector(settings=infer_settings(normalize="none"))
    det.calibrate(torch.rand(3, 1, 8, 8))
    assert det.stats_arrays() == {}  # nothing fitted


def test_standardize_per_image_gives_zero_mean_unit_std_per_map():
    maps = torch.rand(3, 1, 8, 8) * torch.tensor([1.0, 5.0, 0.1]).view(3, 1, 1, 1) + 2.0
    z = anomaly.standardize_per_image(maps)
    assert torch.allclose(z.flatten(1).mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(z.flatten(1).std(1), torch.ones(3), atol=1e-5)
    det = _detector(settings=infer_settings(normalize="image"))
    det.calibrate(maps)
    assert det.stats_arrays() == {} and torch.equal(det.finish(maps)[0], z)


def test_an_image_gets_the_same_noise_in_any_batch_or_position():
    """predict scores one image as infer scored it among others: its noise is its own."""
    x = _images(n=5)
    det = _detector()
    det.settings = SETTINGS.model_copy(update=dict(n_seeds=2, batch_size=2))
    together, _ = det.raw_maps(x, Detector.noise_rng(3), progress=False)
    alone, _ = det.raw_maps(x[3:4], Detector.noise_rng(3), progress=False)
    shuffled, _ = det.raw_maps(x[[4, 3, 0]], Detector.noise_rng(3), progress=False)
    torch.testing.assert_close(alone[0], together[3], atol=1e-6, rtol=0)
    torch.testing.assert_close(shuffled[1], together[3], atol=1e-6, rtol=0)
    other, _ = det.raw_maps(x[3:4], Detector.noise_rng(4), progress=False)
    assert not torch.allclose(other[0], together[3], atol=1e-4)
