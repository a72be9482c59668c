"""The GAN's networks (anodiff.noisegen) on tiny inputs (8 px, a few channels)."""

import pytest
import torch
from torch import nn

from anodiff.noisegen import Critic, NoiseGenerator

C, S = 3, 8  # channels, image side


def _nets(residual=False):
    torch.manual_seed(1)
    return NoiseGenerator(C, 4, 2, 1.5, residual=residual), Critic(C, 4)


def _images(n, seed):
    return torch.rand((n, C, S, S), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_generator_output_is_bounded_signed_and_same_shape_even_for_extreme_inputs():
    net, _ = _nets()
    x = _images(4, 0)
    for z in (x, x * 1e6, x - 1e6, torch.full_like(x, 1e15), torch.zeros_like(x)):
        out = net(z)
        assert out.shape == z.shape
        assert torch.isfinite(out).all() and out.abs().max() <= net.bound
    out = net(x * 1e3)
    assert (out < 0).any() and (out > 0).any()  # no final ReLU: the noise can be negative


def test_generator_residual_blocks_use_their_convolutions():
    net, _ = _nets()
    x = _images(2, 0)
    block = net.blocks[0]
    h = net.conv_in(x)
    before = block(h)
    for conv in (block.conv1, block.conv2):
        with torch.no_grad():
            conv.weight.add_(0.5)
        assert not torch.allclose(block(h), before)
        before = block(h)


def test_generator_blocks_dilate_and_see_no_time():
    torch.manual_seed(0)
    net = NoiseGenerator(C, 8, 5)
    assert [b.conv1.dilation for b in net.blocks] == [(1, 1), (2, 2), (4, 4), (8, 8), (8, 8)]
    assert all(b.time is None and isinstance(b.skip, nn.Identity) for b in net.blocks)


def test_residual_generator_corrects_the_eps_it_is_given():
    net, _ = _nets(residual=True)
    x = _images(2, 0)
    with pytest.raises(ValueError, match="needs the Gaussian noise eps"):
        net(x)
    with torch.no_grad():
        net.conv_out.bias.fill_(10.0)  # tanh saturates: the correction is +bound everywhere
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(net(x, eps), eps + 1.5, rtol=0, atol=1e-6)
    plain, _ = _nets(residual=False)
    assert torch.equal(plain(x, eps), plain(x))  # the SemanticDiffGAN paper's G ignores eps
    with pytest.raises(ValueError, match="bound must be > 0"):
        NoiseGenerator(C, bound=0.0)


def test_critic_has_no_sigmoid_no_batch_norm_and_any_batch_and_size():
    _, critic = _nets()
    assert not any(isinstance(m, (nn.Sigmoid, nn.modules.batchnorm._BatchNorm)) for m in critic.modules())
    for b, side in [(1, 8), (3, 16), (5, 24)]:
        assert critic(torch.randn(b, C, side, side)).shape == (b,)
    out = critic(_images(8, 0) * 1e3)
    assert ((out < 0) | (out > 1)).any()  # a score, not a probability
    # a batch of one scores each sample as in a batch: no coupling between samples
    x = _images(4, 0)
    assert torch.allclose(critic(x)[1:2], critic(x[1:2]), atol=1e-6)
