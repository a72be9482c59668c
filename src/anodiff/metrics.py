"""Evaluation metrics for anomaly maps and image scores (numpy in, python floats out).

Definitions follow anomalib and the MVTec AD papers, and avoid AnoDDPM's pitfalls
(fixed 0.5 threshold, per-image AUROC averaged, swapped precision/recall):

- Pixel AUROC / AP: pooled over *all* test pixels of all images (scikit-learn's definitions).
- F1-max: best F1 over every distinct threshold of the precision-recall curve.
- AUPRO: the per-region overlap (PRO) curve of Bergmann et al. (MVTec AD, IJCV 2021),
  integrated up to a global FPR of ``fpr_limit`` (0.3) and divided by ``fpr_limit``:
  * regions are the connected components of each image's ground-truth mask with
    **8-connectivity** (a 3x3 structuring element). This is the choice of the official
    MVTec AD evaluation script (``scipy.ndimage.label`` with ``np.ones((3, 3))``) and of
    anomalib (``cv2.connectedComponents`` defaults to connectivity 8; kornia's GPU labelling
    propagates through 3x3 max-pooling, also 8-connected). Components never cross images.
  * at a threshold t, a region's overlap is the fraction of its pixels with score >= t;
    PRO(t) is the mean over all regions of all images (each region weighs the same,
    whatever its size); FPR(t) is pooled over all normal pixels of all images.
  * the curve is computed exactly from the sorted scores (every distinct score is a
    threshold), like the official MVTec script; anomalib instead resamples per-region ROC
    curves onto a common index grid, an approximation of the same quantity.
  * the curve is linearly interpolated at exactly ``fpr_limit`` and integrated with the
    trapezoid rule, so a perfect map scores 1 and a map that ranks every normal pixel above
    every defect pixel scores 0.
- Dice: pooled over all pixels, ``2TP / (2TP + FP + FN)`` with prediction ``map >= threshold``.
- Threshold: F1-adaptive on the validation split (anomalib's ``F1AdaptiveThreshold``).

A prediction is always ``score >= threshold`` (scikit-learn's convention), everywhere here.
Undefined values (one class only, no region, no mask) are ``None``, never NaN or absent.

Inputs are checked once, by the public functions here; the sums run in ``anodiff.curves``.
``evaluate`` sorts all test pixels once and reads every pixel metric of the whole test set
and of each defect type from that one sort.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from anodiff import curves

__all__ = [
    "METRIC_KEYS", "pixel_auroc", "pixel_ap", "f1_max", "pro_curve", "aupro", "dice",
    "choose_threshold", "choose_thresholds", "image_auroc", "image_ap", "evaluate",
    "roc_curve_table", "pr_curve_table", "image_roc_table", "normal_quantile_thresholds", "null_reasons",
]

#: keys of metrics/<method>.json (docs/method.md, "The metrics"); per_defect entries hold all but "per_defect".
#: Quality figures only: timing goes to metrics/timing/ (not a DVC metric), so `dvc metrics diff`
#: of two runs with the same params shows nothing.
METRIC_KEYS = (
    "pixel_auroc", "pixel_ap", "aupro", "pixel_f1_max", "dice", "image_auroc", "image_ap",
    "n_test_images", "per_defect",
)
PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "aupro", "pixel_f1_max", "dice")
IMAGE_KEYS = ("image_auroc", "image_ap")
FPR_LIMIT = 0.3


# ----------------------------------------------------------------------------- input checks
def _stack(x: np.ndarray) -> np.ndarray:
    """(N, H, W) view of an (H, W), (N, H, W) or (N, 1, H, W) array."""
    x = x[:, 0] if x.ndim == 4 and x.shape[1] == 1 else x
    return x[None] if x.ndim == 2 else x


def _maps(maps) -> np.ndarray:
    """Anomaly maps as (N, H, W) float32 when they are float32 (no copy: every float32 is a float64
    exactly, so sorts, counts and thresholds are the same; half the memory of 500 maps at 256 px),
    float64 otherwise."""
    a = np.asarray(maps)
    a = _stack(a if a.dtype == np.float32 else a.astype(np.float64))
    if a.ndim != 3:
        raise ValueError(f"anomaly maps must have shape (N, H, W), got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("anomaly maps contain NaN or Inf")
    return a


def _masks(masks, shape) -> np.ndarray:
    """Ground-truth masks as bool (N, H, W); a pixel is a defect where mask > 0.5."""
    m = _stack(np.asarray(masks))
    if m.shape != tuple(shape):
        raise ValueError(f"masks shape {m.shape} does not match maps shape {tuple(shape)}")
    return m > 0.5


def _pixels(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    a = _maps(maps)
    return a, _masks(masks, a.shape)


def _labels(labels) -> np.ndarray:
    """Image labels as int {0, 1}: accepts 0/1, bools, or 'normal'/'anomalous' strings."""
    a = np.asarray(labels).ravel()
    if a.dtype.kind in "OUS":
        s = a.astype(str)
        bad = sorted(set(s) - {"normal", "anomalous"})
        if bad:
            raise ValueError(f"image labels must be 'normal' or 'anomalous', got {bad}")
        return (s == "anomalous").astype(np.int64)
    out = a.astype(np.int64)
    if not np.all((out == 0) | (out == 1)) or not np.array_equal(out, a.astype(np.float64)):
        raise ValueError("image labels must be 0 (normal) or 1 (anomalous)")
    return out


def _scores(scores, n=None) -> np.ndarray:
    a = np.asarray(scores, dtype=np.float64).ravel()
    if n is not None and a.size != n:
        raise ValueError(f"expected {n} scores, got {a.size}")
    if not np.all(np.isfinite(a)):
        raise ValueError("scores contain NaN or Inf")
    return a


def _clean(x):
    """Python float rounded to 6 decimals, or None for missing / non-finite values."""
    if x is None:
        return None
    x = float(x)
    return round(x, 6) if math.isfinite(x) else None


# ----------------------------------------------------------------------------- pixel level
def _dice(s: np.ndarray, y: np.ndarray, threshold) -> float | None:
    if threshold is None:
        return None
    pred = s >= float(threshold)
    tp = int(np.count_nonzero(pred & y))
    denom = int(np.count_nonzero(pred)) + int(np.count_nonzero(y))  # 2TP + FP + FN
    return None if denom == 0 else 2 * tp / denom


def pixel_auroc(maps, masks) -> float | None:
    """ROC AUC pooled over all pixels of all images; None if masks are all 0 or all 1."""
    a, m = _pixels(maps, masks)
    return curves.auroc(curves.curve(a.ravel(), m.ravel()))


def pixel_ap(maps, masks) -> float | None:
    """Average precision pooled over all pixels; None if masks are all 0 or all 1."""
    a, m = _pixels(maps, masks)
    return curves.average_precision(curves.curve(a.ravel(), m.ravel()))


def f1_max(scores, labels) -> tuple[float | None, float | None]:
    """(best F1, its threshold) over all distinct thresholds (prediction: score >= threshold).

    Works on any shape (pixels or images; inputs are flattened). Ties in F1 keep the lowest
    threshold (first argmax over ascending thresholds, as anomalib does).
    Returns (None, None) when there is no positive (F1 undefined for every threshold).
    """
    s = _scores(scores)
    y = np.asarray(labels).ravel()
    y = (y > 0.5) if y.dtype.kind not in "OUS" else _labels(y).astype(bool)
    if s.size != y.size:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    return curves.best_f1(curves.curve(s, y))


def dice(maps, masks, threshold) -> float | None:
    """Pooled Dice 2TP/(2TP+FP+FN) of (maps >= threshold) vs masks.

    None when the threshold is None or when both prediction and mask are empty (0/0).
    """
    if threshold is None:
        return None
    a, m = _pixels(maps, masks)
    return _dice(a.ravel(), m.ravel(), threshold)


def _pro(maps, masks, num_thresholds) -> curves.Curve:
    a, m = _pixels(maps, masks)
    if num_thresholds is None:
        return curves.pixel_curve(curves.rank_pixels(a, m))[0]
    if int(num_thresholds) < 2:
        raise ValueError("num_thresholds must be at least 2 (or None for exact)")
    return curves.binned_curve(a.ravel(), m.ravel(), curves.region_labels(m), int(num_thresholds))


def pro_curve(maps, masks, num_thresholds: int | None = None):
    """The PRO curve: (fpr, pro, thresholds) arrays, fpr non-decreasing from 0 to 1.

    Point k means "pixels with score >= thresholds[k] are flagged": fpr is the fraction
    of all normal pixels flagged, pro the mean over all ground-truth regions of the
    fraction of each region flagged. The first point (0, 0) has a threshold just above
    the highest score. Returns None when there is no region or no normal pixel.

    num_thresholds=None: exact, one point per distinct score (one sort, O(P log P)).
    An int: that many thresholds evenly spaced between the lowest and highest score
    (one searchsorted, no sort), for very large test sets.
    """
    return curves.pro_points(_pro(maps, masks, num_thresholds))


def aupro(maps, masks, fpr_limit: float = FPR_LIMIT, num_thresholds: int | None = None) -> float | None:
    """Area under the PRO curve up to FPR ``fpr_limit``, divided by ``fpr_limit`` (in [0, 1]).

    The curve is interpolated linearly at exactly ``fpr_limit`` and integrated with the
    trapezoid rule (sklearn.metrics.auc). None when there is no ground-truth region or no
    normal pixel. See the module docstring for the conventions.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return curves.pro_area(_pro(maps, masks, num_thresholds), fpr_limit)


# ----------------------------------------------------------------------------- image level
def image_auroc(scores, labels) -> float | None:
    """ROC AUC of image scores; None unless both classes are present."""
    y = _labels(labels)
    return curves.auroc(curves.curve(_scores(scores, y.size), y == 1))


def auroc_standard_error(auc: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUROC measured on n_pos positives and n_neg negatives (Hanley and
    McNeil 1982, exponential approximation). Written here because scikit-learn and scipy have no
    AUROC variance; it tells how large a difference a val split of this size can resolve."""
    if n_pos < 1 or n_neg < 1:
        raise ValueError(f"need both classes, got {n_pos} positive and {n_neg} negative")
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    return float(max(var, 0.0) ** 0.5)


def image_ap(scores, labels) -> float | None:
    """Average precision of image scores; None unless both classes are present."""
    y = _labels(labels)
    return curves.average_precision(curves.curve(_scores(scores, y.size), y == 1))


# ----------------------------------------------------------------------------- thresholds
def _image_threshold(scores, labels) -> float | None:
    """The threshold maximising image-level F1; None without scores or anomalous image."""
    if scores is None or labels is None:
        return None
    y = _labels(labels)
    return curves.best_f1(curves.curve(_scores(scores, y.size), y == 1))[1] if y.any() else None


def choose_threshold(val_maps, val_masks, val_scores=None, val_labels=None) -> float | None:
    """The pixel threshold that maximises F1 on the validation split (F1-adaptive).

    1. If the validation masks hold defect pixels: the threshold maximising pooled pixel F1
       over the validation maps (anomalib's F1AdaptiveThreshold on pixels).
    2. Otherwise (no masks, or masks all empty) and image scores/labels are given with at
       least one anomalous image: the threshold maximising image-level F1 on the scores.
       It is applied to the pixel maps, which is meaningful because image scores are
       statistics of the maps (max or top-k mean) on the same scale.
    3. Otherwise None (Dice is then None).
    """
    if val_maps is not None and val_masks is not None:
        a, m = _pixels(val_maps, val_masks)
        if m.any():
            return curves.best_f1(curves.curve(a.ravel(), m.ravel()))[1]
    return _image_threshold(val_scores, val_labels)


def choose_thresholds(val_maps, val_masks, val_scores=None, val_labels=None):
    """(pixel threshold, image threshold), both F1-adaptive on the validation split.

    The pixel threshold is choose_threshold's (used for Dice and overlays); the image
    threshold maximises image-level F1 of the validation scores (used to label images
    normal/anomalous), None when validation has no anomalous image or no scores.
    """
    pixel = choose_threshold(val_maps, val_masks, val_scores, val_labels)
    return pixel, _image_threshold(val_scores, val_labels)


def normal_quantile_thresholds(val_maps, val_scores, q: float) -> tuple[float | None, float | None]:
    """(pixel, image) thresholds from normal val images alone (normal-only data: no F1 to maximise):
    the q-quantile of their image scores, and of their maps' maxima, so that a pixel is marked
    where its map rises as high as a normal image's seldom does (`evaluate.normal_quantile`)."""
    scores = None if val_scores is None else _scores(val_scores)
    image = float(np.quantile(scores, q)) if scores is not None and scores.size else None
    pixel = None
    if val_maps is not None:
        a = _maps(val_maps)
        pixel = float(np.quantile(a.reshape(len(a), -1).max(axis=1), q)) if len(a) else None
    return pixel, image


def null_reasons(result: dict, *, has_masks: bool, labels) -> dict:
    """Why each null headline figure of `result` could not be computed: {"pixel": why, "image": why}
    (only the groups with a null), so a null is never silent."""
    y = _labels(labels)
    one_class = ("no anomalous test image" if not y.any() else "no normal test image" if y.all() else None)
    out = {}
    if any(result.get(k) is None for k in PIXEL_KEYS if k != "dice"):
        out["pixel"] = one_class or ("the data has no masks" if not has_masks else "no defect pixel in the test masks")
    if any(result.get(k) is None for k in IMAGE_KEYS):
        out["image"] = one_class or "no image scores"
    return out


# ----------------------------------------------------------------------------- evaluate
def _metrics_block(px, scores, labels, threshold, images=None) -> dict:
    """All keys except per_defect for the chosen images (all if None) of checked inputs."""
    out = dict.fromkeys(PIXEL_KEYS + IMAGE_KEYS)
    if px is not None:
        c, pixel_scores, defect = curves.pixel_curve(px, images)
        out.update(pixel_auroc=curves.auroc(c), pixel_ap=curves.average_precision(c),
                   aupro=curves.pro_area(c, FPR_LIMIT), pixel_f1_max=curves.best_f1(c)[0],
                   dice=_dice(pixel_scores, defect, threshold))
    y = labels if images is None else labels[images]
    if scores is not None:
        c = curves.curve(scores if images is None else scores[images], y == 1)
        out.update(image_auroc=curves.auroc(c), image_ap=curves.average_precision(c))
    out = {k: _clean(v) for k, v in out.items()}
    return {**out, "n_test_images": int(y.size)}


def evaluate(maps, masks, scores, labels, defects, threshold) -> dict:
    """The metrics/<method>.json dict: exactly METRIC_KEYS, JSON-serialisable.

    maps (N, H, W) float or None; masks (N, H, W) {0,1} or None (no masks in the data:
    every pixel key is None); scores (N,) image scores or None; labels (N,) 0/1 or
    'normal'/'anomalous'; defects (N,) defect names ('good' for normal images);
    threshold: the pixel threshold chosen on validation (see choose_threshold), used for
    Dice.

    per_defect[d], for every defect type d of the anomalous test images, holds the same
    keys (without per_defect) computed on d's images together with ALL normal test images,
    as in anomalib / the MVTec AD per-category tables, so that AUROC, AP and the FPR
    axis of AUPRO stay defined per defect. n_test_images counts that subset.
    """
    y = _labels(labels)
    n = y.size
    d = np.asarray(defects, dtype=object).ravel().astype(str)
    if d.size != n:
        raise ValueError(f"{n} labels but {d.size} defects")
    px = None
    if maps is not None:
        a = _maps(maps)
        if a.shape[0] != n:
            raise ValueError(f"{n} labels but {a.shape[0]} anomaly maps")
        if masks is not None:
            px = curves.rank_pixels(a, _masks(masks, a.shape))
    s = _scores(scores, n) if scores is not None else None
    thr = None if threshold is None else float(threshold)

    result = _metrics_block(px, s, y, thr)
    normal = y == 0
    result["per_defect"] = {
        defect: _metrics_block(px, s, y, thr, normal | ((y == 1) & (d == defect)))
        for defect in sorted({str(x) for x in d[y == 1]})
    }
    return {k: result[k] for k in METRIC_KEYS}


# ----------------------------------------------------------------------------- curve tables
def _table(maps, masks, scores, labels) -> curves.Curve | None:
    """Pixel curve (pooled) when masks with both classes are given, else image curve."""
    if maps is not None and masks is not None:
        a, m = _pixels(maps, masks)
        if m.any() and not m.all():
            return curves.curve(a.ravel(), m.ravel())
    if scores is None or labels is None:
        return None
    y = _labels(labels)
    c = curves.curve(_scores(scores, y.size), y == 1)
    return c if curves.both_classes(c) else None


def roc_curve_table(
    maps=None, masks=None, scores=None, labels=None, *, max_points: int = 500
) -> pd.DataFrame:
    """ROC curve for DVC plots: columns fpr, tpr, threshold, at most max_points rows.

    Pixel-level (pooled) when masks with both classes are given, else image-level from
    scores/labels; an empty table when neither is defined.
    """
    return curves.roc_table(_table(maps, masks, scores, labels), max_points)


def pr_curve_table(
    maps=None, masks=None, scores=None, labels=None, *, max_points: int = 500
) -> pd.DataFrame:
    """PR curve for DVC plots: columns recall, precision, threshold, at most max_points rows.

    Pixel-level (pooled) when masks with both classes are given, else image-level.
    """
    return curves.pr_table(_table(maps, masks, scores, labels), max_points)


def image_roc_table(scores, labels, *, max_points: int = 500) -> pd.DataFrame:
    """The image-level ROC curve (fpr, tpr, threshold) whatever masks the data has: the curve an
    inspector's verdicts move along. Empty with one class only."""
    return roc_curve_table(None, None, scores, labels, max_points=max_points)
