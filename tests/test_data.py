"""prepare: layouts read from tiny folders, splits without leakage, contamination, bad input."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import repo_params
from PIL import Image

from anodiff import data, io, layouts
from anodiff.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16


def params(source, layout="auto", **data_kw):
    return repo_params(seed=0, data={"source": str(source), "layout": layout, "image_size": SIZE,
                                     "contamination": 0.1, **data_kw})


def noise_png(path, size=32, seed=0, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(60, 200, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)


def square_mask(path, size=32):
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((size, size), np.uint8)
    m[8:24, 8:24] = 255
    Image.fromarray(m).save(path)


def make_mvtec(root):
    good = root / "train" / "good"
    for i in range(3):
        noise_png(good / f"{i:03d}.png", seed=i)
    Image.fromarray(np.full((32, 32), 100, np.uint8), "L").save(good / "003.png")  # grayscale
    Image.fromarray(np.full((32, 32), 32768, np.uint16)).save(good / "004.png")  # 16-bit
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 200, 0  # fully transparent: composited on black
    Image.fromarray(rgba, "RGBA").save(good / "005.png")
    for i in range(4):
        noise_png(root / "test" / "good" / f"{i:03d}.png", seed=10 + i)
    for defect, n in (("crack", 4), ("hole", 3)):
        for i in range(n):
            noise_png(root / "test" / defect / f"{i:03d}.png", seed=20 + i)
            square_mask(root / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


def make_marble(root, n_anomalous=4):
    for part, n in (("train", 4), ("test", 2)):
        for cls in ("good", "crack", "dot", "joint"):
            for i in range(n if cls in ("good", "joint") or part == "test" else n_anomalous):
                noise_png(root / part / cls / f"{cls}{i}.jpg", seed=i)
    return root


def make_folder(root, masks=True):
    for i in range(8):
        noise_png(root / "normal" / f"n{i}.png", seed=i)
    for i in range(6):
        noise_png(root / "anomalous" / f"a{i}.png", seed=50 + i)
        if masks:
            square_mask(root / "masks" / f"a{i}_mask.png")
    return root


def run(p, out):
    with io.atomic_dir(out) as tmp:
        return data.prepare(tmp, data_cfg=p.data, synth_cfg=p.synth, seed=p.seed)


def counts(m, **kw):
    keep = np.ones(len(m), bool)
    for k, v in kw.items():
        keep &= (m[k] == v).to_numpy()
    return int(keep.sum())


def assert_no_leakage(m):
    originals = m[m.augmented == 0]
    assert originals.source.is_unique  # every file lands in exactly one split
    trained = set(m[m.split == "train"].source)
    evaluated = set(m[m.split != "train"].source)
    assert not trained & evaluated


# ---------------------------------------------------------------- layouts
def test_mvtec_layout(tmp_path):
    src = make_mvtec(tmp_path / "mvtec")
    out = tmp_path / "prepared"
    m = run(params(src), out)
    assert list(m.columns) == data.COLUMNS
    assert counts(m, split="train", label="normal") == 6
    # crack: 4 -> 1 train (0.3), 3 held out -> 1 val (0.25), 2 test; hole: 3 -> 1, 1, 1
    assert counts(m, split="train", defect="crack") == 1 and counts(m, split="val", defect="crack") == 1
    assert counts(m, split="test", defect="crack") == 2
    assert [counts(m, split=s, defect="hole") for s in ("train", "val", "test")] == [1, 1, 1]
    assert counts(m, split="val", defect="good") == 1 and counts(m, split="test", defect="good") == 3
    assert_no_leakage(m)
    anomalous = m[m.label == "anomalous"]
    assert (anomalous["mask"] != "").all() and (m[m.label == "normal"]["mask"] == "").all()
    mask = io.read_mask(out / anomalous["mask"].iloc[0], SIZE)
    expected = np.zeros((SIZE, SIZE), np.uint8)
    expected[4:12, 4:12] = 1
    np.testing.assert_array_equal(mask, expected)
    for path in m.path:
        assert np.asarray(Image.open(out / path)).shape == (SIZE, SIZE, 3)
    # mode conversions: grayscale, 16-bit and RGBA all became RGB of the expected value
    by_source = {Path(s).name: p for s, p in zip(m.source, m.path) if "train/good" in s}
    gray = np.asarray(Image.open(out / by_source["003.png"]))
    assert (gray == 100).all()
    assert (np.asarray(Image.open(out / by_source["004.png"])) == 128).all()  # 32768 / 65535 * 255
    assert (np.asarray(Image.open(out / by_source["005.png"])) == 0).all()


def test_mvtec_one_channel(tmp_path):
    src = make_mvtec(tmp_path / "mvtec")
    m = run(params(src, channels=1), tmp_path / "out")
    images = data.load_images(tmp_path / "out", m, channels=1)
    assert images.shape == (len(m), 1, SIZE, SIZE)


def test_marble_layout(tmp_path):
    src = make_marble(tmp_path / "marble")
    m = run(params(src, augment={"balance": False}), tmp_path / "out")
    assert "joint" not in set(m.defect)  # not in marble_normal nor marble_anomalous
    assert (m["mask"] == "").all()
    # each train class of 4: 1 val, 3 train; test: 2 each
    for cls, label in (("good", "normal"), ("crack", "anomalous"), ("dot", "anomalous")):
        assert counts(m, split="val", defect=cls, label=label) == 1
        assert counts(m, split="train", defect=cls, label=label) == 3
        assert counts(m, split="test", defect=cls, label=label) == 2
    assert_no_leakage(m)
    assert data.load_masks(tmp_path / "out", m) is None


def test_marble_classes_are_params(tmp_path):
    src = make_marble(tmp_path / "marble")
    m = run(params(src, marble_normal=["good", "joint"], marble_anomalous=["crack"],
                   augment={"balance": False}), tmp_path / "out")
    assert set(m[m.label == "normal"].defect) == {"good", "joint"}
    assert set(m[m.label == "anomalous"].defect) == {"crack"}


def test_folder_layout_with_masks(tmp_path):
    src = make_folder(tmp_path / "folder")
    out = tmp_path / "out"
    m = run(params(src), out)
    # normals 8: 2 val, 2 test, 4 train; anomalous 6: 2 train, 4 held out -> 1 val, 3 test
    assert [counts(m, split=s, label="normal") for s in ("train", "val", "test")] == [4, 2, 2]
    assert [counts(m, split=s, label="anomalous") for s in ("train", "val", "test")] == [2, 1, 3]
    assert (m[m.label == "anomalous"]["mask"] != "").all()
    assert_no_leakage(m)
    test_rows = data.load_rows(out, split="test")
    masks = data.load_masks(out, test_rows)
    assert masks.shape == (5, SIZE, SIZE)
    assert [int(x.sum()) for x in masks] == [0, 0, 64, 64, 64]  # normals first, then 8x8 squares
    images = data.load_images(out, test_rows, channels=3)
    assert images.shape == (5, 3, SIZE, SIZE) and -1 <= images.min() and images.max() <= 1
    assert len(data.load_rows(out, split="test", label="anomalous")) == 3


def test_folder_mask_matching_is_by_whole_stem(tmp_path):
    masks = [Path("m/img1_mask.png"), Path("m/img10_mask.png"), Path("m/img2.png")]
    assert layouts._mask_for(Path("a/img1.png"), masks) == [Path("m/img1_mask.png")]
    assert layouts._mask_for(Path("a/img2.jpg"), masks) == [Path("m/img2.png")]
    assert layouts._mask_for(Path("a/img3.png"), masks) == []


def test_auto_recognises_each_layout(tmp_path):
    assert layouts.detect_layout(make_mvtec(tmp_path / "a")) == "mvtec"
    assert layouts.detect_layout(make_marble(tmp_path / "b")) == "marble"
    assert layouts.detect_layout(make_folder(tmp_path / "c")) == "folder"
    (tmp_path / "d" / "pictures").mkdir(parents=True)
    with pytest.raises(DataError, match=r"d: cannot recognise the layout.*subfolders pictures.*expected"):
        layouts.detect_layout(tmp_path / "d")


def test_splits_are_deterministic_from_seed(tmp_path):
    src = make_folder(tmp_path / "folder")
    a = run(params(src), tmp_path / "a")
    b = run(params(src), tmp_path / "b")
    assert a.equals(b)
    c = run(repo_params(seed=5, data={"source": str(src), "image_size": SIZE}), tmp_path / "c")
    assert not a.equals(c)


# ---------------------------------------------------------------- contamination and augmentation
def test_contamination_count():
    assert data.contamination_count(90, 0.1) == 10
    assert data.contamination_count(160, 0.1) == 18  # 18/178 = 0.1011 beats 17/177 = 0.0960
    assert data.contamination_count(100, 0.0) == 0
    assert data.contamination_count(60, 0.2) == 15


def synthetic(**synth_kw):
    base = dict(n_train_normal=90, n_train_anomalous=12, n_val_normal=2, n_val_anomalous=2,
                n_test_normal=2, n_test_anomalous=2)
    return repo_params(seed=1, data={"image_size": SIZE, "contamination": 0.1}, synth=base | synth_kw)


def test_synthetic_contamination_is_exact(tmp_path):
    m = run(synthetic(), tmp_path / "out")
    ddpm = m[m.ddpm_train == 1]
    assert counts(ddpm, label="normal") == 90 and counts(ddpm, label="anomalous") == 10
    assert set(ddpm.split) == {"train"} and m.augmented.sum() == 0
    assert (m[(m.label == "anomalous")]["mask"] != "").all()
    assert set(m.source) == {"synthetic"}
    assert len(data.load_rows(tmp_path / "out", ddpm_train=1, label="anomalous")) == 10
    assert len(data.load_rows(tmp_path / "out", split=["val", "test"])) == 8
    again = run(synthetic(), tmp_path / "again")
    assert m.equals(again)
    for p in m.path:
        assert (tmp_path / "out" / p).read_bytes() == (tmp_path / "again" / p).read_bytes()


def test_contamination_needs_a_big_enough_pool(tmp_path):
    with pytest.raises(DataError, match=r"data\.contamination: 0\.1 needs 10 .* only 4"):
        run(synthetic(n_train_anomalous=4), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_balance_adds_augmented_normals(tmp_path):
    src = make_marble(tmp_path / "marble", n_anomalous=8)  # train: 3 good vs 6 + 6 anomalous
    m = run(params(src), tmp_path / "out")
    train = m[m.split == "train"]
    assert counts(train, label="normal") == counts(train, label="anomalous") == 12
    aug = train[train.augmented == 1]
    assert len(aug) == 9 and (aug.ddpm_train == 0).all() and set(aug.label) == {"normal"}
    assert_no_leakage(m)


def test_augment_ops():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    flipped = data.augment(img, np.random.default_rng(0), flip_p=1.0, rot90=False, brightness=(1.0, 1.0))
    np.testing.assert_array_equal(flipped, img[::-1, ::-1])
    out = data.augment(np.full((2, 2, 3), 100, np.uint8), np.random.default_rng(0), flip_p=0.0, rot90=False,
                       brightness=(3.0, 3.0))
    assert (out == 255).all()  # clipped, not wrapped


# ---------------------------------------------------------------- bad input
def existing_out(tmp_path):
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "manifest.csv").write_text("old\n")
    return out


def assert_untouched(out):
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".prepared")) == []
    assert [p.name for p in out.iterdir()] == ["manifest.csv"]
    assert (out / "manifest.csv").read_text() == "old\n"


def break_mvtec(src):
    """Five different bad files; returns their paths."""
    zero = src / "train" / "good" / "000.png"
    zero.write_bytes(b"")
    truncated = src / "test" / "good" / "001.png"
    truncated.write_bytes(truncated.read_bytes()[:200])
    text = src / "test" / "crack" / "notes.txt"
    text.write_text("not an image")
    fake = src / "test" / "hole" / "002.png"
    fake.write_text("not an image either")
    wrong_size = src / "ground_truth" / "crack" / "001_mask.png"
    square_mask(wrong_size, size=20)
    no_mask = src / "test" / "hole" / "001.png"
    (src / "ground_truth" / "hole" / "001_mask.png").unlink()
    return [zero, truncated, text, fake, wrong_size, no_mask]


def test_bad_files_are_all_named_in_one_error(tmp_path):
    src = make_mvtec(tmp_path / "mvtec")
    bad = break_mvtec(src)
    out = existing_out(tmp_path)
    with pytest.raises(DataError) as err:
        run(params(src), out)
    msg = str(err.value)
    assert msg.startswith("6 problem(s)")
    for path in bad:
        assert str(path) in msg
    assert "empty file (0 bytes)" in msg and "cannot be decoded" in msg and "not an image file" in msg
    assert "mask is 20x20 px but its image" in msg and "has no mask" in msg
    assert_untouched(out)


def test_missing_and_empty_folders(tmp_path):
    src = make_mvtec(tmp_path / "mvtec")
    for f in (src / "test" / "hole").iterdir():
        f.unlink()
    for f in (src / "train" / "good").iterdir():
        f.unlink()
    (src / "train" / "good").rmdir()
    out = existing_out(tmp_path)
    with pytest.raises(DataError) as err:
        run(params(src, layout="mvtec"), out)
    msg = str(err.value)
    assert f"{src / 'train' / 'good'}: missing folder" in msg
    assert f"{src / 'test' / 'hole'}: empty folder: no images" in msg
    assert_untouched(out)


@pytest.mark.parametrize("layout", ["auto", "folder"])
def test_missing_source_folder(tmp_path, layout):
    out = existing_out(tmp_path)
    with pytest.raises(DataError, match=f"data.source: {tmp_path / 'nowhere'}: folder not found"):
        run(params(tmp_path / "nowhere", layout=layout), out)
    assert_untouched(out)


def test_unrecognised_layout_leaves_out_untouched(tmp_path):
    (tmp_path / "photos" / "misc").mkdir(parents=True)
    out = existing_out(tmp_path)
    with pytest.raises(DataError, match="cannot recognise the layout"):
        run(params(tmp_path / "photos"), out)
    assert_untouched(out)


def test_folder_anomalous_without_mask(tmp_path):
    src = make_folder(tmp_path / "folder")
    (src / "masks" / "a3_mask.png").unlink()
    with pytest.raises(DataError, match=r"a3\.png: no mask in"):
        run(params(src), tmp_path / "out")


def test_skip_bad_files_skips_and_warns(tmp_path, capsys):
    src = make_mvtec(tmp_path / "mvtec")
    bad = break_mvtec(src)
    m = run(params(src, skip_bad_files=True, contamination=0.0), tmp_path / "out")
    err = capsys.readouterr().err
    assert "warning: skipped 6 bad file(s)" in err
    for path in bad:
        assert str(path) in err
    kept = set(m.source)
    assert not kept & {str(p) for p in bad}
    assert str(src / "test" / "crack" / "001.png") not in kept  # its mask had the wrong size
    assert counts(m, split="train", label="normal") == 5


def test_skip_bad_files_does_not_skip_missing_folders(tmp_path):
    src = make_folder(tmp_path / "folder")
    for f in (src / "normal").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="normal: empty folder"):
        run(params(src, skip_bad_files=True), tmp_path / "out")
    # an empty (or absent) anomalous/ is no fault: a normal-only source (tests/test_normal_only.py)


def test_stage_exits_2_naming_the_files(tmp_path):
    src = make_mvtec(tmp_path / "mvtec")
    bad = break_mvtec(src)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].update(source=str(src), image_size=SIZE)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    res = subprocess.run([sys.executable, str(ROOT / "stages" / "prepare.py")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.startswith("error: 6 problem(s)")
    for path in bad:
        assert str(path) in res.stderr


def test_photographs_larger_than_image_size_are_kept_at_the_extractors_size(tmp_path):
    """32-px sources, image_size 16: the pretrained features get each image at 32 (read again from
    its file), beside the 16-px one; augmented copies (the GAN's only) get none."""
    p = params(make_folder(tmp_path / "src"))
    with io.atomic_dir(tmp_path / "out") as tmp:
        m = data.prepare(tmp, data_cfg=p.data, synth_cfg=p.synth, seed=p.seed, feature_size=32)
    assert data.FEATURES_PATH in m
    m = data.load_rows(tmp_path / "out")  # as the later stages read it
    real = m[m["augmented"] == 0]
    assert (real[data.FEATURES_PATH] != "").all()
    row = real.iloc[0]
    assert io.image_size_of(tmp_path / "out" / row["path"]) == (SIZE, SIZE)
    assert io.image_size_of(tmp_path / "out" / row[data.FEATURES_PATH]) == (32, 32)
    assert np.array_equal(io.load_image_uint8(tmp_path / "out" / row[data.FEATURES_PATH], 32, 3),
                          io.load_image_uint8(row["source"], 32, 3))
    images, column = data.load_feature_images(tmp_path / "out", real, 3)
    assert column == data.FEATURES_PATH and images.shape[-1] == 32


def test_no_extractor_copies_where_the_sources_are_not_larger(tmp_path):
    p = params(make_folder(tmp_path / "src"), image_size=32)
    with io.atomic_dir(tmp_path / "out") as tmp:
        m = data.prepare(tmp, data_cfg=p.data, synth_cfg=p.synth, seed=p.seed, feature_size=64)
    assert data.FEATURES_PATH not in m and not (tmp_path / "out" / "features").exists()
    images, column = data.load_feature_images(tmp_path / "out", m, 3)
    assert column == "path" and images.shape[-1] == 32
