"""Evaluation metrics for anomaly maps and image scores (numpy in, python floats out).

Definitions follow anomalib and the MVTec AD papers, and avoid AnoDDPM's pitfalls
(fixed 0.5 threshold, per-image AUROC averaged, swapped precision/recall):

- Pixel AUROC / AP: pooled over *all* test pixels of all images (scikit-learn).
- F1-max: best F1 over every distinct threshold of scikit-learn's precision-recall curve.
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
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import ndimage
from sklearn.metrics import (
    auc,
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

__all__ = [
    "METRIC_KEYS",
    "pixel_auroc",
    "pixel_ap",
    "f1_max",
    "pro_curve",
    "aupro",
    "dice",
    "choose_threshold",
    "choose_thresholds",
    "image_auroc",
    "image_ap",
    "evaluate",
    "evaluate_maps",
    "roc_curve_table",
    "pr_curve_table",
    "image_roc_curve_table",
    "image_pr_curve_table",
]

#: keys of metrics/<method>.json (DESIGN.md); per_defect entries hold all but "per_defect".
METRIC_KEYS = (
    "pixel_auroc",
    "pixel_ap",
    "aupro",
    "pixel_f1_max",
    "dice",
    "image_auroc",
    "image_ap",
    "n_test_images",
    "seconds_per_image",
    "per_defect",
)
PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "aupro", "pixel_f1_max", "dice")
IMAGE_KEYS = ("image_auroc", "image_ap")

# 8-connectivity inside each image, no connection across images (axis 0 of (N, H, W)).
_STRUCTURE_8 = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_8[1] = True


# ----------------------------------------------------------------------------- helpers
def _maps(maps) -> np.ndarray:
    """Anomaly maps as float64 (N, H, W); accepts (H, W) and (N, 1, H, W)."""
    a = np.asarray(maps, dtype=np.float64)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"anomaly maps must have shape (N, H, W), got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("anomaly maps contain NaN or Inf")
    return a


def _masks(masks, shape) -> np.ndarray:
    """Ground-truth masks as bool (N, H, W); a pixel is a defect where mask > 0.5."""
    m = np.asarray(masks)
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim == 2:
        m = m[None]
    if m.shape != tuple(shape):
        raise ValueError(f"masks shape {m.shape} does not match maps shape {tuple(shape)}")
    return m > 0.5


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


def _both_classes(y: np.ndarray) -> bool:
    return y.size > 0 and bool(y.any()) and not bool(y.all())


def _clean(x):
    """Python float rounded to 6 decimals, or None for missing / non-finite values."""
    if x is None:
        return None
    x = float(x)
    return round(x, 6) if math.isfinite(x) else None


def _above(x: float) -> float:
    """Smallest float above x: the threshold at which nothing is predicted positive."""
    return float(np.nextafter(x, np.inf))


# ----------------------------------------------------------------------------- pixel level
def pixel_auroc(maps, masks) -> float | None:
    """ROC AUC pooled over all pixels of all images; None if masks are all 0 or all 1."""
    a = _maps(maps)
    m = _masks(masks, a.shape).ravel()
    if not _both_classes(m):
        return None
    return float(roc_auc_score(m, a.ravel()))


def pixel_ap(maps, masks) -> float | None:
    """Average precision pooled over all pixels; None if masks are all 0 or all 1."""
    a = _maps(maps)
    m = _masks(masks, a.shape).ravel()
    if not _both_classes(m):
        return None
    return float(average_precision_score(m, a.ravel()))


def f1_max(scores, labels) -> tuple[float | None, float | None]:
    """(best F1, its threshold) over all distinct thresholds (prediction: score >= threshold).

    Works on any shape (pixels or images; inputs are flattened). Ties in F1 keep the lowest
    threshold (first argmax of scikit-learn's ascending thresholds, as anomalib does).
    Returns (None, None) when there is no positive (F1 undefined for every threshold).
    """
    s = _scores(scores)
    y = np.asarray(labels).ravel()
    y = (y > 0.5) if y.dtype.kind not in "OUS" else _labels(y).astype(bool)
    if s.size != y.size:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    if not y.any():
        return None, None
    precision, recall, thresholds = precision_recall_curve(y, s)
    # The last (precision=1, recall=0) point has no threshold: drop it.
    p, r = precision[:-1], recall[:-1]
    denom = p + r
    f1 = np.divide(2 * p * r, denom, out=np.zeros_like(denom), where=denom > 0)
    i = int(np.argmax(f1))
    return float(f1[i]), float(thresholds[i])


def dice(maps, masks, threshold) -> float | None:
    """Pooled Dice 2TP/(2TP+FP+FN) of (maps >= threshold) vs masks.

    None when the threshold is None or when both prediction and mask are empty (0/0).
    """
    if threshold is None:
        return None
    a = _maps(maps)
    m = _masks(masks, a.shape)
    pred = a >= float(threshold)
    tp = int(np.count_nonzero(pred & m))
    fp = int(np.count_nonzero(pred & ~m))
    fn = int(np.count_nonzero(~pred & m))
    denom = 2 * tp + fp + fn
    return None if denom == 0 else 2 * tp / denom


# ----------------------------------------------------------------------------- PRO / AUPRO
def _region_weights(m: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-pixel weight 1 / (n_regions * region_size) for defect pixels, 0 elsewhere.

    One ``ndimage.label`` call over the (N, H, W) stack: the structure connects the 8
    in-plane neighbours only, so regions never span two images and labels are unique
    across the stack. Summing these weights over the pixels above a threshold gives the
    mean over regions of each region's overlap, i.e. PRO at that threshold.
    """
    regions, n_regions = ndimage.label(m, structure=_STRUCTURE_8)
    if n_regions == 0:
        return np.zeros(m.size), 0
    flat = regions.ravel()
    sizes = np.bincount(flat, minlength=n_regions + 1).astype(np.float64)
    inv = np.zeros(n_regions + 1)
    inv[1:] = 1.0 / (sizes[1:] * n_regions)
    return inv[flat], n_regions


def pro_curve(maps, masks, num_thresholds: int | None = None):
    """The PRO curve: (fpr, pro, thresholds) arrays, fpr non-decreasing from 0 to 1.

    Point k means "pixels with score >= thresholds[k] are flagged": fpr is the fraction
    of all normal pixels flagged, pro the mean over all ground-truth regions of the
    fraction of each region flagged. The first point (0, 0) has a threshold just above
    the highest score. Returns None when there is no region or no normal pixel.

    num_thresholds=None: exact, one point per distinct score (one sort, O(P log P)).
    An int: that many thresholds evenly spaced between the lowest and highest score
    (one searchsorted, no full sort), for very large test sets.
    """
    a = _maps(maps)
    return _pro_points(a, _masks(masks, a.shape), num_thresholds, None)


def _pro_points(a, m, num_thresholds, fpr_limit):
    """pro_curve on checked arrays; with fpr_limit, only the points needed up to it.

    scikit-learn's curves count pixels of one binary label; PRO weighs each defect pixel
    by 1 / (n_regions * its region's size), which none of its curve functions accept
    for this purpose (sample_weight would also reweigh the normal side), so the
    cumulative sums are done here with numpy.
    """
    weights, n_regions = _region_weights(m)
    normal = ~m.ravel()
    n_normal = int(np.count_nonzero(normal))
    if n_regions == 0 or n_normal == 0:
        return None
    s = a.ravel()
    top = _above(s.max())
    if num_thresholds is None:
        if fpr_limit is not None:
            # Points beyond the first one with FPR > fpr_limit do not matter. Its threshold
            # is at or above the k-th highest normal score (k normal pixels flagged means
            # FPR > limit; +2 leaves a margin for rounding in limit * n): sort only the
            # pixels at or above it (found in O(P) with a partition), not all of them.
            k = int(math.floor(fpr_limit * n_normal)) + 2
            if k < n_normal:
                normal_scores = s[normal]
                t_k = np.partition(normal_scores, n_normal - k)[n_normal - k]
                keep = s >= t_k
                s, normal, weights = s[keep], normal[keep], weights[keep]
        order = np.argsort(s, kind="stable")[::-1]  # descending scores
        s_sorted = s[order]
        fp = np.cumsum(normal[order], dtype=np.int64)  # integer counts: exact
        pro = np.cumsum(weights[order])
        # a threshold takes in every pixel of its score: keep the last of each tie run
        last = np.empty(s_sorted.size, dtype=bool)
        last[:-1] = s_sorted[1:] != s_sorted[:-1]
        last[-1] = True
        fp, pro, thr = fp[last], pro[last], s_sorted[last]
    else:
        k = int(num_thresholds)
        if k < 2:
            raise ValueError("num_thresholds must be at least 2 (or None for exact)")
        grid = np.linspace(s.min(), s.max(), k)  # ascending
        grid[-1] = s.max()  # guard against rounding in linspace
        # idx = number of grid thresholds <= score: flagged at grid[j] <=> idx > j
        idx = np.searchsorted(grid, s, side="right")
        fp_counts = np.bincount(idx, weights=normal.astype(np.float64), minlength=k + 1)
        pro_w = np.bincount(idx, weights=weights, minlength=k + 1)
        # reverse cumulative sums give j = k-1 .. 0, i.e. descending thresholds
        fp = np.cumsum(fp_counts[::-1])[:-1].round().astype(np.int64)
        pro = np.cumsum(pro_w[::-1])[:-1]
        thr = grid[::-1]
    fpr = np.concatenate([[0.0], fp / n_normal])
    pro = np.concatenate([[0.0], np.minimum(pro, 1.0)])
    thr = np.concatenate([[top], thr])
    return fpr, pro, thr


def aupro(maps, masks, fpr_limit: float = 0.3, num_thresholds: int | None = None) -> float | None:
    """Area under the PRO curve up to FPR ``fpr_limit``, divided by ``fpr_limit`` (in [0, 1]).

    The curve is interpolated linearly at exactly ``fpr_limit`` and integrated with the
    trapezoid rule (sklearn.metrics.auc). None when there is no ground-truth region or no
    normal pixel. See the module docstring for the conventions.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    a = _maps(maps)
    curve = _pro_points(a, _masks(masks, a.shape), num_thresholds, fpr_limit)
    if curve is None:
        return None
    fpr, pro, _ = curve
    n = int(np.searchsorted(fpr, fpr_limit, side="right"))  # points with fpr <= limit
    x, y = fpr[:n], pro[:n]
    if n < fpr.size and x[-1] < fpr_limit:
        # fpr[n-1] < limit < fpr[n]: add the interpolated point at exactly the limit
        x0, x1, y0, y1 = fpr[n - 1], fpr[n], pro[n - 1], pro[n]
        x = np.append(x, fpr_limit)
        y = np.append(y, y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0))
    return float(min(max(auc(x, y) / fpr_limit, 0.0), 1.0))


# ----------------------------------------------------------------------------- thresholds
def choose_threshold(val_maps, val_masks, val_scores=None, val_labels=None, *, return_source=False):
    """The pixel threshold that maximises F1 on the validation split (F1-adaptive).

    1. If the validation masks hold defect pixels: the threshold maximising pooled pixel F1
       over the validation maps (anomalib's F1AdaptiveThreshold on pixels).
    2. Otherwise (no masks, or masks all empty) and image scores/labels are given with at
       least one anomalous image: the threshold maximising image-level F1 on the scores.
       It is applied to the pixel maps, which is meaningful because image scores are
       statistics of the maps (max or top-k mean) on the same scale.
    3. Otherwise None (Dice is then None).

    Returns the threshold (float or None), or (threshold, source) with source one of
    "pixel_f1", "image_f1", None when ``return_source`` is true.
    """
    threshold, source = None, None
    if val_maps is not None and val_masks is not None:
        a = _maps(val_maps)
        m = _masks(val_masks, a.shape)
        if m.any():
            _, threshold = f1_max(a.ravel(), m.ravel())
            source = "pixel_f1"
    if threshold is None and val_scores is not None and val_labels is not None:
        y = _labels(val_labels)
        if y.any():
            _, threshold = f1_max(_scores(val_scores, y.size), y)
            source = "image_f1"
    return (threshold, source) if return_source else threshold


def choose_thresholds(val_maps, val_masks, val_scores=None, val_labels=None):
    """(pixel threshold, image threshold), both F1-adaptive on the validation split.

    The pixel threshold is choose_threshold's (used for Dice and overlays); the image
    threshold maximises image-level F1 of the validation scores (used to label images
    normal/anomalous), None when validation has no anomalous image or no scores.
    """
    pixel = choose_threshold(val_maps, val_masks, val_scores, val_labels)
    image = None
    if val_scores is not None and val_labels is not None:
        y = _labels(val_labels)
        if y.any():
            image = f1_max(_scores(val_scores, y.size), y)[1]
    return pixel, image


# ----------------------------------------------------------------------------- image level
def image_auroc(scores, labels) -> float | None:
    """ROC AUC of image scores; None unless both classes are present."""
    y = _labels(labels)
    if not _both_classes(y):
        return None
    return float(roc_auc_score(y, _scores(scores, y.size)))


def image_ap(scores, labels) -> float | None:
    """Average precision of image scores; None unless both classes are present."""
    y = _labels(labels)
    if not _both_classes(y):
        return None
    return float(average_precision_score(y, _scores(scores, y.size)))


# ----------------------------------------------------------------------------- evaluate
def _metrics_block(maps, masks, scores, labels, threshold, seconds_per_image) -> dict:
    """All keys except per_defect for one set of images (masks may be None)."""
    out = dict.fromkeys(PIXEL_KEYS)
    if maps is not None and masks is not None:
        out["pixel_auroc"] = pixel_auroc(maps, masks)
        out["pixel_ap"] = pixel_ap(maps, masks)
        out["aupro"] = aupro(maps, masks)
        out["pixel_f1_max"] = f1_max(maps.ravel(), masks.ravel())[0] if masks.any() else None
        out["dice"] = dice(maps, masks, threshold)
    out["image_auroc"] = image_auroc(scores, labels) if scores is not None else None
    out["image_ap"] = image_ap(scores, labels) if scores is not None else None
    out = {k: _clean(v) for k, v in out.items()}
    out["n_test_images"] = int(labels.size)
    out["seconds_per_image"] = _clean(seconds_per_image)
    return out


def evaluate(maps, masks, scores, labels, defects, threshold, seconds_per_image=None) -> dict:
    """The metrics/<method>.json dict: exactly METRIC_KEYS, JSON-serialisable.

    maps (N, H, W) float or None; masks (N, H, W) {0,1} or None (no masks in the data:
    every pixel key is None); scores (N,) image scores or None; labels (N,) 0/1 or
    'normal'/'anomalous'; defects (N,) defect names ('good' for normal images);
    threshold: the pixel threshold chosen on validation (see choose_threshold), used for
    Dice; seconds_per_image: inference time per image, copied through.

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
    a = m = None
    if maps is not None:
        a = _maps(maps)
        if a.shape[0] != n:
            raise ValueError(f"{n} labels but {a.shape[0]} anomaly maps")
        if masks is not None:
            m = _masks(masks, a.shape)
    s = _scores(scores, n) if scores is not None else None
    thr = None if threshold is None else float(threshold)

    result = _metrics_block(a, m, s, y, thr, seconds_per_image)
    per_defect = {}
    normal = y == 0
    for defect in sorted({str(x) for x in d[y == 1]}):
        sel = normal | ((y == 1) & (d == defect))
        per_defect[defect] = _metrics_block(
            a[sel] if a is not None else None,
            m[sel] if m is not None else None,
            s[sel] if s is not None else None,
            y[sel],
            thr,
            seconds_per_image,
        )
    result["per_defect"] = per_defect
    return {k: result[k] for k in METRIC_KEYS}


#: the name used in docs/ARCHITECTURE.md
evaluate_maps = evaluate


# ----------------------------------------------------------------------------- curve tables
def _subsample(df: pd.DataFrame, max_points: int) -> pd.DataFrame:
    """At most max_points rows, evenly spaced along the curve, first and last kept."""
    if max_points < 2:
        raise ValueError("max_points must be at least 2")
    if len(df) > max_points:
        idx = np.unique(np.linspace(0, len(df) - 1, max_points).round().astype(int))
        df = df.iloc[idx]
    return df.reset_index(drop=True)


def _roc_table(y, s, max_points):
    if not _both_classes(y):
        return pd.DataFrame({"fpr": [], "tpr": [], "threshold": []}, dtype=np.float64)
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=True)
    thr = thr.astype(np.float64)
    thr[~np.isfinite(thr)] = _above(s.max())  # sklearn's first threshold is +inf
    return _subsample(pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": thr}), max_points)


def _pr_table(y, s, max_points):
    if not _both_classes(y):
        return pd.DataFrame({"recall": [], "precision": [], "threshold": []}, dtype=np.float64)
    precision, recall, thr = precision_recall_curve(y, s)
    # the final (recall 0, precision 1) point has no threshold: nothing is flagged above max
    thr = np.append(thr.astype(np.float64), _above(s.max()))
    df = pd.DataFrame({"recall": recall, "precision": precision, "threshold": thr})
    return _subsample(df.iloc[::-1], max_points)  # recall increasing


def image_roc_curve_table(scores, labels, max_points: int = 500) -> pd.DataFrame:
    """Image-level ROC: columns fpr, tpr, threshold (empty if one class only)."""
    y = _labels(labels)
    return _roc_table(y, _scores(scores, y.size), max_points)


def image_pr_curve_table(scores, labels, max_points: int = 500) -> pd.DataFrame:
    """Image-level PR: columns recall, precision, threshold (empty if one class only)."""
    y = _labels(labels)
    return _pr_table(y, _scores(scores, y.size), max_points)


def _pixel_or_image(maps, masks, scores, labels):
    if maps is not None and masks is not None:
        a = _maps(maps)
        m = _masks(masks, a.shape).ravel()
        if _both_classes(m):
            return m.astype(np.int64), a.ravel()
    if scores is None or labels is None:
        return None
    y = _labels(labels)
    return y, _scores(scores, y.size)


def roc_curve_table(
    maps=None, masks=None, scores=None, labels=None, *, max_points: int = 500
) -> pd.DataFrame:
    """ROC curve for DVC plots: columns fpr, tpr, threshold, at most max_points rows.

    Pixel-level (pooled) when masks with both classes are given, else image-level from
    scores/labels; an empty table when neither is defined.
    """
    yl = _pixel_or_image(maps, masks, scores, labels)
    if yl is None:
        return pd.DataFrame({"fpr": [], "tpr": [], "threshold": []}, dtype=np.float64)
    return _roc_table(*yl, max_points)


def pr_curve_table(
    maps=None, masks=None, scores=None, labels=None, *, max_points: int = 500
) -> pd.DataFrame:
    """PR curve for DVC plots: columns recall, precision, threshold, at most max_points rows.

    Pixel-level (pooled) when masks with both classes are given, else image-level.
    """
    yl = _pixel_or_image(maps, masks, scores, labels)
    if yl is None:
        return pd.DataFrame({"recall": [], "precision": [], "threshold": []}, dtype=np.float64)
    return _pr_table(*yl, max_points)
