"""GAN model selection on val: which of the generator's checkpoints `train_gan` keeps.

At its checkpoints (the start, every `gan.eval_every` generator steps, the end) `gan.train_gan`
hands its noise network G to a `Selection`. `ValMaps` draws the very val maps `infer@gan` would
draw with G (the `ddpm` method's map with G's noise at G's level, through the same `Detector`),
`val_figures` judges them as `infer` would (the calibrations chosen on val by
`calibration_choice.choose`), and `pick_candidate` decides whether G replaces the pick so far, whose
weights the `Selection` keeps. A residual generator starts as the plain `ddpm` method, so the start
is always a candidate to fall back on.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from anodiff import anomaly, data, metrics, runtime
from anodiff.calibration_choice import check_normal_count, choose, halves
from anodiff.config import Infer
from anodiff.detector import Detector, NoiseModel
from anodiff.features import FeatureExtractor

# the streams (runtime.seeded offsets) of the val maps' noise: the levels G leaves alone, G's own level
OTHER_LEVELS_OFFSET, OWN_LEVEL_OFFSET = 103, 104
# a candidate's figures, in the order of the selection table (plots/train_gan_noise/selection/)
COLUMNS = ["step", "map_criterion", "image_auroc", "image_auroc_se", "pixel_auroc", "aupro",
           "map_calibration", "score_calibration"]


def val_figures(raw: torch.Tensor, normal: np.ndarray, labels: np.ndarray, masks: np.ndarray | None,
                candidates=anomaly.CALIBRATIONS) -> dict:
    """How good the maps `raw` (N, T, H, W) of the val images are, judged as `infer` would judge
    them: the calibrations chosen by `calibration_choice.choose`, and their val figures.

    {"map_criterion", "image_auroc", "image_auroc_se", "pixel_auroc", "aupro", "map_calibration",
    "score_calibration"} (pixel_auroc and aupro are None without masks; image_auroc and its
    standard error None without both labels)."""
    choice = choose(raw, normal, labels, masks, candidates)
    table = choice["table"]
    image = table[choice["score"]]["image_auroc"]
    # choose() judges on the val images not fitted on: every anomalous one, half the normal ones
    n_neg = len(halves(int(normal.sum()))[1])
    n_pos = int(np.asarray(labels).sum())
    se = metrics.auroc_standard_error(image, n_pos, n_neg) if image is not None else None
    return {"map_criterion": table[choice["map"]]["map_criterion"], "image_auroc": image, "image_auroc_se": se,
            "pixel_auroc": table[choice["map"]].get("pixel_auroc"), "aupro": table[choice["map"]].get("aupro"),
            "map_calibration": choice["map"], "score_calibration": choice["score"]}


def pick_candidate(rows: list[dict]) -> int:
    """Index of the candidate to keep among rows of val figures, rows[0] being the start.

    A later candidate replaces the start only if it is at least as good on val in both the map
    criterion and image AUROC (better maps bought with worse image scores, or the reverse, do
    not count), and if the mean of the two beats the start's by more than one standard error of
    that mean: half the start's image-AUROC standard error (`image_auroc_se`; a map criterion
    averaged over every val pixel varies far less). A val split of a few dozen images cannot
    resolve smaller gains, and keeping them would trade the start for noise. Among the
    candidates that pass, the highest mean wins, the earliest of equals. For the residual GAN
    the start is the plain `ddpm` method, so `gan` falls below `ddpm` only by what val fails to
    predict about test. A missing figure counts as 0 (a missing standard error as 0 too).
    """
    if not rows:
        raise ValueError("no candidates to pick from")

    def fig(row, key):
        value = row.get(key)
        return 0.0 if value is None or value != value else float(value)  # None or NaN

    start = rows[0]
    mean = lambda row: (fig(row, "map_criterion") + fig(row, "image_auroc")) / 2  # noqa: E731
    best, best_value = 0, mean(start) + fig(start, "image_auroc_se") / 2
    for i, row in enumerate(rows[1:], 1):
        if fig(row, "map_criterion") < fig(start, "map_criterion") or fig(row, "image_auroc") < fig(start, "image_auroc"):
            continue
        if mean(row) > best_value:
            best, best_value = i, mean(row)
    return best


class ValMaps:
    """A noise network G -> the val figures (`val_figures`) of the maps `infer@gan` draws with G.

    `detector` has the GAN's `NoiseModel` and infer's settings (and extractor, for `infer.error:
    feature`); images (N, C, H, W) are the val images, anomalous (N,) bool, masks (N, H, W) or None.
    The levels that do not use G's noise are drawn once, here; each call redraws G's own level
    with the same noise (common random numbers: candidates differ by G alone).
    """

    def __init__(self, detector: Detector, images: torch.Tensor, anomalous: np.ndarray,
                 masks: np.ndarray | None, seed: int):
        if detector.noise_model is None:
            raise ValueError("ValMaps needs a detector with the GAN's noise model")
        settings = detector.settings
        self.candidates = anomaly.CALIBRATIONS if settings.normalize == "auto" else (settings.normalize,)
        check_normal_count(int((~anomalous).sum()), self.candidates)
        self.detector, self.images, self.anomalous, self.masks, self.seed = detector, images, anomalous, masks, seed
        self.levels = detector.levels()
        self.others = [t for t in self.levels if t != detector.noise_model.t]
        self.other_maps = detector.raw_maps(images, runtime.seeded(seed, OTHER_LEVELS_OFFSET), progress=False,
                                            only=self.others)[0] if self.others else None

    def __call__(self, net: torch.nn.Module) -> dict:
        det = self.detector.with_noise_net(net)
        own_t = det.noise_model.t
        own = det.raw_maps(self.images, runtime.seeded(self.seed, OWN_LEVEL_OFFSET), progress=False, only=[own_t])[0]
        parts = [own if t == own_t else self.other_maps[:, [self.others.index(t)]] for t in self.levels]
        return val_figures(torch.cat(parts, dim=1), ~self.anomalous, self.anomalous.astype(int), self.masks,
                           self.candidates)

    def describe(self) -> str:
        return (f"{len(self.images)} val images ({int(self.anomalous.sum())} anomalous), levels {self.levels}, "
                f"G's level t={self.detector.noise_model.t}")


class Selection:
    """The candidates of one GAN training and the weights of the one kept: `train_gan` calls
    `consider(net, step)` at the start, whenever `due(step)` and at the end, and `keep(net)` after.

    `evaluate`: a function G -> {"map_criterion", "image_auroc", ...} on val (`ValMaps`), called in
    eval mode without gradients; `every`: generator steps between checkpoints (0: start and end
    only). `candidates` lists every candidate's step and figures; `kept_step` is the pick's.
    `state_dict` / `load_state_dict` carry both through a training's snapshots.
    """

    def __init__(self, evaluate, every: int):
        self.evaluate, self.every = evaluate, every
        self.candidates: list[dict] = []
        self._kept: dict = {}  # {"step", "state"} of the pick so far

    @property
    def kept_step(self) -> int | None:
        return self._kept.get("step")

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def consider(self, net: torch.nn.Module, step: int) -> None:
        """Evaluate `net` on val at generator step `step` (once a step); keep its weights if it is
        now the pick."""
        if self.candidates and self.candidates[-1]["step"] == step:
            return
        was = net.training
        net.eval()
        with torch.no_grad():
            figures = self.evaluate(net)
        net.train(was)
        self.candidates.append({"step": step, **figures})
        if pick_candidate(self.candidates) == len(self.candidates) - 1:
            self._kept = {"step": step, "state": copy.deepcopy(net.state_dict())}

    def keep(self, net: torch.nn.Module) -> int | None:
        """Load the pick's weights into `net`; its step (None before any candidate)."""
        if self._kept:
            net.load_state_dict(self._kept["state"])
        return self.kept_step

    def state_dict(self) -> dict:
        return {"candidates": self.candidates, "kept": self._kept}

    def load_state_dict(self, state: dict) -> None:
        self.candidates[:] = state["candidates"]
        self._kept = dict(state["kept"])


def on_val(prepared: Path, ddpm: torch.nn.Module, ckpt: dict, net: torch.nn.Module, *, settings: Infer, t: int,
           steps: int, seed: int, channels: int, feature_size: int, every: int, where="the DDPM") -> Selection:
    """The selection `train_gan_noise` runs: G judged every `every` steps by the maps infer@gan
    draws of the prepared val images (`settings`: infer's; `feature_size`: the extractor's input
    size, patchcore.image_size, for `infer.error: feature`; (t, steps): G's level, gan.t and
    gan.denoise_steps; `ckpt`: the DDPM's checkpoint dict, read from `where`)."""
    rows = data.load_rows(prepared, split="val", augmented=0)
    images = data.load_images(prepared, rows, channels)
    masks = data.load_masks(prepared, rows)
    anomalous = (rows["label"] == "anomalous").to_numpy()
    det = Detector.from_models(ddpm, ckpt, settings, NoiseModel(net, t, steps), where=where)
    if settings.error == "feature":  # G is judged by the very maps infer will make
        det.extractor = FeatureExtractor(feature_size).to(next(ddpm.parameters()).device)
    return Selection(ValMaps(det, images, anomalous, masks, seed), every)
