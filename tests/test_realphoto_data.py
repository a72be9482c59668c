"""experiments/data/realphoto_data.py: layout, exact masks, determinism, disjoint regions, reserved images."""

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BUILDERS = Path(__file__).resolve().parents[1] / "experiments" / "data"
sys.path.insert(0, str(BUILDERS))

import realphoto_data as rp  # noqa: E402

TINY = dict(tile=32, n_train=4, n_test_good=3, n_per_defect=2)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _locate(photo: np.ndarray, tile: np.ndarray) -> list[tuple[int, int]]:
    """Every (row, col) where `tile` occurs in `photo`."""
    k = 4
    windows = np.lib.stride_tricks.sliding_window_view(photo, (k, k), axis=(0, 1))
    hits = windows == (tile[:k, :k] if tile.ndim == 2 else np.moveaxis(tile[:k, :k], -1, 0))
    hits = hits.reshape(hits.shape[:2] + (-1,)).all(-1)
    s = tile.shape[0]
    return [(r, c) for r, c in zip(*np.nonzero(hits))
            if r + s <= photo.shape[0] and c + s <= photo.shape[1]
            and np.array_equal(photo[r:r + s, c:c + s], tile)]


def test_reserved_images_are_never_used():
    source = (BUILDERS / "realphoto_data.py").read_text()
    for name in ("brick", "grass", "gravel"):
        assert f"{name}(" not in source
        assert name not in source.lower()


@pytest.mark.parametrize("category", rp.CATEGORIES)
def test_photos_load(category):
    photo = rp.load_photo(category)
    assert photo.dtype == np.uint8 and photo.ndim in (2, 3) and min(photo.shape[:2]) >= 300
    assert photo.std() > 5  # not blank
    assert np.array_equal(photo, rp.load_photo(category))


@pytest.mark.parametrize("category", rp.CATEGORIES)
@pytest.mark.parametrize("tile", [32, 64, 96])
def test_regions_are_disjoint_with_a_gap(category, tile):
    shape = rp.load_photo(category).shape
    train, test = rp.regions(shape, tile, rp.SPLIT_AXIS[category])
    for r0, r1, c0, c1 in (train, test):
        assert 0 <= r0 and r1 <= shape[0] and 0 <= c0 and c1 <= shape[1]
        assert r1 - r0 >= tile and c1 - c0 >= tile
    rows_gap = max(test[0] - train[1], train[0] - test[1])
    cols_gap = max(test[2] - train[3], train[2] - test[3])
    assert max(rows_gap, cols_gap) >= tile  # separated along at least one axis by a tile width


def test_regions_reject_a_photo_too_small():
    with pytest.raises(ValueError):
        rp.regions((100, 150), 64)


def _clean_tiles():
    rng = np.random.default_rng(123)
    noise_rgb = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    smooth_grey = np.clip(np.add.outer(np.arange(48), np.arange(48)) * 2 + rng.integers(0, 20, (48, 48)),
                          0, 255).astype(np.uint8)
    tissue = rp.load_photo("tissue")[300:364, 400:464]
    moon = rp.load_photo("moon")[400:464, 200:264]  # textured: smooth/warp need texture to show
    return {"noise_rgb": noise_rgb, "smooth_grey": smooth_grey, "tissue": tissue, "moon": moon}


@pytest.mark.parametrize("family", rp.DEFECTS)
def test_make_defect_changes_only_inside_a_nonempty_mask(family):
    for name, clean in _clean_tiles().items():
        before = clean.copy()
        for draw in range(5):
            try:
                bad, mask = rp.make_defect(clean, family, np.random.default_rng([draw, 7]))
            except rp.DefectFailed:
                # visibility is relative to the texture: on uniform noise (std ~74 grey levels)
                # a thin or faint family may find no visible draw, nor may smooth or warp on a plain ramp;
                # the real photos always must
                assert name in ("noise_rgb", "smooth_grey"), (name, draw)
                continue
            assert np.array_equal(clean, before)  # input untouched
            assert bad.shape == clean.shape and bad.dtype == np.uint8, name
            assert mask.shape == clean.shape[:2] and mask.dtype == bool, name
            assert mask.sum() >= rp.MIN_PIXELS, (name, draw)
            outside = ~mask
            assert np.array_equal(bad[outside], clean[outside]), (name, draw)  # bit-identical
            changed = bad != clean
            changed = changed.any(-1) if changed.ndim == 3 else changed
            assert changed[mask].mean() >= 0.5, (name, draw)  # mostly changed inside


@pytest.mark.parametrize("family", rp.DEFECTS)
def test_make_defect_is_deterministic_and_varies(family):
    clean = _clean_tiles()["tissue"]
    a, ma = rp.make_defect(clean, family, np.random.default_rng(5))
    b, mb = rp.make_defect(clean, family, np.random.default_rng(5))
    c, mc = rp.make_defect(clean, family, np.random.default_rng(6))
    assert np.array_equal(a, b) and np.array_equal(ma, mb)
    assert not (np.array_equal(a, c) and np.array_equal(ma, mc))


@pytest.mark.parametrize("family", ["smooth", "warp"])
def test_make_defect_gives_up_on_a_flat_tile(family):
    # nothing to blur or displace: no invisible defect with a mask is ever returned
    with pytest.raises(rp.DefectFailed):
        rp.make_defect(np.full((32, 32, 3), 128, np.uint8), family, np.random.default_rng(0), tries=5)


def test_make_defect_rejects_unknown_family():
    with pytest.raises(KeyError):
        rp.make_defect(np.zeros((32, 32), np.uint8), "nope", np.random.default_rng(0))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    for root in (a, b):
        for category in ("moon", "tissue"):
            assert rp.build_category(category, root, seed=3, **TINY) == root / category
    return a, b


def test_layout_counts_and_masks(built):
    root = built[0]
    assert sorted(p.name for p in root.iterdir()) == ["moon", "tissue"]  # no partial folders left
    for category in ("moon", "tissue"):
        base = root / category
        assert len(list((base / "train" / "good").glob("*.png"))) == TINY["n_train"]
        assert sorted(p.name for p in (base / "test").iterdir()) == sorted(("good",) + rp.DEFECTS)
        assert sorted(p.name for p in (base / "ground_truth").iterdir()) == sorted(rp.DEFECTS)
        assert len(list((base / "test" / "good").glob("*.png"))) == TINY["n_test_good"]
        for defect in rp.DEFECTS:
            images = sorted((base / "test" / defect).glob("*.png"))
            assert [p.name for p in images] == [f"{i:04d}.png" for i in range(TINY["n_per_defect"])]
            for p in images:
                img = np.asarray(Image.open(p))
                mask = np.asarray(Image.open(base / "ground_truth" / defect / f"{p.stem}_mask.png"))
                assert img.shape[:2] == (TINY["tile"],) * 2 and img.dtype == np.uint8
                assert mask.shape == img.shape[:2] and mask.dtype == np.uint8
                assert set(np.unique(mask)) <= {0, 255} and (mask == 255).sum() >= rp.MIN_PIXELS


def test_same_arguments_same_bytes(built):
    a, b = built
    for category in ("moon", "tissue"):
        files_a, files_b = _files(a / category), _files(b / category)
        assert len(files_a) == TINY["n_train"] + TINY["n_test_good"] + 2 * 7 * TINY["n_per_defect"]
        assert files_a == files_b


def test_tiles_come_from_their_own_region(built):
    root = built[0]
    for category in ("moon", "tissue"):
        photo = rp.load_photo(category)
        boxes = dict(zip(("train", "test"), rp.regions(photo.shape, TINY["tile"], rp.SPLIT_AXIS[category])))
        for split in ("train", "test"):
            r0, r1, c0, c1 = boxes[split]
            for p in sorted((root / category / split / "good").glob("*.png")):
                found = _locate(photo, np.asarray(Image.open(p)))
                assert found, p
                t = TINY["tile"]
                for r, c in found:
                    assert r0 <= r <= r1 - t and c0 <= c <= c1 - t, (p, r, c)


def test_rebuild_overwrites_and_seed_changes_output(tmp_path, built):
    rp.build_category("moon", tmp_path, seed=3, **{**TINY, "n_train": 6})
    rp.build_category("moon", tmp_path, seed=3, **TINY)  # fewer tiles: old ones must be gone
    assert _files(tmp_path / "moon") == _files(built[0] / "moon")
    rp.build_category("moon", tmp_path, seed=4, **TINY)
    assert _files(tmp_path / "moon") != _files(built[0] / "moon")
    assert [p.name for p in tmp_path.iterdir()] == ["moon"]


def test_script_with_preview(tmp_path):
    rp.main([str(tmp_path), "--categories", "moon", "--tile", "32", "--n-train", "2",
             "--n-test-good", "2", "--n-per-defect", "2", "--preview"])
    assert (tmp_path / "moon" / "ground_truth" / "hair" / "0001_mask.png").is_file()
    with Image.open(tmp_path / "moon_preview.png") as img:
        assert img.size[0] > 100 and img.size[1] > 100
