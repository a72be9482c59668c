"""Exact expectations for anodiff.metrics on hand-made maps and masks."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from anodiff import metrics as M

TIGHT = dict(abs=1e-12)


def _blob_masks(rng, n=4, size=32):
    """Random rectangles (0-3 per image, some overlapping into one region)."""
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        for _ in range(rng.integers(0, 4)):
            h, w = rng.integers(1, 9, size=2)
            r, c = rng.integers(0, size - 8, size=2)
            masks[i, r : r + h, c : c + w] = 1
    masks[0, 3:7, 3:7] = 1  # at least one region
    return masks


# ----------------------------------------------------------------------- perfect / inverted
def _perfect_case():
    masks = np.zeros((3, 16, 16), dtype=np.uint8)
    masks[0, 2:6, 2:6] = 1
    masks[1, 10:12, 3:15] = 1
    masks[1, 0, 0] = 1
    return masks  # image 2 is normal


def test_perfect_map_scores_one():
    masks = _perfect_case()
    maps = masks.astype(float)
    assert M.pixel_auroc(maps, masks) == pytest.approx(1.0, **TIGHT)
    assert M.pixel_ap(maps, masks) == pytest.approx(1.0, **TIGHT)
    assert M.aupro(maps, masks) == pytest.approx(1.0, **TIGHT)
    assert M.dice(maps, masks, 0.5) == pytest.approx(1.0, **TIGHT)
    assert M.f1_max(maps, masks) == (pytest.approx(1.0, **TIGHT), 1.0)


def test_inverted_map_scores_zero():
    # 1 - mask ranks every normal pixel above every defect pixel: the ROC goes
    # (0,0) -> (1,0) -> (1,1), area exactly 0; the PRO curve reaches FPR 1 before any
    # region pixel is flagged, so the PRO is 0 on the whole [0, 0.3] range: AUPRO exactly 0.
    masks = _perfect_case()
    maps = 1.0 - masks
    assert M.pixel_auroc(maps, masks) == pytest.approx(0.0, **TIGHT)
    assert M.aupro(maps, masks) == pytest.approx(0.0, **TIGHT)
    assert M.dice(maps, masks, 0.5) == pytest.approx(0.0, **TIGHT)


# ----------------------------------------------------------------------- hand-computed AUPRO
def _two_region_case():
    """10x10 image: region A 2x2 (4 px), region B 4x4 (16 px), 80 normal pixels.

    scores: A -> 1.0; left half of B (8 px) -> 0.8, right half (8 px) -> 0.5;
    8 normal pixels -> 0.8, 16 normal pixels -> 0.5, the other 56 normal pixels -> 0.0.
    """
    mask = np.zeros((10, 10), dtype=np.uint8)
    mask[0:2, 0:2] = 1  # A
    mask[5:9, 5:9] = 1  # B
    m = np.zeros((10, 10))
    m[0:2, 0:2] = 1.0
    m[5:9, 5:7] = 0.8
    m[5:9, 7:9] = 0.5
    normal = np.flatnonzero(mask.ravel() == 0)  # 80 pixels
    assert normal.size == 80
    m.ravel()[normal[:8]] = 0.8
    m.ravel()[normal[8:24]] = 0.5
    return m[None], mask[None]


def test_two_region_pro_curve_by_hand():
    maps, masks = _two_region_case()
    fpr, pro, thr = M.pro_curve(maps, masks)
    # t > 1.0 : nothing flagged                         -> FPR 0,            PRO 0
    # t = 1.0 : A fully, B not                          -> FPR 0,            PRO (1 + 0)/2   = 0.5
    # t = 0.8 : A, half of B, 8 normal                  -> FPR 8/80  = 0.1,  PRO (1 + 0.5)/2 = 0.75
    # t = 0.5 : A, all of B, 8 + 16 normal              -> FPR 24/80 = 0.3,  PRO 1
    # t = 0.0 : everything                              -> FPR 1,            PRO 1
    # (pixel TPR at t = 0.8 would be 12/20 = 0.6: PRO weighs the small region A as much as B.)
    np.testing.assert_allclose(fpr, [0, 0, 0.1, 0.3, 1.0], atol=1e-12)
    np.testing.assert_allclose(pro, [0, 0.5, 0.75, 1.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(thr[1:], [1.0, 0.8, 0.5, 0.0])
    assert thr[0] > 1.0


def test_two_region_aupro_by_hand():
    maps, masks = _two_region_case()
    # to FPR 0.3 (a curve point): trapezoids 0.1*(0.5+0.75)/2 = 0.0625 and
    # 0.2*(0.75+1)/2 = 0.175; area 0.2375, normalised 0.2375/0.3 = 0.791666...
    assert M.aupro(maps, masks, fpr_limit=0.3) == pytest.approx(0.2375 / 0.3, abs=1e-12)
    # to FPR 0.2 (interpolated): PRO(0.2) = 0.75 + 0.25 * (0.2-0.1)/(0.3-0.1) = 0.875;
    # area 0.0625 + 0.1*(0.75+0.875)/2 = 0.14375, normalised 0.14375/0.2 = 0.71875
    assert M.aupro(maps, masks, fpr_limit=0.2) == pytest.approx(0.71875, abs=1e-12)
    # to FPR 1: 0.2375 + 0.7*1 = 0.9375
    assert M.aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.9375, abs=1e-12)


def test_regions_in_different_images_count_separately():
    # image 0: a 1-px region at (2,2), flagged; image 1: a 3x3 region over the same place,
    # missed. Two regions, not one of 10 px: PRO at t=1 is (1 + 0)/2 = 0.5 at FPR 0; then
    # (1, 1). PRO(0.3) = 0.5 + 0.5*0.3 = 0.65; AUPRO = 0.3*(0.5+0.65)/2 / 0.3 = 0.575.
    masks = np.zeros((2, 8, 8), dtype=np.uint8)
    masks[0, 2, 2] = 1
    masks[1, 2:5, 2:5] = 1
    maps = np.zeros((2, 8, 8))
    maps[0, 2, 2] = 1.0
    fpr, pro, _ = M.pro_curve(maps, masks)
    np.testing.assert_allclose(pro[:2], [0, 0.5], atol=1e-12)
    assert M.aupro(maps, masks) == pytest.approx(0.575, abs=1e-12)


def test_regions_are_8_connected():
    # (0,0) touches the 2x2 block (1..2, 1..2) only diagonally: with 8-connectivity
    # (MVTec AD script, anomalib) it is one 5-px region, so flagging only (0,0) gives
    # PRO 1/5 = 0.2 (4-connectivity would give two regions and (1+0)/2 = 0.5).
    masks = np.zeros((1, 6, 6), dtype=np.uint8)
    masks[0, 0, 0] = 1
    masks[0, 1:3, 1:3] = 1
    maps = np.zeros((1, 6, 6))
    maps[0, 0, 0] = 1.0
    fpr, pro, _ = M.pro_curve(maps, masks)
    assert pro[1] == pytest.approx(0.2, abs=1e-12)
    assert fpr[1] == 0.0


def test_aupro_undefined_cases():
    maps = np.random.default_rng(0).random((2, 8, 8))
    assert M.aupro(maps, np.zeros((2, 8, 8))) is None  # no region
    assert M.aupro(maps, np.ones((2, 8, 8))) is None  # no normal pixel
    assert M.pro_curve(maps, np.zeros((2, 8, 8))) is None


def _brute_force_aupro(maps, masks, fpr_limit=0.3, n_thr=4001):
    """Naive definition: loop over a fine threshold grid and over regions."""
    masks = masks.astype(bool)
    regions = []
    for i in range(masks.shape[0]):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [maps[i][lab == k] for k in range(1, n + 1)]
    normal = maps[~masks]
    grid = np.linspace(maps.min(), maps.max(), n_thr)[::-1]
    fpr = np.array([(normal >= t).mean() for t in grid])
    pro = np.array([np.mean([(r >= t).mean() for r in regions]) for t in grid])
    fpr, pro = np.r_[0.0, fpr], np.r_[0.0, pro]
    keep = fpr <= fpr_limit
    x = np.r_[fpr[keep], fpr_limit]
    y = np.r_[pro[keep], np.interp(fpr_limit, fpr, pro)]
    return np.trapezoid(y, x) / fpr_limit


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    masks = _blob_masks(rng)
    maps = 0.6 * masks + rng.normal(0, 0.4, masks.shape)
    exact = M.aupro(maps, masks)
    assert exact == pytest.approx(_brute_force_aupro(maps, masks), abs=1e-3)
    # the binned variant agrees as well
    assert M.aupro(maps, masks, num_thresholds=4001) == pytest.approx(exact, abs=1e-3)


@pytest.mark.parametrize("limit", [0.05, 0.3, 0.55, 1.0])
def test_aupro_with_ties_is_exact(limit):
    # maps quantised to 11 levels: many ties. Evaluating the brute force at every distinct
    # score is then the exact curve, so both must agree to rounding error; this also
    # checks that aupro's partial sort (only the pixels up to the FPR limit) changes nothing.
    rng = np.random.default_rng(11)
    masks = _blob_masks(rng, n=5, size=24)
    maps = np.round(np.clip(0.5 * masks + rng.normal(0.3, 0.25, masks.shape), 0, 1), 1)
    regions = []
    for i in range(masks.shape[0]):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [maps[i][lab == k] for k in range(1, n + 1)]
    normal = maps[masks == 0]
    thr = np.unique(maps)[::-1]
    fpr = np.r_[0.0, [(normal >= t).mean() for t in thr]]
    pro = np.r_[0.0, [np.mean([(r >= t).mean() for r in regions]) for t in thr]]
    keep = fpr <= limit
    x = np.r_[fpr[keep], limit]
    y = np.r_[pro[keep], np.interp(limit, fpr, pro)]
    expected = np.trapezoid(y, x) / limit
    assert M.aupro(maps, masks, fpr_limit=limit) == pytest.approx(expected, abs=1e-9)
    full_fpr, full_pro, full_thr = M.pro_curve(maps, masks)
    np.testing.assert_allclose(full_fpr, fpr, atol=1e-12)
    np.testing.assert_allclose(full_pro, pro, atol=1e-12)
    np.testing.assert_allclose(full_thr[1:], thr)


def test_aupro_at_the_default_test_set_scale():
    # 100 images of 64x64 (410k pixels); how fast is a benchmark's question, not a test's
    rng = np.random.default_rng(3)
    masks = np.zeros((100, 64, 64), dtype=np.uint8)
    masks[::2, 10:20, 30:45] = 1
    maps = masks + rng.normal(0, 0.5, masks.shape)
    value = M.aupro(maps, masks)
    assert 0.5 < value < 1.0


# ----------------------------------------------------------------------- dice / thresholds
def test_dice_hand_drawn():
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[0, 0:4] = 1  # 4 defect pixels
    m = np.zeros((4, 4))
    m[0, 0:2] = 0.9
    m[0, 2] = 0.5  # exactly at the threshold: flagged (score >= threshold)
    m[0, 3] = 0.4  # missed
    m[3, 0:2] = 0.7  # 2 false positives
    # TP 3, FP 2, FN 1: 2*3 / (2*3 + 2 + 1) = 6/9
    assert M.dice(m[None], mask[None], 0.5) == pytest.approx(2 / 3, abs=1e-12)
    assert M.dice(m[None], mask[None], 0.95) == pytest.approx(0.0, abs=1e-12)
    assert M.dice(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), 0.5) is None  # 0/0
    assert M.dice(m[None], mask[None], None) is None


def test_f1_max_and_choose_threshold_pixel():
    # scores 0.1 0.4 0.35 0.8, defect = last two
    # t=0.8 : P 1   R .5 F1 .667 | t=0.4 : P .5 R .5 F1 .5
    # t=0.35: P 2/3 R 1  F1 0.8  | t=0.1 : P .5 R 1  F1 .667
    maps = np.array([[[0.1, 0.4, 0.35, 0.8]]])
    masks = np.array([[[0, 0, 1, 1]]])
    f1, thr = M.f1_max(maps, masks)
    assert f1 == pytest.approx(0.8, abs=1e-12) and thr == 0.35
    assert M.choose_threshold(maps, masks) == 0.35
    # image threshold from image scores 0.2 0.9 (labels 0 1) -> 0.9, pixel one unchanged
    assert M.choose_thresholds(maps[[0, 0]], masks[[0, 0]], [0.2, 0.9], [0, 1]) == (0.35, 0.9)
    assert M.f1_max([0.1, 0.2], [0, 0]) == (None, None)


def test_choose_threshold_falls_back_to_image_scores():
    # no defect pixel in validation: image-level F1 on scores 0.1 0.5 0.7 0.9, labels 0 1 0 1
    # t=0.9: F1 .667 | t=0.7: F1 .5 | t=0.5: P 2/3 R 1 F1 .8 | t=0.1: F1 .667
    maps = np.zeros((4, 4, 4))
    scores = [0.1, 0.5, 0.7, 0.9]
    labels = ["normal", "anomalous", "normal", "anomalous"]
    assert M.choose_threshold(maps, np.zeros((4, 4, 4)), scores, labels) == 0.5
    assert M.choose_threshold(None, None, scores, labels) == 0.5
    assert M.choose_threshold(None, None) is None
    # the pair: pixel threshold (here from the image fallback) and image threshold
    assert M.choose_thresholds(maps, np.zeros((4, 4, 4)), scores, labels) == (0.5, 0.5)
    assert M.choose_thresholds(maps, np.zeros((4, 4, 4))) == (None, None)
    assert M.choose_threshold(maps, np.zeros((4, 4, 4)), scores, ["normal"] * 4) is None


# ----------------------------------------------------------------------- image level
def test_image_metrics():
    assert M.image_auroc([0.1, 0.9, 0.4], [0, 1, 0]) == 1.0
    assert M.image_auroc([0.1, 0.9, 0.4], [1, 0, 1]) == 0.0
    assert M.image_ap([0.1, 0.9, 0.4], ["normal", "anomalous", "normal"]) == 1.0
    assert M.image_auroc([0.1, 0.9], [0, 0]) is None
    assert M.image_ap([0.1, 0.9], [1, 1]) is None
    assert M.pixel_auroc(np.ones((1, 2, 2)), np.zeros((1, 2, 2))) is None
    assert M.pixel_ap(np.ones((1, 2, 2)), np.ones((1, 2, 2))) is None
    with pytest.raises(ValueError):
        M.image_auroc([0.1, 0.9], ["normal", "bad"])


# ----------------------------------------------------------------------- evaluate
def _eval_case():
    masks = np.zeros((5, 8, 8), dtype=np.uint8)
    masks[2, 1:3, 1:3] = 1  # crack
    masks[3, 4:7, 4:7] = 1  # dot
    masks[4, 0, 0:5] = 1  # dot
    maps = masks.astype(float)
    scores = maps.max(axis=(1, 2))
    labels = ["normal", "normal", "anomalous", "anomalous", "anomalous"]
    defects = ["good", "good", "crack", "dot", "dot"]
    return maps, masks, scores, labels, defects


def test_evaluate_keys_and_per_defect():
    maps, masks, scores, labels, defects = _eval_case()
    out = M.evaluate(maps, masks, scores, labels, defects, threshold=0.5)
    assert list(out) == list(M.METRIC_KEYS)
    for key in M.PIXEL_KEYS + M.IMAGE_KEYS:
        assert out[key] == 1.0 and type(out[key]) is float
    assert out["n_test_images"] == 5 and "seconds_per_image" not in out  # timing is not a quality metric
    assert set(out["per_defect"]) == {"crack", "dot"}
    assert all(type(k) is str for k in out["per_defect"])
    for d, n in (("crack", 3), ("dot", 4)):  # the defect's images + both normal images
        entry = out["per_defect"][d]
        assert list(entry) == [k for k in M.METRIC_KEYS if k != "per_defect"]
        assert entry["n_test_images"] == n and entry["pixel_auroc"] == 1.0 and entry["aupro"] == 1.0
    json.dumps(out)  # serialisable


def test_evaluate_per_defect_values_differ():
    # the dot images are missed: per-defect figures isolate it, the crack stays perfect
    maps, masks, scores, labels, defects = _eval_case()
    maps = maps.copy()
    maps[3:] = 0.0
    scores = maps.max(axis=(1, 2))
    out = M.evaluate(maps, masks, scores, labels, defects, 0.5)
    assert out["per_defect"]["crack"]["image_auroc"] == 1.0
    assert out["per_defect"]["crack"]["dice"] == 1.0
    assert out["per_defect"]["dot"]["image_auroc"] == 0.5  # ties with the normal images
    assert out["per_defect"]["dot"]["dice"] == 0.0


def test_evaluate_without_masks_keeps_pixel_keys_as_none():
    maps, _, scores, labels, defects = _eval_case()
    out = M.evaluate(maps, None, scores, labels, defects, threshold=None)
    assert list(out) == list(M.METRIC_KEYS)
    for key in M.PIXEL_KEYS:
        assert key in out and out[key] is None
        for entry in out["per_defect"].values():
            assert key in entry and entry[key] is None
    assert out["image_auroc"] == 1.0 and out["image_ap"] == 1.0
    assert set(out["per_defect"]) == {"crack", "dot"}
    assert json.loads(json.dumps(out)) == out


def test_evaluate_rounds_to_six_decimals():
    rng = np.random.default_rng(5)
    masks = _blob_masks(rng, n=3, size=16)
    maps = masks + rng.normal(0, 0.7, masks.shape)
    labels = [1, 1, 0]
    out = M.evaluate(maps, masks, rng.random(3), labels, ["a", "b", "good"], 0.5)
    for key in ("pixel_auroc", "pixel_ap", "aupro", "dice", "image_auroc"):
        assert out[key] == round(out[key], 6)


# ----------------------------------------------------------------------- curve tables
def test_curve_tables():
    rng = np.random.default_rng(7)
    masks = _blob_masks(rng, n=4, size=32)
    maps = masks + rng.normal(0, 0.5, masks.shape)
    roc = M.roc_curve_table(maps, masks, max_points=50)
    pr = M.pr_curve_table(maps, masks, max_points=50)
    assert list(roc.columns) == ["fpr", "tpr", "threshold"] and 2 <= len(roc) <= 50
    assert list(pr.columns) == ["recall", "precision", "threshold"] and 2 <= len(pr) <= 50
    assert roc.iloc[0][["fpr", "tpr"]].tolist() == [0.0, 0.0]
    assert roc.iloc[-1][["fpr", "tpr"]].tolist() == [1.0, 1.0]
    assert np.isfinite(roc.to_numpy()).all() and np.isfinite(pr.to_numpy()).all()
    assert pr["recall"].is_monotonic_increasing
    # image level, explicitly or when masks are missing
    scores, labels = [0.1, 0.8, 0.3, 0.9], [0, 1, 0, 1]
    t1 = M.roc_curve_table(maps, None, scores, labels)
    t2 = M.roc_curve_table(scores=scores, labels=labels)
    pd.testing.assert_frame_equal(t1, t2)
    pr_img = M.pr_curve_table(scores=scores, labels=labels)
    assert list(pr_img.columns) == ["recall", "precision", "threshold"]
    assert len(M.roc_curve_table(scores=[0.1, 0.2], labels=[0, 0])) == 0


def test_curves_equal_scikit_learn_bit_for_bit():
    # one sort feeds every curve (anodiff.curves); it must give sklearn's exact points
    rng = np.random.default_rng(8)
    masks = _blob_masks(rng, n=6, size=24)
    maps = np.round(masks + rng.normal(0, 0.6, masks.shape), 1)  # many ties
    y, s = masks.ravel(), maps.ravel()
    assert M.pixel_auroc(maps, masks) == roc_auc_score(y, s)
    assert M.pixel_ap(maps, masks) == average_precision_score(y, s)
    fpr, tpr, thr = roc_curve(y, s)
    roc = M.roc_curve_table(maps, masks, max_points=10**6)
    np.testing.assert_array_equal(roc["fpr"], fpr)
    np.testing.assert_array_equal(roc["tpr"], tpr)
    np.testing.assert_array_equal(roc["threshold"][1:], thr[1:])
    precision, recall, thr = precision_recall_curve(y, s)
    pr = M.pr_curve_table(maps, masks, max_points=10**6)
    np.testing.assert_array_equal(pr["precision"], precision[::-1])
    np.testing.assert_array_equal(pr["recall"], recall[::-1])
    np.testing.assert_array_equal(pr["threshold"][1:], thr[::-1])
    scores, labels = maps.max(axis=(1, 2)), masks.any(axis=(1, 2)).astype(int)
    labels[0] = 0
    assert M.image_auroc(scores, labels) == roc_auc_score(labels, scores)
    assert M.image_ap(scores, labels) == average_precision_score(labels, scores)


def test_float32_maps_are_not_copied_and_give_the_float64_figures_and_tables():
    # evaluation keeps float32 maps as they are (half the memory at 256 px): every float32 is a
    # float64 exactly, so every figure, threshold and curve point must be the same
    rng = np.random.default_rng(10)
    masks = _blob_masks(rng, n=8, size=20)
    maps32 = np.round(masks + rng.normal(0, 0.6, masks.shape), 2).astype(np.float32)  # ties too
    maps64 = maps32.astype(np.float64)
    labels = masks.any(axis=(1, 2)).astype(int)
    labels[0] = 0
    defects = np.where(labels == 1, np.array(["a", "b"])[np.arange(8) % 2], "good")
    scores = maps64.max(axis=(1, 2))
    assert M._maps(maps32).dtype == np.float32 and np.shares_memory(M._maps(maps32), maps32)
    thr = M.choose_threshold(maps64, masks)
    assert M.choose_threshold(maps32, masks) == thr
    assert M.evaluate(maps32, masks, scores, labels, defects, thr) == M.evaluate(maps64, masks, scores, labels,
                                                                                 defects, thr)
    for table in (M.roc_curve_table, M.pr_curve_table):
        pd.testing.assert_frame_equal(table(maps32, masks), table(maps64, masks))
    for a, b in zip(M.pro_curve(maps32, masks), M.pro_curve(maps64, masks)):
        np.testing.assert_array_equal(a, b)


def test_evaluate_per_defect_equals_metrics_on_the_subset():
    # per_defect entries reuse the full test set's sort: same values as sorting the subset
    rng = np.random.default_rng(9)
    masks = _blob_masks(rng, n=9, size=16)
    masks[[1, 4, 7]] = 0
    maps = np.round(0.8 * masks + rng.normal(0, 0.5, masks.shape), 2)
    labels = masks.any(axis=(1, 2)).astype(int)
    defects = np.where(labels == 1, np.array(["a", "b"])[np.arange(9) % 2], "good")
    scores = maps.max(axis=(1, 2))
    out = M.evaluate(maps, masks, scores, labels, defects, 0.4)
    for d in ("a", "b"):
        sel = (labels == 0) | (defects == d)
        a, m, s, y = maps[sel], masks[sel], scores[sel], labels[sel]
        expected = {"pixel_auroc": M.pixel_auroc(a, m), "pixel_ap": M.pixel_ap(a, m),
                    "aupro": M.aupro(a, m), "pixel_f1_max": M.f1_max(a, m)[0],
                    "dice": M.dice(a, m, 0.4), "image_auroc": M.image_auroc(s, y),
                    "image_ap": M.image_ap(s, y)}
        assert {k: out["per_defect"][d][k] for k in expected} == {k: round(v, 6) for k, v in expected.items()}


def test_auroc_standard_error_hanley_mcneil():
    # AUROC 0.5 on n positives and n negatives: q1 = q2 = 1/3, so var = (1/4 + (n - 1)/6) / n^2
    n = 10
    assert M.auroc_standard_error(0.5, n, n) == pytest.approx(((0.25 + (n - 1) / 6) / n**2) ** 0.5)
    assert M.auroc_standard_error(1.0, 5, 5) == 0.0
    assert M.auroc_standard_error(0.8, 50, 50) < M.auroc_standard_error(0.8, 12, 24)
    with pytest.raises(ValueError, match="both classes"):
        M.auroc_standard_error(0.7, 0, 5)


def test_lean_figures_of_large_curves_equal_scikit_learn(monkeypatch):
    # above curves.LEAN_POINTS the figures are summed in chunks from the counts (no full-length
    # point arrays: 500 maps at 256 px would need GBs); forced here on a small set, with ties
    # and chunks that split tie runs' neighbours
    from anodiff import curves

    rng = np.random.default_rng(11)
    masks = _blob_masks(rng, n=6, size=24)
    maps = np.round(masks + rng.normal(0, 0.6, masks.shape), 2)
    y, s = masks.ravel(), maps.ravel()
    exact = {"auroc": M.pixel_auroc(maps, masks), "ap": M.pixel_ap(maps, masks), "f1": M.f1_max(maps, masks),
             "aupro": M.aupro(maps, masks)}
    monkeypatch.setattr(curves, "LEAN_POINTS", 10)
    monkeypatch.setattr(curves, "_CHUNK", 7)
    assert M.pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(y, s), rel=1e-12)
    assert M.pixel_ap(maps, masks) == pytest.approx(average_precision_score(y, s), rel=1e-12)
    f1, thr = M.f1_max(maps, masks)
    assert f1 == pytest.approx(exact["f1"][0], rel=1e-12) and thr == exact["f1"][1]
    assert M.aupro(maps, masks) == exact["aupro"]  # the same points, sliced at the limit first
    assert exact["auroc"] == roc_auc_score(y, s)
