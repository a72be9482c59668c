"""The embedded marble generator: deterministic, exact masks, the asked counts."""

import numpy as np
import pytest

from anodiff import synth
from anodiff.config import Synth


def rng(seed):
    return np.random.default_rng(seed)


@pytest.mark.parametrize("kind", synth.KINDS)
def test_same_seed_same_bytes(kind):
    a, ma = synth.make_slab(rng(7), 32, kind)
    b, mb = synth.make_slab(rng(7), 32, kind)
    assert a.tobytes() == b.tobytes() and ma.tobytes() == mb.tobytes()
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert ma.shape == (32, 32) and ma.dtype == np.uint8
    c, _ = synth.make_slab(rng(8), 32, kind)
    assert a.tobytes() != c.tobytes()


@pytest.mark.parametrize("kind", ["crack", "dot"])
@pytest.mark.parametrize("size", [32, 64])
def test_mask_is_exactly_the_changed_pixels(kind, size):
    # the defect is drawn after the clean slab from the same generator, so the "good" slab of
    # the same seed is the defect's background
    for seed in range(12):
        clean, empty = synth.make_slab(rng(seed), size, "good")
        image, mask = synth.make_slab(rng(seed), size, kind)
        changed = (image != clean).any(-1)
        assert set(np.unique(mask)) == {0, 1}
        np.testing.assert_array_equal(mask.astype(bool), changed)
        assert (image[mask == 0] == clean[mask == 0]).all()  # bit-identical outside
        assert max(2, 3 * (size / 64) ** 2) <= mask.sum() < size * size // 4  # thin or small


def test_defects_darken_and_stay_small_at_64px():
    crack_area, dot_area, darkening = [], [], []
    for seed in range(30):
        clean, _ = synth.make_slab(rng(seed), 64, "good")
        image, mask = synth.make_slab(rng(seed), 64, "crack")
        crack_area.append(mask.sum())
        inside = mask.astype(bool)
        darkening.append(1 - image[inside].mean() / clean[inside].mean())
        dot_area.append(synth.make_slab(rng(seed), 64, "dot")[1].sum())
    assert min(darkening) > 0  # cracks are always darker than what they cross
    assert min(darkening) < 0.25 < max(darkening)  # faint ones and strong ones
    assert max(dot_area) <= 2 * np.pi * 4.5 ** 2  # at most two spots of radius <= 4 px
    assert np.median(crack_area) < 200  # a 1-2 px wide line, not a blob


def test_normal_kinds_have_empty_masks():
    for kind in ("good", "joint"):
        for seed in range(5):
            _, mask = synth.make_slab(rng(seed), 32, kind)
            assert mask.sum() == 0
    with pytest.raises(ValueError, match="kind"):
        synth.make_slab(rng(0), 32, "scratch")


def small_cfg(**kw):
    base = dict(n_train_normal=20, n_train_anomalous=6, n_val_normal=3, n_val_anomalous=4,
                n_test_normal=5, n_test_anomalous=6, joint_fraction=0.15)
    return Synth(**(base | kw))


def test_generate_counts_and_kinds():
    recs = synth.generate(0, small_cfg(), 16)
    count = lambda **kw: sum(all(r[k] == v for k, v in kw.items()) for r in recs)  # noqa: E731
    assert count(split="train", label="normal") == 20
    assert count(split="train", label="normal", defect="joint") == 3  # floor(20 * 0.15)
    assert count(split="train", label="anomalous", defect="crack") == 3
    assert count(split="train", label="anomalous", defect="dot") == 3
    assert count(split="val", label="normal") == 3 and count(split="val", label="anomalous") == 4
    assert count(split="test", label="normal") == 5 and count(split="test", label="anomalous") == 6
    for r in recs:
        assert r["image"].shape == (16, 16, 3)
        assert (r["mask"].sum() > 0) == (r["label"] == "anomalous")
    names = [(r["split"], r["label"], r["name"]) for r in recs]
    assert len(set(names)) == len(names)


def test_generate_is_deterministic_and_slabs_are_independent_of_counts():
    a = synth.generate(3, small_cfg(), 16)
    b = synth.generate(3, small_cfg(), 16)
    assert [r["image"].tobytes() for r in a] == [r["image"].tobytes() for r in b]
    # asking for more training slabs changes no slab that was already there
    c = synth.generate(3, small_cfg(n_train_normal=25, n_test_anomalous=2), 16)
    key = lambda r: (r["split"], r["label"], r["name"])  # noqa: E731
    old = {key(r): r["image"].tobytes() for r in a}
    shared = [r for r in c if key(r) in old]
    assert len(shared) == len(a) - 4
    assert all(old[key(r)] == r["image"].tobytes() for r in shared)
    d = synth.generate(4, small_cfg(), 16)
    assert a[0]["image"].tobytes() != d[0]["image"].tobytes()
