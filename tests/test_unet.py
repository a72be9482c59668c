import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anodiff.unet import UNet, timestep_embedding

TINY = dict(in_channels=3, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
            attention_resolutions=(8,), image_size=16)



def _tiny(**over):
    torch.manual_seed(0)
    return UNet(**{**TINY, **over})


def test_output_shape_and_int_or_tensor_t():
    m = _tiny()
    x = torch.randn(2, 3, 16, 16)
    assert m(x, torch.tensor([0, 5])).shape == (2, 3, 16, 16)
    assert torch.equal(m(x, 7), m(x, torch.tensor([7, 7])))


def test_time_conditioning_changes_output():
    m = _tiny()
    for p in m.parameters():  # zero-initialised layers would hide the time path at init
        nn.init.normal_(p, std=0.1)
    x = torch.randn(1, 3, 16, 16)
    assert not torch.allclose(m(x, 1), m(x, 200))


def test_no_batchnorm_and_groupnorm_divides_channels():
    m = _tiny(base_channels=12, channel_mults=(1, 3))
    assert not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in m.modules())
    norms = [mod for mod in m.modules() if isinstance(mod, nn.GroupNorm)]
    assert norms and all(n.num_channels % n.num_groups == 0 for n in norms)
    assert m(torch.randn(1, 3, 16, 16), 3).shape == (1, 3, 16, 16)


def test_samples_do_not_interact():
    m = _tiny().eval()
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([3, 50, 99])
    assert torch.allclose(m(x, t)[1:2], m(x[1:2], t[1:2]), atol=1e-5)


def test_attention_only_where_listed():
    from anodiff.unet import Attention
    def count(res):
        return sum(isinstance(mod, Attention) for mod in _tiny(attention_resolutions=res).modules())
    # at 16 px: 1 down + 2 up stages; at 8 px (the middle): 1 down + 1 middle + 2 up stages
    assert count(()) == 0 and count((16,)) == 3 and count((8,)) == 4 and count((16, 8)) == 7


def test_arch_config_round_trip_is_plain():
    m = _tiny(num_res_blocks=2)
    arch = m.arch_config()
    assert arch == {"in_channels": 3, "base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 2,
                    "attention_resolutions": [8], "image_size": 16}
    m2 = UNet.from_arch(arch)
    m2.load_state_dict(m.state_dict())  # same parameter names and shapes
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(m(x, 4), m2(x, 4))


def test_from_config():
    class Cfg:
        base_channels, channel_mults, num_res_blocks, attention_resolutions = 8, (1, 2), 1, (8,)
    assert UNet.from_config(Cfg, channels=1, image_size=16).arch_config()["in_channels"] == 1


def test_bad_image_size():
    with pytest.raises(ValueError, match="divisible"):
        UNet(3, 8, (1, 2, 2), image_size=18)


def test_gradients_reach_every_parameter_after_one_step():
    m = _tiny()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randn(2, 3, 16, 16)
    for _ in range(2):  # step 1 moves the zero-initialised layers, step 2 sees all paths
        opt.zero_grad()
        m(x, torch.tensor([1, 2])).pow(2).mean().backward()
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_timestep_embedding_shape():
    e = timestep_embedding(torch.tensor([0, 1, 2]), 9)
    assert e.shape == (3, 9) and torch.equal(e[0, :4], torch.ones(4))


def test_res_block_serves_both_networks():
    from anodiff.unet import ResBlock
    torch.manual_seed(0)
    unet_block = ResBlock(4, 8, time_dim=6)
    assert list(unet_block.state_dict()) == [f"{m}.{p}" for m in ("norm1", "conv1", "time", "norm2", "conv2", "skip")
                                             for p in ("weight", "bias")]
    assert not unet_block.conv2.weight.any()  # starts as the identity on its skip path
    torch.manual_seed(0)
    gan_block = ResBlock(4, 4, dilation=2, act="leaky", zero_init=False)
    assert list(gan_block.state_dict()) == [f"{m}.{p}" for m in ("norm1", "conv1", "norm2", "conv2")
                                            for p in ("weight", "bias")]
    x = torch.randn(1, 4, 6, 6)
    h = gan_block.conv1(F.leaky_relu(gan_block.norm1(x), 0.2))
    assert torch.equal(gan_block(x), x + gan_block.conv2(F.leaky_relu(gan_block.norm2(h), 0.2)))
    with pytest.raises(ValueError, match="act must be one of"):
        ResBlock(4, 4, act="relu")
