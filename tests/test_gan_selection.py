"""Exact expectations for anodiff.gan_selection: the candidate rule, the val figures, the val maps a
candidate is judged by, and the Selection that keeps the pick's weights."""

import numpy as np
import pytest
import torch

from anodiff import metrics, runtime
from anodiff.calibration_choice import choose
from anodiff.detector import NoiseModel
from anodiff.errors import DataError
from anodiff.gan_selection import (OTHER_LEVELS_OFFSET, OWN_LEVEL_OFFSET, Selection, ValMaps, pick_candidate,
                                   val_figures)
from anodiff.noisegen import NoiseGenerator
from conftest import infer_settings
from test_anomaly import _detector, _images
from test_calibration import _val_set


# ---------------------------------------------------------------------- the candidate rule
def test_pick_candidate_rules():
    row = lambda m, i: {"map_criterion": m, "image_auroc": i}  # noqa: E731
    assert pick_candidate([row(0.5, 0.5)]) == 0
    assert pick_candidate([row(0.5, 0.5), row(0.6, 0.5), row(0.6, 0.5)]) == 1  # first of equals
    assert pick_candidate([row(0.5, 0.5), row(0.9, 0.49)]) == 0  # worse image AUROC: never
    assert pick_candidate([row(0.5, 0.5), row(0.5, 0.5)]) == 0  # no gain: the start
    assert pick_candidate([row(0.5, None), row(0.7, None)]) == 1  # no image figure: maps decide
    # a gain val cannot resolve does not replace the start: the mean must beat it by more than
    # half the start's image-AUROC standard error
    noisy = {"map_criterion": 0.5, "image_auroc": 0.5, "image_auroc_se": 0.1}
    assert pick_candidate([noisy, row(0.52, 0.56)]) == 0  # mean gain 0.04 <= 0.05
    assert pick_candidate([noisy, row(0.52, 0.56), row(0.52, 0.60)]) == 2  # 0.06 > 0.05
    with pytest.raises(ValueError):
        pick_candidate([])


# ---------------------------------------------------------------------- the val figures
def test_val_figures_are_those_of_the_chosen_calibrations_with_the_standard_error():
    """The GAN's model selection judges a candidate by the figures `infer` would choose by."""
    raw, normal, labels, masks = _val_set(0.005)
    choice = choose(raw, normal, labels, masks)
    fig = val_figures(raw, normal, labels, masks)
    assert (fig["map_calibration"], fig["score_calibration"]) == (choice["map"], choice["score"])
    assert fig["map_criterion"] == choice["table"][choice["map"]]["map_criterion"]
    assert fig["image_auroc"] == choice["table"][choice["score"]]["image_auroc"] == 1.0
    assert fig["image_auroc_se"] == 0.0  # a perfect AUROC has no spread
    # judged on every anomalous val image and the half of the normal ones not fitted on
    n_judged_normal = int(normal.sum()) - len(range(0, int(normal.sum()), 2))
    noisy = val_figures(raw, normal, labels, masks, candidates=("none",))
    assert noisy["map_calibration"] == noisy["score_calibration"] == "none"
    assert noisy["image_auroc_se"] == pytest.approx(
        metrics.auroc_standard_error(noisy["image_auroc"], int(labels.sum()), n_judged_normal))


# ---------------------------------------------------------------------- the val maps
def _val_images():
    x = _images(n=8, seed=3)
    anomalous = np.r_[np.zeros(4, bool), np.ones(4, bool)]
    x[4:, :, 2:5, 3:6] = 0.9  # a bright patch on each anomalous image
    masks = np.zeros((8, 8, 8), bool)
    masks[4:, 2:5, 3:6] = True
    return x, anomalous, masks


def _gan_detector(net, normalize="pixel"):
    settings = infer_settings(t_start=(3, 6), steps=(1, 2), guidance=(0.0, 2.0), n_seeds=2,
                              normalize=normalize, batch_size=3)
    det = _detector(settings=settings)
    det.noise_model = NoiseModel(net, 3, 1)
    return det


def _nets():
    torch.manual_seed(0)
    start = NoiseGenerator(3, 4, 1, residual=True)  # adds no correction: the ddpm method
    corrects = NoiseGenerator(3, 4, 1, residual=True)
    with torch.no_grad():
        corrects.conv_out.bias.fill_(0.5)
    return start, corrects


def test_val_maps_are_infers_maps_with_gs_level_redrawn_from_one_stream_per_call():
    """G's level is drawn anew at each call, from the same stream (candidates differ by G alone);
    the levels G leaves alone are drawn once, from their own stream; the detector is left as it was."""
    start, corrects = _nets()
    det = _gan_detector(start)
    x, anomalous, masks = _val_images()
    judge = ValMaps(det, x, anomalous, masks, seed=7)
    own = det.raw_maps(x, runtime.seeded(7, OWN_LEVEL_OFFSET), progress=False, only=[3])[0]
    other = det.raw_maps(x, runtime.seeded(7, OTHER_LEVELS_OFFSET), progress=False, only=[6])[0]
    expected = val_figures(torch.cat([own, other], dim=1), ~anomalous, anomalous.astype(int), masks, ("pixel",))
    assert judge(start) == expected
    assert judge(start) == expected  # the same noise at every call
    changed = judge(corrects)
    corrected = det.with_noise_net(corrects).raw_maps(x, runtime.seeded(7, OWN_LEVEL_OFFSET), progress=False,
                                                       only=[3])[0]
    assert changed == val_figures(torch.cat([corrected, other], dim=1), ~anomalous, anomalous.astype(int), masks,
                                  ("pixel",))
    assert det.noise_model.net is start  # judging a candidate does not touch the detector
    assert judge.describe() == "8 val images (4 anomalous), levels [3, 6], G's level t=3"


def test_val_maps_need_a_noise_model_and_enough_normal_val_images():
    start, _ = _nets()
    x, anomalous, masks = _val_images()
    with pytest.raises(ValueError, match="noise model"):
        ValMaps(_detector(), x, anomalous, masks, seed=0)
    few = np.r_[np.zeros(3, bool), np.ones(5, bool)]
    with pytest.raises(DataError, match=r"split val has 3 normal image\(s\)"):
        ValMaps(_gan_detector(start, normalize="auto"), x, few, masks, seed=0)


# ---------------------------------------------------------------------- the Selection
def test_selection_evaluates_once_a_step_in_eval_mode_without_gradients_and_keeps_the_picks_weights():
    net = torch.nn.Linear(2, 2)
    net.train()
    figures = iter([(0.5, 0.5), (0.9, 0.9), (0.6, 0.6)])
    seen = []

    def evaluate(g):
        seen.append((g.training, torch.is_grad_enabled()))
        m, i = next(figures)
        return {"map_criterion": m, "image_auroc": i}

    selection = Selection(evaluate, every=2)
    assert [selection.due(s) for s in range(5)] == [True, False, True, False, True]
    assert not Selection(evaluate, every=0).due(4)
    assert selection.kept_step is None and selection.keep(net) is None  # nothing to keep yet
    selection.consider(net, 0)
    selection.consider(net, 0)  # once a step
    with torch.no_grad():
        net.weight.fill_(1.0)
    selection.consider(net, 2)  # the pick: its weights are kept
    best = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.weight.fill_(2.0)
    selection.consider(net, 4)
    assert seen == [(False, False)] * 3 and net.training  # eval mode, no gradients, then back
    assert [c["step"] for c in selection.candidates] == [0, 2, 4] and selection.kept_step == 2
    restored = Selection(evaluate, every=2)
    restored.load_state_dict(selection.state_dict())  # what a snapshot carries
    assert restored.candidates == selection.candidates and restored.kept_step == 2
    assert restored.keep(net) == 2
    assert all(torch.equal(v, best[k]) for k, v in net.state_dict().items())
