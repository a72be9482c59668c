import pytest
import torch

from anodiff.noise import for_batch, gaussian, noise_kwargs, simplex
from anodiff.noisegen import NoiseGenerator

SHAPE = (4, 3, 32, 32)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _neighbour_corr(z):
    """Correlation between horizontally adjacent pixels, pooled over the batch."""
    a, b = z[..., :, :-1].flatten(), z[..., :, 1:].flatten()
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


@pytest.mark.parametrize("kind", ["gaussian", "simplex"])
def test_shape_dtype_and_determinism(kind):
    x = torch.zeros(SHAPE)
    a = for_batch(x, _gen(0), kind=kind)
    b = for_batch(x, _gen(0), kind=kind)
    c = for_batch(x, _gen(1), kind=kind)
    assert a.shape == SHAPE and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_simplex_is_normalised_per_sample_and_channel():
    z = simplex(SHAPE, _gen(2)).flatten(2)  # (B, C, HW)
    assert torch.allclose(z.mean(2), torch.zeros(4, 3), atol=1e-5)
    assert torch.allclose(z.std(2), torch.ones(4, 3), atol=1e-4)


def test_gaussian_moments():
    z = gaussian((8, 1, 32, 32), _gen(3))
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05


def test_simplex_is_spatially_correlated_and_gaussian_is_not():
    assert _neighbour_corr(simplex(SHAPE, _gen(4))) > 0.4
    assert abs(_neighbour_corr(gaussian(SHAPE, _gen(4)))) < 0.05


def test_simplex_samples_and_channels_are_independent():
    z = simplex((6, 2, 32, 32), _gen(5)).flatten(2)  # (B, C, HW)
    fields = z.reshape(12, -1)
    corr = torch.corrcoef(fields)
    off_diag = corr[~torch.eye(12, dtype=torch.bool)]
    assert off_diag.abs().max().item() < 0.3
    assert not torch.allclose(z[0, 0], z[0, 1]) and not torch.allclose(z[0, 0], z[1, 0])


def test_simplex_frequency_scales_structure():
    coarse = _neighbour_corr(simplex(SHAPE, _gen(6), octaves=1, frequency=128.0))
    fine = _neighbour_corr(simplex(SHAPE, _gen(6), octaves=1, frequency=16.0))
    assert coarse > fine


def test_simplex_kwargs_pass_through_and_device():
    a = for_batch(torch.zeros(SHAPE), _gen(7), kind="simplex",
                  simplex_kw=dict(octaves=2, persistence=0.5, frequency=32.0))
    b = simplex(SHAPE, _gen(7), octaves=2, persistence=0.5, frequency=32.0)
    assert torch.equal(a, b) and a.device.type == "cpu"
    assert torch.equal(for_batch(torch.zeros(SHAPE), _gen(7)), gaussian(SHAPE, _gen(7)))
    # the batch's dtype (its values are not used)
    assert torch.equal(for_batch(torch.ones(SHAPE, dtype=torch.float64), _gen(7)), gaussian(SHAPE, _gen(7)).double())


def test_unknown_kind_and_bad_args():
    with pytest.raises(ValueError, match="unknown noise kind"):
        for_batch(torch.zeros(SHAPE), _gen(0), kind="perlin")
    with pytest.raises(ValueError):
        simplex(SHAPE, _gen(0), octaves=0)


def test_noise_kwargs_from_config():
    class Cfg:
        simplex_octaves, simplex_persistence, simplex_frequency = 3, 0.7, 32.0
    assert noise_kwargs("gaussian", Cfg) == {}
    assert noise_kwargs("simplex", Cfg) == {"octaves": 3, "persistence": 0.7, "frequency": 32.0}


def test_simplex_image_size_sets_the_scale_for_crops():
    # a 16 px crop of a 32 px image has the 32 px image's feature size, so it is smoother
    # than 16 px noise scaled to its own size
    crop_of_big = _neighbour_corr(simplex((4, 3, 16, 16), _gen(8), octaves=1, image_size=64))
    own_scale = _neighbour_corr(simplex((4, 3, 16, 16), _gen(8), octaves=1))
    assert crop_of_big > own_scale
    assert torch.equal(simplex(SHAPE, _gen(9), image_size=32), simplex(SHAPE, _gen(9)))


# ---------------------------------------------------------------------- GAN noise
def _generator_net(residual):
    torch.manual_seed(1)
    net = NoiseGenerator(3, 4, 2, 1.5, residual=residual)
    if residual:  # move the zero-initialised last conv, so the correction is not 0
        with torch.no_grad():
            net.conv_out.weight.normal_(0, 0.3, generator=_gen(2))
    return net.eval()


def _batch():
    return torch.rand((2, 3, 8, 8), generator=_gen(0)) * 2 - 1


@torch.no_grad()
def test_gan_noise_of_a_residual_generator_corrects_gaussian_noise_from_the_generator():
    net, x = _generator_net(True), _batch()
    gen = _gen(4)
    out = for_batch(x, gen, net=net)
    ref = _gen(4)
    expected = net(x, gaussian(x.shape, ref))
    assert torch.equal(out, expected) and torch.equal(gen.get_state(), ref.get_state())  # one draw of x's shape
    # golden values, from the GAN's former `noise_for`, which this replaces; to 1e-5, not to the bit:
    # float32 convolutions differ in the last bits between CPU instruction sets (AVX2, AVX-512)
    assert out[0, 0, 0, :4].tolist() == pytest.approx([-0.8885703086853027, 0.7479020357131958,
                                                       0.36911243200302124, -1.0834599733352661], abs=1e-5)
    assert out[1, 2, 7, :3].tolist() == pytest.approx([-0.6226832270622253, 0.578643798828125,
                                                       0.02074611186981201], abs=1e-5)
    assert out.double().sum().item() == pytest.approx(-30.169414021074772, abs=1e-4)


@torch.no_grad()
def test_gan_noise_of_the_papers_generator_draws_nothing():
    net, x = _generator_net(False), _batch()
    gen = _gen(4)
    before = gen.get_state()
    out = for_batch(x, gen, net=net)
    assert torch.equal(out, net(x)) and torch.equal(gen.get_state(), before)
    assert out[0, 0, 0, :4].tolist() == pytest.approx([0.07800013571977615, 0.5797879695892334,
                                                       0.2362520545721054, 0.43594416975975037], abs=1e-5)
    assert out.double().sum().item() == pytest.approx(18.160558586008847, abs=1e-4)  # see above


def test_gan_noise_corrects_gaussian_noise_only():
    with pytest.raises(ValueError, match="corrects Gaussian noise"):
        for_batch(_batch(), _gen(0), kind="simplex", net=_generator_net(True))
