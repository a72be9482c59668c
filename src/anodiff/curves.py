"""ROC, precision-recall and PRO curves of checked arrays, all read from one sort.

Counting positives and negatives above every distinct score once (``Curve``) gives the
ROC and PR curves exactly as scikit-learn's ``roc_curve`` and ``precision_recall_curve``
return them, AUROC / AP / F1-max from those, and, with per-region weights on the
positives, the PRO curve of AUPRO. Inputs are already checked (``anodiff.metrics`` does
that); conventions are in metrics' docstring. Every curve point k means "items with
score >= thresholds[k] are flagged"; a threshold just above the highest score flags none.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import ndimage
from sklearn.metrics import auc

# 8-connectivity inside each image, no connection across images (axis 0 of (N, H, W)).
_STRUCTURE_8 = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_8[1] = True


class Curve(NamedTuple):
    """Counts at every distinct score t, highest first, of the items with score >= t."""

    thr: np.ndarray  # the distinct scores, descending
    tp: np.ndarray  # positives flagged (int64); tp[-1] counts all positives
    fp: np.ndarray  # negatives flagged (int64); fp[-1] counts all negatives
    pro: np.ndarray | None  # summed region_weights of the flagged positives


def above(x: float) -> float:
    """Smallest float above x: the threshold at which nothing is predicted positive."""
    return float(np.nextafter(float(x), np.inf))  # in float64, whatever x's type


def descending(s: np.ndarray) -> np.ndarray:
    """Indices of s by descending score; stable, so equal scores keep one fixed order."""
    return np.argsort(s, kind="stable")[::-1]


def ranked(s: np.ndarray, y: np.ndarray, order=None):
    """s and y in the given order, by default descending()."""
    order = descending(s) if order is None else order
    return s[order], y[order]


def from_sorted(s: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> Curve:
    """The counts of s, y (bool) and weights w, all sorted by descending score. `w` is summed
    in place (pass a copy to keep it).

    Hand-written: scikit-learn's curve functions sort again on every call and cannot
    weigh the positives by region (PRO) while counting the negatives plainly. Lean on memory,
    for millions of pixels: at a tie run's end k, fp = k + 1 - tp, so only the positives are
    summed, in int32 while they fit.
    """
    counts = np.int32 if s.size < 2**31 else np.int64  # every count is at most s.size
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True][: s.size])  # a threshold takes in its whole tie run
    tp = np.cumsum(y, dtype=counts)[last]
    fp = (last + 1 - tp).astype(counts)
    # thresholds keep the scores' type: float32 maps give float32 thresholds, each a float64 exactly
    return Curve(s[last], tp, fp, None if w is None else np.cumsum(w, out=w)[last])


def curve(s: np.ndarray, y: np.ndarray) -> Curve:
    """The counts of scores s and labels y (bool), in any order."""
    return from_sorted(*ranked(s, y))


def both_classes(c: Curve) -> bool:
    return c.thr.size > 0 and c.tp[-1] > 0 and c.fp[-1] > 0


def roc(c: Curve):
    """(fpr, tpr, thresholds): the points of sklearn's roc_curve (drop_intermediate=True)."""
    tp, fp, thr = c.tp.astype(np.float64), c.fp.astype(np.float64), c.thr.astype(np.float64)
    if fp.size > 2:  # drop points collinear with both neighbours, exactly as sklearn does
        keep = np.r_[True, np.logical_or(np.diff(fp, 2), np.diff(tp, 2)), True]
        tp, fp, thr = tp[keep], fp[keep], thr[keep]
    tp, fp = np.r_[0.0, tp], np.r_[0.0, fp]
    return fp / fp[-1], tp / tp[-1], np.r_[above(c.thr[0]), thr]  # sklearn's first: +inf


def pr(c: Curve):
    """(precision, recall, thresholds), recall decreasing: sklearn's precision_recall_curve,
    plus a threshold for its final (precision 1, recall 0) point."""
    precision = c.tp / (c.tp + c.fp)  # every threshold flags at least one item
    recall = c.tp / c.tp[-1]
    return (np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0],
            np.r_[c.thr[::-1].astype(np.float64), above(c.thr[0])])


#: above this many curve points (distinct scores: ~ every pixel of a large test set at 256 px) the
#: figures are summed in chunks from the counts, without scikit-learn's full-length point arrays
#: (each several hundred MB there); below it they are scikit-learn's, bit for bit
LEAN_POINTS = 1_000_000
_CHUNK = 1 << 22


def _chunks(n: int):
    for start in range(0, n, _CHUNK):
        yield start, min(n, start + _CHUNK)


def _previous(a: np.ndarray, start: int, stop: int) -> np.ndarray:
    """a[start-1:stop-1], with 0 before the first point (the curve starts at no item flagged)."""
    return np.r_[0, a[start:stop - 1]] if start == 0 else a[start - 1:stop - 1]


def auroc(c: Curve) -> float | None:
    if not both_classes(c):
        return None
    if c.thr.size <= LEAN_POINTS:
        return auc(*roc(c)[:2])
    # the trapezoids from (0, 0) in integer counts: exact (2 x the area is below 2 P N < 2^63)
    twice = 0
    for a, b in _chunks(c.thr.size):
        fp, tp = c.fp[a:b].astype(np.int64), c.tp[a:b].astype(np.int64)
        twice += int(np.dot(fp - _previous(c.fp, a, b), tp + _previous(c.tp, a, b)))
    return twice / (2.0 * int(c.tp[-1]) * int(c.fp[-1]))


def average_precision(c: Curve) -> float | None:
    """sklearn's average_precision_score: the step-wise sum over the PR curve."""
    if not both_classes(c):
        return None
    if c.thr.size > LEAN_POINTS:  # sum of (recall gain) x precision, point by point
        total = 0.0
        for a, b in _chunks(c.thr.size):
            tp = c.tp[a:b].astype(np.int64)
            total += float(np.dot(tp - _previous(c.tp, a, b), tp / (tp + c.fp[a:b])))
        return max(0.0, total / float(c.tp[-1]))
    precision, recall, _ = pr(c)
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def best_f1(c: Curve) -> tuple[float | None, float | None]:
    """(best F1, its threshold); ties keep the lowest threshold, as anomalib does."""
    if c.thr.size == 0 or c.tp[-1] == 0:
        return None, None
    if c.thr.size > LEAN_POINTS:  # F1 = 2 TP / (TP + FP + P) at each point; the last of equals is the lowest threshold
        best, at = -1.0, 0
        for a, b in _chunks(c.thr.size):
            f1 = 2.0 * c.tp[a:b] / (c.tp[a:b].astype(np.int64) + c.fp[a:b] + c.tp[-1])
            i = f1.size - 1 - int(np.argmax(f1[::-1]))
            if f1[i] >= best:
                best, at = float(f1[i]), a + i
        return best, float(c.thr[at])
    precision, recall, thr = pr(c)
    p, r = precision[:-1], recall[:-1]  # the final point flags nothing
    denom = p + r
    f1 = np.divide(2 * p * r, denom, out=np.zeros_like(denom), where=denom > 0)
    i = int(np.argmax(f1))
    return float(f1[i]), float(thr[i])


def _subsample(df: pd.DataFrame, max_points: int) -> pd.DataFrame:
    """At most max_points rows, evenly spaced along the curve, first and last kept."""
    if max_points < 2:
        raise ValueError("max_points must be at least 2")
    if len(df) > max_points:
        idx = np.unique(np.linspace(0, len(df) - 1, max_points).round().astype(int))
        df = df.iloc[idx]
    return df.reset_index(drop=True)


def _thin(c: Curve, max_points: int) -> Curve:
    """A large curve (> LEAN_POINTS) reduced to max_points of its own points, evenly spaced, first
    and last kept, before a table is built from it: the table is a plot of at most max_points
    rows, and the full point arrays would take GBs. A smaller curve is returned as it is."""
    if c.thr.size <= LEAN_POINTS:
        return c
    idx = np.unique(np.linspace(0, c.thr.size - 1, max(2, 4 * max_points)).round().astype(np.int64))
    return Curve(c.thr[idx], c.tp[idx], c.fp[idx], None if c.pro is None else c.pro[idx])


def roc_table(c: Curve | None, max_points: int) -> pd.DataFrame:
    """roc(c) as columns fpr, tpr, threshold, at most max_points rows; empty for None."""
    if c is None:
        return pd.DataFrame({"fpr": [], "tpr": [], "threshold": []}, dtype=np.float64)
    c = _thin(c, max_points)
    fpr, tpr, thr = roc(c)
    return _subsample(pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": thr}), max_points)


def pr_table(c: Curve | None, max_points: int) -> pd.DataFrame:
    """pr(c) as columns recall (increasing), precision, threshold; empty for None."""
    if c is None:
        return pd.DataFrame({"recall": [], "precision": [], "threshold": []}, dtype=np.float64)
    c = _thin(c, max_points)
    precision, recall, thr = pr(c)
    df = pd.DataFrame({"recall": recall, "precision": precision, "threshold": thr})
    return _subsample(df.iloc[::-1], max_points)


# ----------------------------------------------------------------------------- PRO
def region_labels(m: np.ndarray) -> np.ndarray:
    """Flat region labels of (N, H, W) bool masks, unique across images (0: normal).

    One ndimage.label call over the stack: the structure connects the 8 in-plane
    neighbours only, so regions never span two images.
    """
    return ndimage.label(m, structure=_STRUCTURE_8)[0].ravel()


def region_weights(regions: np.ndarray) -> np.ndarray:
    """Per-pixel weight 1 / (n_regions * region size) on defect pixels, 0 elsewhere.

    regions: labels of the pixels taken (any order). Summing the weights of the pixels
    above a threshold gives the mean over regions of each one's overlap: PRO there.
    """
    sizes = np.bincount(regions).astype(np.float64)
    present = np.flatnonzero(sizes[1:]) + 1
    inv = np.zeros(sizes.size)
    inv[present] = 1.0 / (sizes[present] * present.size)
    return inv[regions]


class Pixels(NamedTuple):
    """Checked maps and masks, flattened, with the one sort every pixel metric reads."""

    s: np.ndarray  # (N*H*W,) scores, image after image
    y: np.ndarray  # (N*H*W,) defect flags
    regions: np.ndarray  # (N*H*W,) region_labels
    order: np.ndarray  # indices by descending score (stable)
    hw: int  # pixels per image


def rank_pixels(a: np.ndarray, m: np.ndarray) -> Pixels:
    """Pixels of float maps a and bool masks m, both (N, H, W)."""
    s = a.ravel()
    order = descending(s)
    if s.size < 2**31:  # int32 indices: half the memory of 26 M pixels' order, kept for every block
        order = order.astype(np.int32)
    return Pixels(s, m.ravel(), region_labels(m), order, a.shape[1] * a.shape[2])


def pixel_curve(px: Pixels, images=None) -> tuple[Curve, np.ndarray, np.ndarray]:
    """(Curve with PRO weights, sorted scores, sorted flags) of the images chosen by the
    bool (N,) ``images`` (all if None). A stable sort restricted to a subset is the
    subset's stable sort, so no image subset is sorted again."""
    order = px.order if images is None else px.order[np.repeat(images, px.hw)[px.order]]
    s, y = ranked(px.s, px.y, order)
    return from_sorted(s, y, region_weights(px.regions[order])), s, y


def binned_curve(s: np.ndarray, y: np.ndarray, regions: np.ndarray, k: int) -> Curve:
    """The counts at k thresholds evenly spaced over the score range (no sort)."""
    if s.size == 0:
        return from_sorted(s, y)
    grid = np.linspace(s.min(), s.max(), k)  # ascending
    grid[-1] = s.max()  # guard against rounding in linspace
    # idx = number of grid thresholds <= score: flagged at grid[j] <=> idx > j
    idx = np.searchsorted(grid, s, side="right")

    def flagged(w):  # reverse cumulative sums give j = k-1 .. 0, i.e. descending thresholds
        return np.cumsum(np.bincount(idx, weights=w, minlength=k + 1)[::-1])[:-1]

    tp, fp = (flagged(v.astype(np.float64)).round().astype(np.int64) for v in (y, ~y))
    return Curve(grid[::-1], tp, fp, flagged(region_weights(regions)))


def pro_points(c: Curve):
    """(fpr, pro, thresholds) from (0, 0); None without region or normal pixel."""
    if not both_classes(c):
        return None
    return _pro_points(c, c.fp[-1])


def _pro_points(c: Curve, negatives):
    """pro_points of the first points of a curve whose negatives number `negatives` in all."""
    fpr = np.r_[0.0, c.fp / negatives]
    return fpr, np.r_[0.0, np.minimum(c.pro, 1.0)], np.r_[above(c.thr[0]), c.thr.astype(np.float64)]


def pro_area(c: Curve, fpr_limit: float) -> float | None:
    """Area under the PRO curve up to fpr_limit (interpolated there), over fpr_limit."""
    if not both_classes(c):
        return None
    # only the points up to the limit, and the next one, count: slice before building the curve
    m = min(c.thr.size, int(np.searchsorted(c.fp, fpr_limit * float(c.fp[-1]), side="right")) + 2)
    fpr, pro, _ = _pro_points(Curve(c.thr[:m], c.tp[:m], c.fp[:m], c.pro[:m]), c.fp[-1])
    n = int(np.searchsorted(fpr, fpr_limit, side="right"))  # points with fpr <= limit
    x, y = fpr[:n], pro[:n]
    if n < fpr.size and x[-1] < fpr_limit:
        # fpr[n-1] < limit < fpr[n]: add the interpolated point at exactly the limit
        x0, x1, y0, y1 = fpr[n - 1], fpr[n], pro[n - 1], pro[n]
        x = np.append(x, fpr_limit)
        y = np.append(y, y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0))
    return float(min(max(auc(x, y) / fpr_limit, 0.0), 1.0))
