"""Exact small cases of the map and score calibrations (anomaly.Calibration) and of choosing them
on val (calibration_choice.choose)."""

import math
import warnings

import numpy as np
import pytest
import torch

from anodiff import anomaly, calibration_choice
from anodiff.errors import DataError

SIZE = 16


def _busy(n, levels=1, seed=0, lo=0.2, hi=0.4):
    """Raw error maps of a busy texture: every pixel reconstructs with error in [lo, hi]."""
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, levels, SIZE, SIZE, generator=g)


def _with_patch(maps, value, box=(4, 9, 5, 10)):
    out = maps.clone()
    r0, r1, c0, c1 = box
    out[:, :, r0:r1, c0:c1] = value
    return out


def _fit(kind, normal):
    return anomaly.Calibration(kind).fit(normal) if kind in anomaly.CALIBRATED else anomaly.Calibration(kind)


def test_texture_stats_are_median_and_spread_of_log_error_per_level():
    normal = torch.stack([torch.full((2, SIZE, SIZE), 0.1), torch.full((2, SIZE, SIZE), 0.3)])
    normal[:, 1] *= 2  # level 1 errs twice as much
    cal = anomaly.Calibration("texture").fit(normal)
    # per level, half the pixels at a, half at b: median (torch: the lower middle) a, sample spread
    for level, (a, b) in enumerate([(0.1, 0.3), (0.2, 0.6)]):
        la, lb = math.log(a + anomaly.LOG_EPS), math.log(b + anomaly.LOG_EPS)
        n = 2 * SIZE * SIZE
        spread = math.sqrt((lb - la) ** 2 / 4 * n / (n - 1))
        assert cal.arrays["loc"][level].item() == pytest.approx(la, rel=1e-6)
        assert cal.arrays["scale"][level].item() == pytest.approx(spread, rel=1e-5)
    # a map at the loc of both levels is exactly 0; one spread above on both levels is exactly 1
    at_loc = torch.stack([torch.full((SIZE, SIZE), 0.1), torch.full((SIZE, SIZE), 0.2)]).unsqueeze(0)
    torch.testing.assert_close(cal.apply(at_loc), torch.zeros(1, 1, SIZE, SIZE), atol=1e-5, rtol=0)


def test_smooth_patch_in_busy_texture_scores_high_two_sided_only():
    """A region that reconstructs far better than any normal pixel (a smooth patch where the
    texture is missing) is unusual: texture2 and mahalanobis flag it, one-sided texture does not."""
    normal = _busy(6, levels=2)
    test_good = _busy(3, levels=2, seed=1)
    smooth = _with_patch(_busy(3, levels=2, seed=2), 0.005)
    for kind in ("texture2", "mahalanobis"):
        cal = _fit(kind, normal)
        m_good, m_bad = cal.apply(test_good), cal.apply(smooth)
        assert m_bad[:, 0, 4:9, 5:10].min() > m_good.max()  # every patch pixel above every normal one
        s_good = anomaly.image_scores(m_good, "max")
        s_bad = anomaly.image_scores(m_bad, "max")
        assert s_bad.min() > s_good.max()
    one_sided = _fit("texture", normal)
    assert one_sided.apply(smooth)[:, 0, 4:9, 5:10].max() < one_sided.apply(test_good).min()


def test_high_error_patch_scores_high_for_every_calibration():
    normal = _busy(6, levels=2)
    bad = _with_patch(_busy(2, levels=2, seed=3), 1.5)
    good = _busy(2, levels=2, seed=4)
    for kind in anomaly.CALIBRATIONS:
        cal = _fit(kind, normal)
        assert anomaly.image_scores(cal.apply(bad), "max").min() > anomaly.image_scores(cal.apply(good), "max").max(), kind


def test_copy_of_a_normal_image_scores_low():
    """A copy of a normal val image scores exactly what that image scores, below a defective one."""
    normal = _busy(6, levels=2)
    bad = _with_patch(normal[:1], 1.5)
    for kind in anomaly.CALIBRATED:
        cal = anomaly.Calibration(kind).fit(normal)
        copy = normal[2:3].clone()
        assert torch.equal(cal.apply(copy), cal.apply(normal[2:3]))
        assert anomaly.image_scores(cal.apply(copy), "max") < anomaly.image_scores(cal.apply(bad), "max")


def test_mahalanobis_one_level_is_the_two_sided_z_score():
    # symmetric values: mean == the midpoint, so z from mean/std is exact
    normal = torch.stack([torch.full((1, SIZE, SIZE), 0.1), torch.full((1, SIZE, SIZE), 0.3)])
    cal = anomaly.Calibration("mahalanobis").fit(normal)
    la, lb = math.log(0.1 + anomaly.LOG_EPS), math.log(0.3 + anomaly.LOG_EPS)
    mean = (la + lb) / 2
    n = 2 * SIZE * SIZE
    var = (lb - la) ** 2 / 4 * n / (n - 1)
    x = torch.full((1, 1, SIZE, SIZE), 0.9)
    want = abs(math.log(0.9 + anomaly.LOG_EPS) - mean) / math.sqrt(var)
    torch.testing.assert_close(cal.apply(x), torch.full((1, 1, SIZE, SIZE), want), atol=1e-3, rtol=1e-4)


def test_mahalanobis_uses_the_covariance_between_levels():
    """Two levels that always move together: breaking the pattern is unusual even when each
    level alone is within its normal range."""
    g = torch.Generator().manual_seed(0)
    base = 0.1 + 0.3 * torch.rand(8, 1, SIZE, SIZE, generator=g)
    normal = torch.cat([base, base * 1.5], dim=1)  # level 1 = 1.5 x level 0, always
    cal = anomaly.Calibration("mahalanobis").fit(normal)
    together = torch.cat([torch.full((1, 1, SIZE, SIZE), 0.2), torch.full((1, 1, SIZE, SIZE), 0.3)], 1)
    apart = torch.cat([torch.full((1, 1, SIZE, SIZE), 0.35), torch.full((1, 1, SIZE, SIZE), 0.16)], 1)
    assert cal.apply(apart).min() > 10 * cal.apply(together).max()


def test_calibration_state_round_trip_and_unfitted_use():
    normal = _busy(4, levels=2)
    x = _busy(2, levels=2, seed=9)
    for kind in anomaly.CALIBRATED:
        cal = anomaly.Calibration(kind).fit(normal)
        back = anomaly.Calibration.from_state(kind, {k: v for k, v in cal.state("p").items()}, "p")
        torch.testing.assert_close(back.apply(x), cal.apply(x))
        with pytest.raises(ValueError, match="not fitted"):
            anomaly.Calibration(kind).apply(x)
    with pytest.raises(ValueError, match="unknown calibration"):
        anomaly.Calibration("zscore")
    with pytest.raises(ValueError, match="two normal maps"):
        anomaly.Calibration("texture").fit(normal[:1])


# ------------------------------------------------------------------ calibration_choice
def _val_set(defect_value, n_normal=8, n_bad=6):
    normal = _busy(n_normal, levels=2, seed=10)
    bad = _with_patch(_busy(n_bad, levels=2, seed=11), defect_value)
    raw = torch.cat([normal, bad])
    labels = np.r_[np.zeros(n_normal, int), np.ones(n_bad, int)]
    masks = np.zeros((len(raw), SIZE, SIZE), bool)
    masks[n_normal:, 4:9, 5:10] = True
    return raw, labels == 0, labels, masks


def test_choose_picks_a_two_sided_calibration_for_smooth_defects():
    raw, normal, labels, masks = _val_set(0.005)
    choice = calibration_choice.choose(raw, normal, labels, masks)
    assert choice["map"] in ("texture2", "mahalanobis")
    assert choice["score"] in ("texture2", "mahalanobis")
    assert choice["table"]["texture2"]["pixel_auroc"] == pytest.approx(1.0)
    assert choice["table"]["texture"]["pixel_auroc"] < 0.5  # one-sided ranks the patch lowest


def test_choose_without_masks_judges_maps_by_image_auroc():
    raw, normal, labels, _ = _val_set(1.5)
    choice = calibration_choice.choose(raw, normal, labels, None)
    assert choice["table"][choice["map"]]["map_criterion"] == choice["table"][choice["map"]]["image_auroc"] == 1.0
    assert "pixel_auroc" not in choice["table"]["none"]
    assert choice["score"] in anomaly.CALIBRATED


def test_choose_fits_on_half_the_normals_and_judges_on_the_rest(monkeypatch):
    raw, normal, labels, masks = _val_set(1.5)
    seen = []
    real_fit = anomaly.Calibration.fit

    def spy(self, maps):
        seen.append(maps.clone())
        return real_fit(self, maps)

    monkeypatch.setattr(anomaly.Calibration, "fit", spy)
    calibration_choice.choose(raw, normal, labels, masks)
    assert seen and all(torch.equal(m, raw[[0, 2, 4, 6]]) for m in seen)


def test_too_few_normal_val_images_is_a_clear_error():
    raw, normal, labels, masks = _val_set(1.5, n_normal=3)
    with pytest.raises(DataError, match=r"split val has 3 normal image\(s\).*at least 4.*infer.normalize: image"):
        calibration_choice.choose(raw, normal, labels, masks)
    calibration_choice.check_normal_count(0, ["image", "none"])  # these need no normal images
    with pytest.raises(DataError, match="split val has 1 normal"):
        calibration_choice.check_normal_count(1, ["texture2"])


# ------------------------------------------------------------------ read-only inputs
def _read_only(a):
    a = np.array(a)
    a.setflags(write=False)  # what pandas 3's .to_numpy() (copy-on-write) and np.frombuffer give
    return a


def test_read_only_arrays_give_no_warning():
    """torch.from_numpy on a read-only array warns (once per process: one line per stage); the
    library copies where a caller's array becomes a tensor."""
    raw, normal, labels, masks = _val_set(1.5)
    split = _read_only(np.array(["val"] * len(raw)))
    anomalous = _read_only(labels == 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cal = anomaly.Calibration("texture").fit(raw[:4])
        state = {k: _read_only(v) for k, v in cal.state("p").items()}
        back = anomaly.Calibration.from_state("texture", state, "p")
        calibration_choice.choose(raw, _read_only(normal), _read_only(labels), _read_only(masks))

        class Det:  # the two calls calibrate_on_val makes of a Detector
            settings = type("S", (), {"normalize": "auto"})()

            def calibrate(self, maps, map_kind, score_kind):
                self.kinds = (map_kind, score_kind)

        det = Det()
        calibration_choice.calibrate_on_val(det, raw, split, anomalous, _read_only(masks))
    torch.testing.assert_close(back.apply(raw), cal.apply(raw))
    assert det.kinds[0] in anomaly.CALIBRATIONS
    state["p_loc"] = np.zeros_like(state["p_loc"])  # the calibration holds copies, not the caller's arrays
    torch.testing.assert_close(back.apply(raw), cal.apply(raw))


def test_texture_with_memory_weighs_the_reconstruction_and_the_memory_equally():
    """Two noise levels and the memory: the fused z is (mean of the levels' z + the memory's z) / 2."""
    g = torch.Generator().manual_seed(0)
    normal = torch.rand(6, 3, 4, 4, generator=g) + 0.5
    cal = anomaly.Calibration.named("texture+memory").fit(normal)
    assert cal.name == "texture+memory" and cal.memory
    raw = torch.rand(2, 3, 4, 4, generator=g) + 0.5
    z = (torch.log(raw + anomaly.LOG_EPS) - cal.arrays["loc"].view(1, -1, 1, 1)) / cal.arrays["scale"].view(1, -1, 1, 1)
    want = (z[:, :2].mean(dim=1, keepdim=True) + z[:, 2:]) / 2
    torch.testing.assert_close(cal.apply(raw), want)
    heavy = anomaly.Calibration.named("texture+memory3").fit(normal)
    torch.testing.assert_close(heavy.apply(raw), z[:, :2].mean(dim=1, keepdim=True) / 4 + 3 * z[:, 2:] / 4)
    with pytest.raises(ValueError, match="cannot fuse"):
        anomaly.Calibration.named("pixel+memory")
    with pytest.raises(ValueError, match="cannot fuse"):
        anomaly.Calibration.named("mahalanobis+memory3")


def test_choose_tries_the_fused_candidates_only_with_a_memory_map():
    g = torch.Generator().manual_seed(1)
    raw = torch.rand(12, 3, 8, 8, generator=g) + 0.1
    normal = np.array([True] * 8 + [False] * 4)
    labels = (~normal).astype(int)
    with_memory = calibration_choice.choose(raw, normal, labels, None, levels=2)
    assert {"texture+memory", "texture2+memory3", "mahalanobis+memory"} <= set(with_memory["table"])
    assert not any(k.endswith("+memory") for k in calibration_choice.choose(raw[:, :2], normal, labels, None)["table"])
