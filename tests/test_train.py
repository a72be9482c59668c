from pathlib import Path

import pytest
import torch
from torch import nn

from anodiff.errors import TrainingDiverged
from anodiff.schedule import Schedule
from anodiff.runtime import pick_device
from anodiff.train import TrainResult, random_crop, train_ddpm
from anodiff.unet import UNet

ARCH = dict(in_channels=1, base_channels=8, channel_mults=[1, 2], num_res_blocks=1,
            attention_resolutions=[], image_size=8)


def _cfg(**over):
    """train_ddpm's budget keywords (a stage unpacks them from params.ddpm)."""
    return {"epochs": 1, "batch_size": 4, "lr": 1e-3, "grad_clip": 1.0, "ema_decay": 0.9, "train_crop": 0, **over}


def _model(seed=0):
    torch.manual_seed(seed)
    return UNet(**ARCH)


def _images(n=8, value=0.5):
    return torch.full((n, 1, 8, 8), value)


def _train(model=None, images=None, seed=0, cfg=None, **kw):
    kw.setdefault("loss", "mse")
    kw.setdefault("noise", "gaussian")
    return train_ddpm(model if model is not None else _model(), Schedule(50), _images() if images is None else images,
                      generator=torch.Generator().manual_seed(seed), device="cpu", stage_name="pretrain_ddpm",
                      progress=False, **(cfg or _cfg()), **kw)


def test_pick_device():
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_loss_goes_down_on_constant_images():
    res = _train(cfg=_cfg(epochs=20, batch_size=8, lr=3e-3))
    h = res.history
    assert isinstance(res, TrainResult) and list(h.columns) == ["step", "epoch", "loss", "images_per_s"]
    assert len(h) == 20 and h.step.tolist() == list(range(1, 21))
    assert h.loss.iloc[-5:].mean() < 0.5 * h.loss.iloc[:3].mean()
    assert res.summary["steps"] == 20 and res.summary["final_loss"] == pytest.approx(h.loss.iloc[-1])
    assert res.summary["images_per_s"] > 0 and res.summary["seconds"] > 0


def test_partial_last_batch_is_used():
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x, t):
            seen.append(x.shape[0])
            return self.w * x

    res = _train(model=Spy(), images=_images(10), cfg=_cfg(epochs=2, batch_size=4))
    assert seen == [4, 4, 2, 4, 4, 2]
    assert res.history.epoch.tolist() == [0, 0, 0, 1, 1, 1]
    # batch larger than the data set: one partial batch per epoch
    seen.clear()
    _train(model=Spy(), images=_images(3), cfg=_cfg(batch_size=16))
    assert seen == [3]


def test_random_crop_takes_windows_of_each_image():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    out = random_crop(x, 4, torch.Generator().manual_seed(0))
    assert out.shape == (2, 1, 4, 4)
    for img, crop in zip(x, out):
        i, j = divmod(int(crop[0, 0, 0].item()) % 64, 8)  # values encode the position
        assert torch.equal(crop, img[:, i:i + 4, j:j + 4])
    assert torch.equal(out, random_crop(x, 4, torch.Generator().manual_seed(0)))


def test_train_crop_feeds_crops_to_the_model():
    shapes = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x, t):
            shapes.append(tuple(x.shape))
            return self.w * x

    _train(model=Spy(), cfg=_cfg(train_crop=4))
    assert shapes == [(4, 1, 4, 4), (4, 1, 4, 4)]
    shapes.clear()
    _train(model=Spy(), cfg=_cfg(train_crop=16))  # as large as the image or larger: whole images
    assert all(s[-2:] == (8, 8) for s in shapes), shapes


@pytest.mark.parametrize("loss,kw", [("huber", {"huber_delta": 0.5}), ("lts", {"lts_keep": 0.5})])
def test_robust_losses_train(loss, kw):
    res = _train(loss=loss, **kw)
    assert res.history.loss.notna().all() and res.summary["steps"] == 2


@pytest.mark.parametrize("crop", [0, 4])
def test_simplex_noise_trains(crop):
    res = _train(noise="simplex", noise_kw={"octaves": 2, "frequency": 64.0}, cfg=_cfg(train_crop=crop))
    assert res.summary["steps"] == 2 and res.history.loss.notna().all()


def test_same_seed_gives_bit_identical_weights():
    a = _train(cfg=_cfg(epochs=1), seed=3)
    b = _train(cfg=_cfg(epochs=1), seed=3)
    c = _train(cfg=_cfg(epochs=1), seed=4)
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    for va, vb in zip(a.ema_model.state_dict().values(), b.ema_model.state_dict().values()):
        assert torch.equal(va, vb)
    assert any(not torch.equal(va, vc) for va, vc in zip(a.model.state_dict().values(),
                                                        c.model.state_dict().values()))


def test_ema_differs_from_raw_weights_and_is_frozen():
    res = _train(cfg=_cfg(epochs=2))
    assert not res.ema_model.training
    assert not any(p.requires_grad for p in res.ema_model.parameters())
    assert any(not torch.equal(e, m) for e, m in zip(res.ema_model.parameters(), res.model.parameters()))


def test_cosine_schedule_decays_the_learning_rate_to_zero_over_the_run():
    const = _train(cfg=_cfg(epochs=3, batch_size=4))
    cos = _train(cfg=_cfg(epochs=3, batch_size=4), lr_schedule="cosine")
    steps = cos.summary["steps"]
    assert const.optimizer.param_groups[0]["lr"] == _cfg()["lr"]
    assert cos.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12) and steps > 2
    assert cos.history.loss.iloc[0] == const.history.loss.iloc[0]  # the first step is at the full rate
    assert not cos.history.loss.equals(const.history.loss)
    with pytest.raises(ValueError, match="lr_schedule 'linear'"):
        _train(cfg=_cfg(epochs=1), lr_schedule="linear")


def test_ema_update_is_the_average_element_by_element():
    from anodiff.train import EMA

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    ema = EMA(net, 0.9)
    expected = [p.detach().clone() for p in ema.model.parameters()]
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update(net)
        d = min(0.9, (1 + ema.updates) / (10 + ema.updates))
        expected = [e.lerp(p.detach(), 1 - d) for e, p in zip(expected, net.parameters())]
    for got, want in zip(ema.model.parameters(), expected):
        assert torch.equal(got, want)  # bit for bit: the fused update is the same arithmetic


def test_nan_guard_names_stage_step_and_last_finite_loss():
    class NanAtStep2(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))
            self.calls = 0

        def forward(self, x, t):
            self.calls += 1
            return self.w * x * (float("nan") if self.calls == 2 else 1.0)

    with pytest.raises(TrainingDiverged, match=r"pretrain_ddpm: loss became nan at step 2; "
                                               r"last finite loss \d"):
        _train(model=NanAtStep2())


def test_nan_guard_with_exploding_learning_rate():
    # Adam moves every weight by about lr per step: the next loss overflows to inf
    with pytest.raises(TrainingDiverged, match=r"loss became (inf|nan) at step 2; last finite loss [0-9.]+; "
                                               r"checkpoint not written"):
        _train(cfg=_cfg(lr=1e30))


def test_the_budget_has_no_hidden_defaults():
    # params.yaml is the one source of these values: leaving one out is an error, not a default
    for key in _cfg():
        budget = {k: v for k, v in _cfg().items() if k != key}
        with pytest.raises(TypeError, match=key):
            _train(cfg=budget)


def test_mixed_precision_and_channels_last_train_the_same_network_closely():
    """amp (bfloat16 autocast; CPU here, the GPU path is the same code) and channels_last: the loss is
    float32 and follows the float32 run's within bfloat16's precision; channels_last alone changes
    only the memory layout and the convolutions' summation order, so its losses are the float32
    run's to within float rounding (which Adam amplifies a little over a few steps)."""
    plain = _train(cfg=_cfg(epochs=3, batch_size=4))
    half = _train(cfg=_cfg(epochs=3, batch_size=4), amp=True)
    nhwc = _train(cfg=_cfg(epochs=3, batch_size=4), channels_last=True)
    assert half.history.loss.dtype == plain.history.loss.dtype
    torch.testing.assert_close(torch.tensor(half.history.loss.to_numpy()), torch.tensor(plain.history.loss.to_numpy()),
                               rtol=0.05, atol=0.01)
    assert not half.history.loss.equals(plain.history.loss)  # autocast did run in bfloat16
    torch.testing.assert_close(torch.tensor(nhwc.history.loss.to_numpy()), torch.tensor(plain.history.loss.to_numpy()),
                               rtol=1e-3, atol=1e-5)
    assert nhwc.model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_accelerated_params_auto_is_cuda_or_a_cpu_with_native_bfloat16(monkeypatch):
    from anodiff import runtime
    from anodiff.config import accelerated

    assert accelerated("auto", torch.device("cuda")) and not accelerated("auto", torch.device("cpu"))
    assert accelerated(True, "cpu") and not accelerated(False, "cuda")
    for native in (True, False):  # mixed precision: auto follows the CPU's bfloat16 support; a layout never does
        monkeypatch.setattr(runtime, "native_bf16", lambda native=native: native)
        assert accelerated("auto", "cpu", precision=True) is native
        assert accelerated("auto", "cpu") is False
        assert accelerated(False, "cpu", precision=True) is False and accelerated("auto", "cuda", precision=True)


def test_native_bf16_matches_the_cpu_flags():
    from anodiff.runtime import native_bf16

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    if not flags:
        pytest.skip("no /proc/cpuinfo to compare with")
    assert native_bf16() == any(f" {flag}" in flags for flag in ("avx512_bf16", "amx_tile"))
