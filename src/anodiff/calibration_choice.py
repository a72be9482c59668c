"""Choose how maps and image scores are calibrated, on the val split of the data at hand.

What makes a good map depends on the surface: per-image standardisation suits the embedded
marble, while a two-sided, position-free calibration is needed where a defect can be smoother
than the texture around it. `infer` (with `infer.normalize: auto`) tries every calibration in
`anomaly.CALIBRATIONS` on val and keeps the best; the test split is never looked at.

To keep the choice honest, the normal val images are split in two: each candidate is fitted on
one half and judged on the other val images (the second half of the normals and every anomalous
val image), so a calibration cannot win by having seen the very images it is judged on. The
winner is then refitted on all normal val images.
- The map's calibration is judged by the mean of pixel AUROC and AUPRO where val has masks, by
  image AUROC where it has only labels.
- The image score's calibration is judged by image AUROC, among the calibrations fitted on normal
  images (a score from a map standardised by its own image is not comparable across images).
Ties go to the earlier candidate in `anomaly.CALIBRATIONS` order. The GAN's model selection
(`gan_selection`) judges a generator's val maps by this same choice.

Normal-only data (no anomalous val image) leaves nothing to judge a candidate by: then `auto` takes
`NORMAL_ONLY` (fused with the memory distance where infer has it), the calibration val chose most
often on the real-photo benchmark, and says so (`"chosen_by"` in the choice).
"""

from __future__ import annotations

import numpy as np
import torch

from anodiff import anomaly, metrics
from anodiff.data import MIN_NORMAL_VAL  # two to fit on, two to judge on
from anodiff.errors import DataError

NORMAL_ONLY = "texture"  # auto's calibration when val has no anomalous image to choose by


def check_normal_count(n_normal: int, kinds) -> None:
    """DataError when calibrating needs more normal val images than the data has."""
    if any(k in anomaly.CALIBRATED for k in kinds) and n_normal < MIN_NORMAL_VAL:
        raise DataError(
            f"data/prepared: split val has {n_normal} normal image(s); calibrating the maps needs at "
            f"least {MIN_NORMAL_VAL} (raise data.val_fraction, add good images, or set "
            f"infer.normalize: image, which needs none)")


def halves(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, judge) positions among n normal val images: a candidate is fitted on the first and
    judged on the second (with every anomalous val image)."""
    idx = np.arange(n)
    return idx[0::2], idx[1::2]


def choose(raw: torch.Tensor, normal: np.ndarray, labels: np.ndarray, masks: np.ndarray | None,
           candidates=anomaly.CALIBRATIONS, levels: int | None = None) -> dict:
    """{"map": kind, "score": kind, "table": {kind: {criterion: value}}} from val raw maps.

    raw: (N, T, H, W) val maps; normal: (N,) bool, the normal val images; labels: (N,) 0/1;
    masks: (N, H, W) or None. `levels`: how many of the T maps are noise levels, when the last
    is the memory distance (T = levels + 1): then the fusable candidates are also tried with it
    (`anomaly.fused_names`: "<kind>+memory", "<kind>+memory3"), after every reconstruction-only
    candidate (which win ties).
    """
    levels = raw.shape[1] if levels is None else levels
    if raw.shape[1] > levels:
        candidates = tuple(candidates) + tuple(n for k in candidates for n in anomaly.fused_names(k))
    normal_idx = np.flatnonzero(normal)
    check_normal_count(len(normal_idx), candidates)
    fit_pos, judge_pos = halves(len(normal_idx))
    fit_idx = normal_idx[fit_pos]
    judge = np.ones(len(raw), bool)
    judge[fit_idx] = False
    has_masks = masks is not None
    table = {}
    for kind in candidates:
        cal = anomaly.Calibration.named(kind)
        view = raw if cal.memory else raw[:, :levels]
        if cal.kind in anomaly.CALIBRATED:
            cal.fit(view[torch.from_numpy(fit_idx)])
        judged = cal.apply(view[torch.from_numpy(judge)])
        maps, scores = judged[:, 0].numpy(), anomaly.image_scores(judged, "max").numpy()
        row = {"image_auroc": metrics.image_auroc(scores, labels[judge])}
        if has_masks:
            row["pixel_auroc"] = metrics.pixel_auroc(maps, masks[judge])
            row["aupro"] = metrics.aupro(maps, masks[judge])
        table[kind] = row

    def map_criterion(row):
        if has_masks and row["pixel_auroc"] is not None:
            return (row["pixel_auroc"] + row["aupro"]) / 2
        return row["image_auroc"] if row["image_auroc"] is not None else -1.0

    def score_criterion(row):
        return row["image_auroc"] if row["image_auroc"] is not None else -1.0

    for kind, row in table.items():
        row["map_criterion"] = map_criterion(row)
    map_kind = max(table, key=lambda k: table[k]["map_criterion"])  # first of equals wins
    scored = [k for k in table if anomaly.split_kind(k)[0] in anomaly.CALIBRATED] or list(table)
    score_kind = max(scored, key=lambda k: score_criterion(table[k]))
    return {"map": map_kind, "score": score_kind, "table": table}


def calibrate_on_val(det, raw: torch.Tensor, split: np.ndarray, anomalous: np.ndarray,
                     masks: np.ndarray | None, levels: int | None = None) -> dict:
    """Calibrate `det` (a Detector) on the val rows of `raw`, as `infer` does; returns the choice.

    split: (N,) split names; anomalous: (N,) bool. With `infer.normalize: auto` both calibrations
    are chosen on val (`choose`); otherwise the fixed one is used. Either way the winners are fitted
    on all normal val images. `levels`: the noise levels among raw's maps, when the last one is the
    memory distance (see `choose`)."""
    val = split == "val"
    val_normal = val & ~anomalous
    kind = det.settings.normalize
    choice = {"map": kind, "score": kind}
    if kind == "auto" and not anomalous[val].any():
        fused = levels is not None and raw.shape[1] > levels
        default = NORMAL_ONLY + ("+memory" if fused else "")
        check_normal_count(int(val_normal.sum()), [NORMAL_ONLY])
        choice = {"map": default, "score": default, "chosen_by": "default: val has no anomalous image"}
    elif kind == "auto":
        choice = choose(raw[torch.from_numpy(val)], val_normal[val], anomalous[val].astype(int),
                        None if masks is None else masks[val], levels=levels)
    else:
        check_normal_count(int(val_normal.sum()), [kind])
    det.calibrate(raw[torch.from_numpy(val_normal)], choice["map"], choice["score"])
    return choice

