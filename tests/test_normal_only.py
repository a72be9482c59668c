"""Normal-only data, as most users first have it: a folder of good images and nothing else, taken
through the whole tiny pipeline (`dvc repro`) and then `anodiff predict` on new images."""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from anodiff import data, layouts
from anodiff.config import Augment
from anodiff.errors import DataError


def _texture(rng, size=(40, 36)):
    """A smooth random texture (the same family for every image): a normal surface."""
    base = rng.normal(size=(size[1] // 4 + 1, size[0] // 4 + 1, 3))
    big = np.kron(base, np.ones((4, 4, 1)))[:size[1], :size[0]]
    return np.clip(128 + 30 * big + rng.normal(0, 4, big.shape), 0, 255).astype(np.uint8)


def normal_folder(root, n=24, seed=0):
    rng = np.random.default_rng(seed)
    (root / "normal").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(_texture(rng)).save(root / "normal" / f"good_{i:03d}.png")
    return root


def test_folder_layout_takes_normal_images_alone(tmp_path):
    root = normal_folder(tmp_path / "src", n=20)
    records, problems = layouts.read_folder(root, 0, val_fraction=0.25, train_anomalous_fraction=0.3)
    assert not problems
    assert {r.label for r in records} == {"normal"}
    assert {r.split for r in records} == {"train", "val", "test"}
    (root / "anomalous").mkdir()  # an empty anomalous/ is the same
    assert layouts.read_folder(root, 0, val_fraction=0.25, train_anomalous_fraction=0.3)[0] == records


def test_contamination_is_ignored_with_a_note_when_there_is_nothing_to_mix_in():
    items = [dict(split="train", label="normal", name=f"n{i}", image=np.zeros((4, 4, 3), np.uint8), mask=None)
             for i in range(10)]
    notes = []
    out = data._mix_and_balance(items, 0, contamination=0.1, aug=Augment(balance=True, flip_p=0.5, rot90=True,
                                brightness=(0.9, 1.1)), synthetic=False, warn=notes.append)
    assert all(it["ddpm_train"] == 1 for it in out) and len(out) == 10
    assert len(notes) == 1 and "data.contamination" in notes[0]


def test_too_few_normal_images_for_val_names_the_split_and_the_count(tmp_path):
    from tinyrepo import ROOT

    from anodiff.config import load_params

    root = normal_folder(tmp_path / "src", n=6)
    p = load_params(ROOT / "params.yaml")
    cfg = p.data.model_copy(update={"source": str(root), "layout": "folder"})
    with pytest.raises(DataError, match=r"val split.*6 normal images give 2"):
        data.read_source(cfg, p.synth, 0)


def test_normal_only_folder_through_the_whole_tiny_pipeline(tmp_path):
    """`dvc repro` succeeds on a folder of normal images: the GAN is skipped with a record, every
    declared output is written, thresholds come from the normal val images, and figures that need
    anomalies are null with the reason."""
    from tinyrepo import make, sh

    src = normal_folder(tmp_path / "good_parts", n=24)
    d = make(tmp_path / "repo", skip=("bench/", "experiments/"), extra={"data": {"source": str(src)}})
    res = sh("dvc", "repro", cwd=d)
    log = res.stdout + res.stderr
    assert "train_gan_noise: skipped" in log and "data.contamination: 0.1 ignored" in log
    gan = json.loads((d / "metrics/gan.json").read_text())
    assert gan["skipped"] and gan["image_auroc"] is None
    for method in ("ddpm", "rddpm", "patchcore"):
        m = json.loads((d / f"metrics/{method}.json").read_text())
        assert m["image_auroc"] is None and m["pixel_auroc"] is None
        assert m["not_computable"] == {"pixel": "no anomalous test image", "image": "no anomalous test image"}
        thr = m["thresholds"]
        assert thr["image"] is not None and thr["pixel"] is not None and "normal_quantile" in thr["rule"]
        for name in ("roc.csv", "image_roc.csv", "image_predictions.csv", "scores.png", "overlays.png"):
            assert (d / f"plots/{method}/{name}").is_file()
    infer = json.loads((d / "metrics/infer_ddpm.json").read_text())
    assert infer["chosen_by"].startswith("default") and infer["map_calibration"] == "texture+memory"
    assert "skipped" in (d / "metrics/summary.md").read_text()
    assert sh("dvc", "status", cwd=d).stdout.strip().endswith("up to date.")
    # then the README's next step: score new images with what was trained, from another folder
    new = tmp_path / "new_parts"
    new.mkdir()
    rng = np.random.default_rng(7)
    Image.fromarray(_texture(rng, size=(52, 44))).save(new / "part_a.png")
    odd = _texture(rng, size=(52, 44))
    odd[10:20, 10:30] = 255  # a bright scratch
    Image.fromarray(odd).save(new / "part_b.png")
    out = tmp_path / "scored"
    res = sh(sys.executable, "-m", "anodiff", "predict", "--project", str(d), "--method", "ddpm", str(new),
             "--out", str(out), cwd=tmp_path)
    table = pd.read_csv(out / "predictions.csv")
    assert len(table) == 2 and table["threshold"].notna().all()
    for row in table.itertuples():
        amap = np.load(out / row.map)
        assert amap.shape == (44, 52) and amap.dtype == np.float32  # the image's own size
        mask = np.asarray(Image.open(out / row.mask))
        assert mask.shape == (44, 52) and set(np.unique(mask)) <= {0, 255}
    skipped = sh(sys.executable, "-m", "anodiff", "predict", "--project", str(d), "--method", "gan", str(new),
                 "--out", str(tmp_path / "gan_out"), cwd=tmp_path, check=False)
    assert skipped.returncode == 2 and "skipped gan" in skipped.stderr and "Traceback" not in skipped.stderr
