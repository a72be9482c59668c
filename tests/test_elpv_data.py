"""experiments/data/elpv_data.py on a fake, tiny ELPV data folder: only mono cells of probability 0 or 1 are
copied, the other cell type is never opened, the seeded sample, the folder layout, the bytes.
Needs neither the elpv_dataset package nor the network."""

import builtins
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BUILDERS = Path(__file__).resolve().parents[1] / "experiments" / "data"
sys.path.insert(0, str(BUILDERS))

import elpv_data  # noqa: E402
from anodiff.layouts import read_layout  # noqa: E402

# (name, probability, type): 12 mono normal, 5 mono anomalous, 3 uncertain mono, 4 of the reserved type
MONO_NORMAL = [f"cell{i:04d}.png" for i in range(1, 13)]
MONO_ANOMALOUS = [f"cell{i:04d}.png" for i in range(13, 18)]
MONO_UNCERTAIN = [("cell0018.png", "0.3333333333333333"), ("cell0019.png", "0.6666666666666666"),
                  ("cell0020.png", "0.3333333333333333")]
RESERVED = [("cell0021.png", "1.0"), ("cell0022.png", "0.0"), ("cell0023.png", "1.0"), ("cell0024.png", "0.0")]
OTHER_TYPE = "poly"  # the reserved cell type: its rows must change nothing and its files never be opened


def _png(path: Path, value: int) -> None:
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).save(path)


def _dataset(root: Path, reserved_rows: bool = True, reserved_files: str = "garbage") -> Path:
    """A data folder like the package's: labels.csv (columns padded with spaces) and images/."""
    (root / "images").mkdir(parents=True)
    rows = [(n, "1.0" if n in MONO_ANOMALOUS else "0.0", "mono") for n in MONO_NORMAL + MONO_ANOMALOUS]
    rows += [(n, p, "mono") for n, p in MONO_UNCERTAIN]
    for n, p, _ in rows:
        _png(root / "images" / n, int(n[4:8]))
    if reserved_rows:
        rows += [(n, p, OTHER_TYPE) for n, p in RESERVED]
        for n, _ in RESERVED:
            if reserved_files == "garbage":
                (root / "images" / n).write_bytes(b"not a png: must never be read")
            elif reserved_files == "unreadable":
                (root / "images" / n).mkdir()  # opening it as a file fails, even as root
    rows.sort()  # interleaved, as in the real file
    (root / "labels.csv").write_text("".join(f"images/{n}  {p:<20}{t}\n" for n, p, t in rows))
    return root


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def source(tmp_path):
    return _dataset(tmp_path / "src")


def test_only_mono_rows_of_probability_0_or_1(source):
    files = elpv_data.mono_files(source)
    assert files == {"normal": [f"images/{n}" for n in MONO_NORMAL],
                     "anomalous": [f"images/{n}" for n in MONO_ANOMALOUS]}
    assert elpv_data.mono_counts(source) == {"normal": 12, "anomalous": 5}


def test_reserved_rows_change_nothing(tmp_path):
    with_rows = _dataset(tmp_path / "a")
    without = _dataset(tmp_path / "b", reserved_rows=False)
    assert elpv_data.mono_files(with_rows) == elpv_data.mono_files(without)
    a = elpv_data.build_elpv(tmp_path / "out_a", seed=0, source=with_rows, n_normal=4, n_anomalous=3)
    b = elpv_data.build_elpv(tmp_path / "out_b", seed=0, source=without, n_normal=4, n_anomalous=3)
    assert _files(a) == _files(b)


@pytest.mark.parametrize("reserved_files", ["garbage", "unreadable", "absent"])
def test_reserved_images_are_never_opened(tmp_path, monkeypatch, reserved_files):
    source = _dataset(tmp_path / "src", reserved_files=reserved_files)
    opened = []
    real_open = builtins.open

    def spy(file, *args, **kwargs):
        opened.append(Path(file).name if isinstance(file, (str, Path)) else file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    folder = elpv_data.build_elpv(tmp_path / "out", seed=0, source=source, n_normal=100, n_anomalous=100)
    monkeypatch.undo()
    reserved = {n for n, _ in RESERVED}
    assert opened and not reserved & set(opened)
    assert not reserved & {p.name for p in folder.rglob("*")}
    uncertain = {n for n, _ in MONO_UNCERTAIN}
    assert not uncertain & set(opened) and not uncertain & {p.name for p in folder.rglob("*")}


def test_layout_sample_size_and_copied_bytes(source, tmp_path):
    root = tmp_path / "data"
    folder = elpv_data.build_elpv(root, seed=0, source=source, n_normal=4, n_anomalous=10)
    assert folder == root / "elpv"
    assert [p.name for p in root.iterdir()] == ["elpv"]  # no hidden build folder left
    assert sorted(p.name for p in folder.iterdir()) == ["anomalous", "normal"]  # no masks
    normal = sorted(p.name for p in (folder / "normal").iterdir())
    anomalous = sorted(p.name for p in (folder / "anomalous").iterdir())
    assert len(normal) == 4 and set(normal) <= set(MONO_NORMAL)
    assert anomalous == MONO_ANOMALOUS  # fewer than asked for: all of them
    assert elpv_data.folder_counts(folder) == {"normal": 4, "anomalous": 5}
    for cls, names in (("normal", normal), ("anomalous", anomalous)):
        for n in names:
            assert (folder / cls / n).read_bytes() == (source / "images" / n).read_bytes()


def test_same_arguments_same_bytes_and_the_seed_matters(source, tmp_path):
    a = elpv_data.build_elpv(tmp_path / "a", seed=0, source=source, n_normal=4, n_anomalous=3)
    b = elpv_data.build_elpv(tmp_path / "b", seed=0, source=source, n_normal=4, n_anomalous=3)
    assert _files(a) == _files(b) and len(_files(a)) == 7
    # a rebuild in place with a bigger sample, then the original one: the old files are gone
    elpv_data.build_elpv(tmp_path / "b", seed=0, source=source, n_normal=10, n_anomalous=5)
    elpv_data.build_elpv(tmp_path / "b", seed=0, source=source, n_normal=4, n_anomalous=3)
    assert _files(a) == _files(b) and [p.name for p in (tmp_path / "b").iterdir()] == ["elpv"]
    c = elpv_data.build_elpv(tmp_path / "c", seed=1, source=source, n_normal=4, n_anomalous=3)
    assert _files(c) != _files(a)


def test_sample_is_a_seeded_permutation_of_the_sorted_lists():
    files = {"normal": [f"n{i:02d}" for i in range(30)], "anomalous": [f"a{i:02d}" for i in range(10)]}
    got = elpv_data.sample({k: v[::-1] for k, v in files.items()}, seed=3, n_normal=5, n_anomalous=4)
    for index, (cls, n) in enumerate((("normal", 5), ("anomalous", 4))):
        pick = np.random.default_rng([3, elpv_data.STREAM, index]).permutation(len(files[cls]))[:n]
        assert got[cls] == sorted(files[cls][i] for i in pick)
    # the anomalous sample does not depend on how many normal images are drawn
    assert elpv_data.sample(files, 3, 20, 4)["anomalous"] == got["anomalous"]


def test_default_sizes_are_the_embedded_datas():
    assert (elpv_data.N_NORMAL, elpv_data.N_ANOMALOUS) == (160 + 24 + 40, 48 + 24 + 60)


def test_the_pipeline_reads_it_as_a_folder_layout(source, tmp_path):
    folder = elpv_data.build_elpv(tmp_path / "data", seed=0, source=source, n_normal=8, n_anomalous=5)
    records, problems = read_layout(folder, "auto", 0, val_fraction=0.25, train_anomalous_fraction=0.3,
                                    marble_normal=("good",), marble_anomalous=("crack",))
    assert problems == []
    assert len(records) == 13 and all(r.mask is None for r in records)
    splits = {(r.split, r.label) for r in records}
    assert {("train", "normal"), ("val", "normal"), ("test", "normal"), ("val", "anomalous"),
            ("test", "anomalous")} <= splits


def test_labels_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        elpv_data.mono_files(tmp_path)
    (tmp_path / "labels.csv").write_text("images/cell0001.png 0.0 extra mono\n")
    with pytest.raises(ValueError, match="labels.csv:1"):
        elpv_data.mono_files(tmp_path)


def test_script(source, tmp_path, capsys):
    elpv_data.main([str(tmp_path / "out"), "--source", str(source), "--n-normal", "3", "--n-anomalous", "2"])
    assert elpv_data.folder_counts(tmp_path / "out" / "elpv") == {"normal": 3, "anomalous": 2}
    out = capsys.readouterr().out
    assert "available {'normal': 12, 'anomalous': 5}" in out and "sampled {'normal': 3, 'anomalous': 2}" in out


def test_ensure_installed_pip_installs_the_pinned_version_when_missing(tmp_path, monkeypatch):
    fake = types.ModuleType(elpv_data.MODULE)
    fake.__path__ = [str(tmp_path / "pkg")]
    installed, calls = [], []

    def import_module(name):
        assert name == elpv_data.MODULE
        if not installed:
            raise ImportError(name)
        return fake

    def run(cmd, check):
        calls.append((cmd, check))
        installed.append(True)

    monkeypatch.setattr(elpv_data.importlib, "import_module", import_module)
    monkeypatch.setattr(elpv_data.subprocess, "run", run)
    assert elpv_data.ensure_installed() == tmp_path / "pkg" / "data"
    assert calls == [([sys.executable, "-m", "pip", "install", "elpv-dataset==1.0.0.post1"], True)]
    assert elpv_data.ensure_installed() == tmp_path / "pkg" / "data" and len(calls) == 1  # present: no pip


def test_ensure_installed_says_what_failed(monkeypatch):
    def import_module(name):
        raise ImportError(name)

    def run(cmd, check):
        raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(elpv_data.importlib, "import_module", import_module)
    monkeypatch.setattr(elpv_data.subprocess, "run", run)
    with pytest.raises(SystemExit, match="elpv-dataset==1.0.0.post1"):
        elpv_data.ensure_installed()
