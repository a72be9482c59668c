"""The real-photo benchmark's bookkeeping (bench/realphoto.py): the mean over seeds, the spread,
the per-defect figures and the table. Running it (DVC per category) is a benchmark, not a test."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import realphoto  # noqa: E402


def _metrics(pix, img, per):
    keys = dict.fromkeys(realphoto.KEYS, 0.5)
    keys.update(pixel_auroc=pix, aupro=None if pix is None else pix - 0.1, image_auroc=img, n_test_images=10)
    keys["per_defect"] = {d: dict(keys, pixel_auroc=v) for d, v in per.items()}
    return keys


def test_summarise_means_spreads_and_keeps_each_seed():
    a = _metrics(0.9, 0.8, {"hole": 0.7, "stain": 0.95})
    b = _metrics(0.8, 0.6, {"hole": 0.9, "stain": 0.85})
    out = realphoto.summarise([a, b])
    assert out["pixel_auroc"] == pytest.approx(0.85)
    assert out["image_auroc"] == pytest.approx(0.7)
    assert out["spread"]["pixel_auroc"] == pytest.approx([0.8, 0.9])
    assert out["per_defect"]["hole"]["pixel_auroc"] == pytest.approx(0.8)
    assert out["per_seed"] == [a, b] and out["n_test_images"] == 10


def test_summarise_keeps_null_pixel_metrics_null():
    a = _metrics(None, 0.8, {})
    a["aupro"] = None
    out = realphoto.summarise([a, a])
    assert out["pixel_auroc"] is None and out["spread"]["pixel_auroc"] is None
    assert out["image_auroc"] == pytest.approx(0.8)


def test_table_names_the_worst_defect_family():
    results = {"moon": {"ddpm": realphoto.summarise([_metrics(0.9, 0.8, {"hole": 0.7, "stain": 0.95})])}}
    row = realphoto.table(results).iloc[0]
    assert (row["category"], row["method"], row["worst_defect"]) == ("moon", "ddpm", "hole")
    assert row["worst_defect_pixel_auroc"] == pytest.approx(0.7)
