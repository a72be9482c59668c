"""anodiff.checkpoint: round trips, and one error vocabulary for every refusal, naming the file."""

import re

import pytest
import torch

from anodiff import checkpoint, io
from anodiff.errors import CheckpointError
from anodiff.noisegen import NoiseGenerator
from anodiff.unet import UNet

ARCH = dict(in_channels=1, base_channels=8, channel_mults=[1, 2], num_res_blocks=1,
            attention_resolutions=[], image_size=8)
GEN_ARCH = dict(channels=3, base_channels=4, n_blocks=2, bound=1.5, residual=False)


def _unet(seed=0):
    torch.manual_seed(seed)
    return UNet(**ARCH)


def _trained():
    """(raw model, a different EMA model, an Adam with state): what the DDPM stages save."""
    model, ema = _unet(0), _unet(1).eval()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 1, 8, 8), 3).pow(2).mean().backward()
    opt.step()
    return model, ema, opt


def _save_ddpm(path, gen=None, stage="pretrain_ddpm"):
    model, ema, opt = _trained()
    gen = gen or torch.Generator().manual_seed(9)
    checkpoint.save_ddpm(path, model, ema, opt, 2, gen.get_state(), {"stage": stage, "loss": "mse"})
    return model, ema


def _save_generator(path):
    torch.manual_seed(1)
    net = NoiseGenerator(**GEN_ARCH)
    checkpoint.save_generator(path, net, {"ddpm_checksum": "abc", "t": 6})
    return net


def test_ddpm_round_trip_weights_only(tmp_path):
    path = tmp_path / "ddpm.pt"
    gen = torch.Generator().manual_seed(9)
    model, ema = _save_ddpm(path, gen)
    raw = torch.load(path, weights_only=True)  # no pickled code needed
    assert list(raw) == ["format", "arch", "weights", "ema", "optimizer", "step", "rng", "meta"]
    assert raw["format"] == "anodiff.ddpm/1" and raw["arch"] == ARCH
    assert raw["step"] == 2 and raw["meta"]["stage"] == "pretrain_ddpm"
    assert raw["rng"]["torch_generator"].dtype == torch.uint8
    assert torch.equal(raw["rng"]["torch_generator"], gen.get_state())
    assert set(raw["optimizer"]) == {"state", "param_groups"}
    assert all(torch.equal(a, b) for a, b in zip(raw["weights"].values(), model.state_dict().values()))
    loaded, ckpt = checkpoint.load(path, UNet, expect_arch=dict(ARCH))
    assert not loaded.training and loaded.arch_config() == ARCH
    # the EMA weights are the ones loaded, one to one and bit for bit
    assert list(loaded.state_dict()) == list(ema.state_dict())
    for a, b in zip(loaded.state_dict().values(), ema.state_dict().values()):
        assert torch.equal(a, b)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x, 3), ema(x, 3))
    torch.optim.Adam(_unet().parameters()).load_state_dict(ckpt["optimizer"])  # reloads into a fresh Adam


def test_generator_round_trip_weights_only(tmp_path):
    path = tmp_path / "gan_generator.pt"
    net = _save_generator(path)
    raw = torch.load(path, weights_only=True)
    assert list(raw) == ["format", "arch", "state_dict", "meta"]
    assert raw["format"] == "anodiff.gan_generator" and raw["arch"] == net.arch_config() == GEN_ARCH
    loaded, ckpt = checkpoint.load(path, NoiseGenerator, "cpu", expect_arch={"channels": 3, "bound": 1.5})
    assert not loaded.training and ckpt["meta"]["t"] == 6
    for a, b in zip(loaded.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(loaded(x), net.eval()(x))


def test_kind_mismatch_names_the_file_and_the_kind_found(tmp_path):
    ddpm, gen = tmp_path / "ddpm.pt", tmp_path / "gan_generator.pt"
    _save_ddpm(ddpm)
    _save_generator(gen)
    with pytest.raises(CheckpointError, match=re.escape(f"{ddpm}: not an anodiff gan_generator checkpoint "
                                                        "(kind 'ddpm')")):
        checkpoint.load(ddpm, NoiseGenerator)
    with pytest.raises(CheckpointError, match=re.escape(f"{gen}: not an anodiff ddpm checkpoint "
                                                        "(kind 'gan_generator')")):
        checkpoint.load(gen, UNet)


def test_foreign_missing_or_incomplete_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pt: checkpoint not found"):
        checkpoint.load(tmp_path / "missing.pt", UNet)
    other = tmp_path / "other.pt"
    io.save_checkpoint(other, {"weights": {}})
    with pytest.raises(CheckpointError, match=re.escape(f"{other}: not an anodiff ddpm checkpoint (no format)")):
        checkpoint.load(other, UNet)
    io.save_checkpoint(other, {"format": "anodiff.ddpm/1", "arch": ARCH})
    with pytest.raises(CheckpointError, match=re.escape(f"{other}: not an anodiff ddpm checkpoint (no ema)")):
        checkpoint.load(other, UNet)
    io.save_checkpoint(other, {"format": "anodiff.ddpm/0", "arch": ARCH})
    with pytest.raises(CheckpointError, match=re.escape("(kind 'anodiff.ddpm/0')")):
        checkpoint.load(other, UNet)


def test_hand_made_dicts_and_other_files_are_refused(tmp_path):
    other = tmp_path / "other.pt"
    for key, value in (("arch", "UNet"), ("meta", [1])):  # weights-only loading lets these through
        io.save_checkpoint(other, {"format": "anodiff.ddpm/1", "arch": ARCH, "ema": {}, key: value})
        with pytest.raises(CheckpointError, match=re.escape(f"{other}: not an anodiff ddpm checkpoint "
                                                            f"({key} is not a mapping)")):
            checkpoint.load(other, UNet)
    other.write_text("notes\n")
    with pytest.raises(CheckpointError, match=re.escape(f"{other}: not a readable checkpoint (not a PyTorch file)")):
        checkpoint.load(other, UNet)
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path}: checkpoint cannot be read")):
        checkpoint.load(tmp_path, UNet)


def test_architecture_mismatch_names_the_file_the_keys_and_the_stage(tmp_path):
    path = tmp_path / "rddpm.pt"
    _save_ddpm(path, stage="train_robust_ddpm")
    other = {**ARCH, "base_channels": 16, "channel_mults": (1, 2, 2)}
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(path, UNet, expect_arch=other)
    assert str(err.value) == (f"{path}: architecture differs from the params: base_channels 8 in the file, 16 asked; "
                              "channel_mults [1, 2] in the file, [1, 2, 2] asked; rerun `dvc repro train_robust_ddpm`")
    checkpoint.load(path, UNet, expect_arch={**ARCH, "channel_mults": (1, 2)})  # tuples vs lists is no difference
    gen = tmp_path / "gan_generator.pt"
    _save_generator(gen)
    with pytest.raises(CheckpointError, match=re.escape(f"{gen}: architecture differs from the params: bound 1.5 in "
                                                        "the file, 2.0 asked; rerun `dvc repro train_gan_noise`")):
        checkpoint.load(gen, NoiseGenerator, expect_arch={"bound": 2.0})


def test_weights_that_do_not_fit_the_stored_architecture(tmp_path):
    path = tmp_path / "gan_generator.pt"
    _save_generator(path)
    bad = torch.load(path, weights_only=True)
    bad["arch"]["base_channels"] = 8
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'bad.pt'}: weights do not fit the architecture "
                                                        "stored in the file")):
        checkpoint.load(tmp_path / "bad.pt", NoiseGenerator)
    bad["arch"]["colour"] = True  # an argument the network does not take
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="weights do not fit the architecture"):
        checkpoint.load(tmp_path / "bad.pt", NoiseGenerator)
