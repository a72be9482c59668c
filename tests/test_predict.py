"""`anodiff predict` end to end on tiny artefacts built here (nothing is trained), and its
bad-input contract: one-line `error: ...` naming the file, exit code 2, no output folder."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from anodiff import cli, io, plots
from anodiff.config import to_dict
from anodiff.errors import DataError
from conftest import ROOT, infer_settings
from anodiff.checkpoint import save_ddpm
from anodiff.unet import UNet

SIZE = 8
VENV_BIN = Path(sys.executable).parent



def _save_ckpt(path, size=SIZE, channels=3):
    torch.manual_seed(0)
    model = UNet(channels, base_channels=4, channel_mults=(1, 2), num_res_blocks=1,
                 attention_resolutions=(), image_size=size)
    meta = {"schedule": {"timesteps": 10, "kind": "linear", "beta_start": 1e-4, "beta_end": 0.02},
            "noise": "gaussian", "noise_kw": {}}
    save_ddpm(path, model, model, torch.optim.Adam(model.parameters()), 0,
              torch.Generator().manual_seed(0).get_state(), meta)
    return path


def _save_maps(folder, size=SIZE, normalize="pixel"):
    settings = to_dict(infer_settings(t_start=5, steps=1, n_seeds=2, batch_size=2, sigma=1.0, normalize=normalize,
                                      score="topk", topk=0.01, error="abs"))
    folder.mkdir(parents=True, exist_ok=True)
    io.write_json(folder / "meta.json", {"method": "ddpm", "settings": settings})
    stats = {}
    if normalize == "pixel":
        stats = {"stats_mean": np.full((1, size, size), 0.1, np.float32),
                 "stats_std": np.full((1, size, size), 0.05, np.float32)}
    io.save_npz(folder / "maps.npz", maps=np.zeros((2, size, size), np.float32), **stats)
    return folder


def _image(seed, size=12, rgb=True, width=None):
    rng = np.random.default_rng(seed)
    shape = (size, width or size, 3) if rgb else (size, width or size)
    return rng.integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def art(tmp_path):
    """Checkpoint, maps folder, metrics JSON and three input images (two in a folder)."""
    a = {"ckpt": _save_ckpt(tmp_path / "models" / "ddpm.pt"),
         "maps": _save_maps(tmp_path / "maps" / "ddpm"),
         "metrics": tmp_path / "metrics" / "ddpm.json",
         "out": tmp_path / "pred", "project": tmp_path}  # the project: no params.yaml, skip_bad_files false
    io.write_json(a["metrics"], {"thresholds": {"pixel": 1.5, "image": 0.0}})
    a["single"] = tmp_path / "single.png"
    io.write_png(a["single"], _image(0))
    a["folder"] = tmp_path / "slabs"
    io.write_png(a["folder"] / "b.png", _image(1, rgb=False))  # grayscale input on an RGB model
    io.write_png(a["folder"] / "a.png", _image(2, size=SIZE))
    return a


def _argv(a, *inputs, **over):
    """predict's arguments on the artefacts `a`; `over` changes or adds options (True: a flag)."""
    opts = {"checkpoint": a["ckpt"], "maps": a["maps"], "metrics": a["metrics"], "out": a["out"],
            **({"project": a["project"]} if "project" in a else {}), **over}
    argv = ["predict", *map(str, inputs), "--quiet"]
    for k, v in opts.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return argv


def _stems(table):
    return [Path(p).stem for p in table["overlay"]]


# ------------------------------------------------------------------ success
def test_predict_files_and_folder(art, capsys):
    rc = cli.main(_argv(art, art["single"], art["folder"]))
    assert rc == 0
    out = art["out"]
    table = pd.read_csv(out / "predictions.csv")
    assert list(table.columns) == ["path", "score", "anomalous", "threshold", "map", "mask", "overlay"]
    # the folder's images come sorted by name after the single file
    assert table["path"].tolist() == [str(art["single"]), str(art["folder"] / "a.png"),
                                      str(art["folder"] / "b.png")]
    stems = ["0000_single", "0001_a", "0002_b"]
    assert table["map"].tolist() == [f"maps/{s}.npy" for s in stems]
    assert table["mask"].tolist() == [f"masks/{s}.png" for s in stems]
    assert table["overlay"].tolist() == [f"overlays/{s}.png" for s in stems]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted([*table["map"], *table["mask"], *table["overlay"], "predictions.csv"])
    assert np.isfinite(table["score"]).all()
    assert table["anomalous"].tolist() == (table["score"] >= 0.0).tolist()
    assert (table["threshold"] == 0.0).all()
    for name, side in zip(table["overlay"], (12, 8, 12)):
        assert io.image_size_of(out / name)[0] > 2 * side  # a readable PNG, a figure
    for name, side in zip(table["map"], (12, 8, 12)):  # at each image's own size
        assert np.load(out / name).shape == (side, side)
    assert "wrote 3 maps, 3 masks, 3 overlays and predictions.csv" in capsys.readouterr().out
    # nothing stray left beside the output (temp folders are renamed or removed)
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []


def test_predict_folder_only_and_deterministic(art):
    assert cli.main(_argv(art, art["folder"])) == 0
    first = {p: (art["out"] / p).read_bytes() for p in ("predictions.csv", "overlays/0000_a.png",
                                                       "maps/0000_a.npy", "masks/0000_a.png")}
    assert len(pd.read_csv(art["out"] / "predictions.csv")) == 2
    assert cli.main(_argv(art, art["folder"], force=True)) == 0  # rerun replaces the folder whole
    for p, data in first.items():
        assert (art["out"] / p).read_bytes() == data, p


def test_predict_threshold_override_and_no_metrics(art, tmp_path, capsys):
    assert cli.main(_argv(art, art["single"], metrics=tmp_path / "absent.json")) == 0
    table = pd.read_csv(art["out"] / "predictions.csv")
    assert table["anomalous"].isna().all()  # no threshold known: the label is left empty
    assert table["threshold"].isna().all() and table["mask"].isna().all()
    assert not (art["out"] / "masks").exists()  # no pixel threshold: no masks
    printed = capsys.readouterr().out
    assert "wrote 1 maps, 0 masks" in printed and "no image threshold" in printed and "no pixel threshold" in printed
    assert cli.main(_argv(art, art["single"], threshold=1e9, force=True)) == 0
    table = pd.read_csv(art["out"] / "predictions.csv")
    assert table["anomalous"].tolist() == [False] and table["threshold"].tolist() == [1e9]
    assert (art["out"] / table["mask"][0]).exists()  # the pixel threshold is still the one chosen on val


def test_predict_without_normalisation(art, tmp_path):
    maps = _save_maps(tmp_path / "plain", normalize="none")
    assert cli.main(_argv(art, art["single"], maps=maps)) == 0
    assert (art["out"] / "overlays" / "0000_single.png").exists()


# ------------------------------------------------------------------ bad input
def _bad(a, capsys, argv, *names):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for name in names:
        assert str(name) in lines[0], (name, err)
    assert not a["out"].exists()
    assert not any(p.name.startswith(f".{a['out'].name}") for p in a["out"].parent.iterdir())
    return lines[0]


def test_missing_checkpoint(art, tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    _bad(art, capsys, _argv(art, art["single"], checkpoint=missing), missing)


@pytest.mark.parametrize("kind", ["empty", "random_bytes", "truncated"])
def test_corrupt_checkpoint(art, tmp_path, capsys, kind):
    bad = tmp_path / "corrupt.pt"
    if kind == "empty":
        bad.write_bytes(b"")
    elif kind == "random_bytes":
        bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    else:  # a real checkpoint cut in half, as an interrupted copy leaves it
        data = art["ckpt"].read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    _bad(art, capsys, _argv(art, art["single"], checkpoint=bad), bad)


def test_checkpoint_not_anodiff(art, tmp_path, capsys):
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    _bad(art, capsys, _argv(art, art["single"], checkpoint=other), other)


def test_checkpoint_image_size_differs_from_statistics(art, tmp_path, capsys):
    stats16 = _save_maps(tmp_path / "maps16", size=16)
    line = _bad(art, capsys, _argv(art, art["single"], maps=stats16), stats16 / "maps.npz")
    assert str(art["ckpt"]) in line


def test_checkpoint_channels_differ_from_statistics_are_fine(art, tmp_path):
    """Maps are channel means, so the stored statistics do not depend on the channel count:
    a grayscale checkpoint reads every input as grayscale and works with the same maps."""
    gray = _save_ckpt(tmp_path / "gray.pt", channels=1)
    assert cli.main(_argv(art, art["single"], checkpoint=gray)) == 0


def test_generator_of_other_channels_or_without_its_level(art, tmp_path, capsys):
    from anodiff.checkpoint import save_generator
    from anodiff.noisegen import NoiseGenerator

    gen = tmp_path / "gan_generator.pt"
    save_generator(gen, NoiseGenerator(1, base_channels=4, n_blocks=1), {"t": 5, "denoise_steps": 1})
    line = _bad(art, capsys, _argv(art, art["single"], generator=gen), gen)
    assert f"generator has 1 channels but the DDPM {art['ckpt']} has 3" in line
    save_generator(gen, NoiseGenerator(3, base_channels=4, n_blocks=1), {"t": 5})
    assert "no valid 't' and 'denoise_steps'" in _bad(art, capsys, _argv(art, art["single"], generator=gen), gen)


def test_out_that_is_a_file_or_holds_an_input(art, tmp_path, capsys):
    (tmp_path / "taken.csv").write_text("kept\n")
    _bad(art, capsys, _argv(art, art["single"], out=tmp_path / "taken.csv"), "is a file")
    assert (tmp_path / "taken.csv").read_text() == "kept\n"
    _bad(art, capsys, _argv(art, art["folder"] / "a.png", out=tmp_path), f"would replace {art['folder'] / 'a.png'}")
    _bad(art, capsys, _argv(art, art["single"], threshold="inf"), "--threshold: inf is not a finite number")


def test_missing_maps(art, tmp_path, capsys):
    _bad(art, capsys, _argv(art, art["single"], maps=tmp_path / "nomaps"), tmp_path / "nomaps" / "meta.json")


def _damage(maps, what):
    """Break one artefact of a maps folder; returns the file the error must name."""
    if what == "meta_not_json":
        (maps / "meta.json").write_text("{not json")
        return maps / "meta.json"
    if what == "meta_unknown_setting":
        meta = io.read_json(maps / "meta.json")
        meta["settings"]["t_strat"] = 5
        io.write_json(maps / "meta.json", meta)
        return maps / "meta.json"
    if what == "t_start_beyond_schedule":  # maps made with a 300-step model, checkpoint has 10
        meta = io.read_json(maps / "meta.json")
        meta["settings"]["t_start"] = 60
        io.write_json(maps / "meta.json", meta)
        return maps / "meta.json"
    if what == "npz_junk":
        (maps / "maps.npz").write_bytes(b"PK\x03\x04 truncated zip")
        return maps / "maps.npz"
    if what == "npz_no_std":
        io.save_npz(maps / "maps.npz", stats_mean=np.zeros((1, SIZE, SIZE), np.float32))
        return maps / "maps.npz"
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["meta_not_json", "meta_unknown_setting", "t_start_beyond_schedule",
                                  "npz_junk", "npz_no_std"])
def test_damaged_maps_folder(art, capsys, what):
    _bad(art, capsys, _argv(art, art["single"]), _damage(art["maps"], what))


def test_a_meta_json_from_before_the_level_plan_fold_still_predicts_the_same(art):
    """meta.json written when the level plan was infer.t_starts / level_steps (t_start, steps and
    guidance then held the single level): predict converts the keys and draws the same maps."""
    assert cli.main(_argv(art, art["single"])) == 0
    today = (art["out"] / "predictions.csv").read_bytes()
    meta = io.read_json(art["maps"] / "meta.json")
    meta["settings"].update(t_start=30, steps=1, t_starts=[meta["settings"]["t_start"]],
                            level_steps=[meta["settings"]["steps"]], guidance=[])
    io.write_json(art["maps"] / "meta.json", meta)
    assert cli.main(_argv(art, art["single"], out=art["project"] / "old")) == 0
    assert (art["project"] / "old" / "predictions.csv").read_bytes() == today


def test_corrupt_metrics_json(art, capsys):
    art["metrics"].write_text('{"thresholds": ')
    _bad(art, capsys, _argv(art, art["single"]), art["metrics"])


def test_metrics_without_thresholds_is_not_an_error(art):
    io.write_json(art["metrics"], {"thresholds": None, "pixel_auroc": 0.9})
    assert cli.main(_argv(art, art["single"])) == 0
    assert pd.read_csv(art["out"] / "predictions.csv")["anomalous"].isna().all()


@pytest.mark.parametrize("content", [b"", b"this is text, not a PNG\n", b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_unreadable_image(art, tmp_path, capsys, content):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    _bad(art, capsys, _argv(art, art["single"], bad), bad)


def test_unreadable_image_inside_folder(art, capsys):
    bad = art["folder"] / "c.png"
    bad.write_bytes(b"")
    _bad(art, capsys, _argv(art, art["folder"]), bad)


def test_empty_folder(art, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    _bad(art, capsys, _argv(art, art["single"], empty), empty)


def test_missing_input(art, tmp_path, capsys):
    _bad(art, capsys, _argv(art, tmp_path / "ghost.png"), tmp_path / "ghost.png")


def test_bad_input_keeps_previous_output(art, tmp_path, capsys):
    assert cli.main(_argv(art, art["single"])) == 0
    before = (art["out"] / "predictions.csv").read_bytes()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    assert cli.main(_argv(art, bad, force=True)) == 2
    assert str(bad) in capsys.readouterr().err
    assert (art["out"] / "predictions.csv").read_bytes() == before


# ------------------------------------------------------------------ console script
def test_console_script_help():
    exe = VENV_BIN / "anodiff"
    if not exe.exists():
        pytest.skip(f"{exe}: console script not installed")
    res = subprocess.run([str(exe), "predict", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "--checkpoint" in res.stdout and "--maps" in res.stdout


def test_predict_uses_the_checkpoint_infer_recorded(art, capsys):
    """dvc.yaml maps a method to its files; infer records them in meta.json and predict reads them."""
    argv = _argv(art, art["single"])
    i = argv.index("--checkpoint")
    del argv[i:i + 2]
    meta = io.read_json(art["maps"] / "meta.json")
    _bad(art, capsys, argv, "no 'model' recorded")
    io.write_json(art["maps"] / "meta.json", {**meta, "model": str(art["ckpt"])})
    assert cli.main(argv) == 0


# ------------------------------------------------------------------ own-size outputs, batches, --out, --project
def test_map_and_mask_at_the_image_own_size(art, tmp_path):
    """A 40x30 photograph on an 8-px model: its map (float32) and mask (0/255) are 30 rows by 40
    columns, the map resized bilinearly from the model's, the mask the map at the pixel threshold."""
    photo = tmp_path / "photo.png"
    io.write_png(photo, _image(5, size=30, width=40))
    assert cli.main(_argv(art, photo)) == 0
    amap = np.load(art["out"] / "maps" / "0000_photo.npy")
    assert amap.dtype == np.float32 and amap.shape == (30, 40)
    # a pixel threshold inside the map's range, so the mask has both values
    pixel = float(np.median(amap))
    io.write_json(art["metrics"], {"thresholds": {"pixel": pixel, "image": 0.0}})
    assert cli.main(_argv(art, photo, force=True)) == 0
    table = pd.read_csv(art["out"] / "predictions.csv")
    assert np.array_equal(np.load(art["out"] / table["map"][0]), amap)
    mask = np.asarray(io._open(art["out"] / table["mask"][0]))
    assert mask.dtype == np.uint8 and mask.shape == (30, 40)
    assert set(np.unique(mask)) == {0, 255}
    assert np.array_equal(mask == 255, amap >= pixel)
    assert io.image_size_of(art["out"] / table["overlay"][0])[0] > 40


def test_own_size_is_bilinear_from_the_model_size():
    m = torch.arange(16, dtype=torch.float32).view(4, 4)
    assert np.array_equal(cli.own_size(m, 4, 4), m.numpy())
    up = cli.own_size(m, 8, 6)
    ref = torch.nn.functional.interpolate(m[None, None], size=(8, 6), mode="bilinear", align_corners=False)
    assert up.dtype == np.float32 and np.array_equal(up, ref[0, 0].numpy())


def test_batch_size_does_not_change_scores_or_maps(art, tmp_path):
    """Images are streamed in batches; each one's noise is its own stream and the model sees the
    batches of one pass, so --batch-size 1 and 4 give the same bytes."""
    folder = tmp_path / "many"
    for i in range(5):
        io.write_png(folder / f"{i}.png", _image(10 + i, size=8 + 2 * i, rgb=i != 3))
    outs = {}
    for bs in (1, 4, 16):
        outs[bs] = tmp_path / f"bs{bs}"
        assert cli.main(_argv(art, folder, out=outs[bs], batch_size=bs)) == 0
    first = (outs[1] / "predictions.csv").read_bytes()
    assert len(pd.read_csv(outs[1] / "predictions.csv")) == 5
    for bs in (4, 16):
        assert (outs[bs] / "predictions.csv").read_bytes() == first
        for i in range(5):
            name = f"maps/{i:04d}_{i}.npy"
            assert (outs[bs] / name).read_bytes() == (outs[1] / name).read_bytes(), (bs, name)


def test_an_image_scores_alike_alone_and_among_others(art, tmp_path):
    assert cli.main(_argv(art, art["folder"], out=tmp_path / "all")) == 0
    assert cli.main(_argv(art, art["folder"] / "b.png", out=tmp_path / "one")) == 0
    together = pd.read_csv(tmp_path / "all" / "predictions.csv")
    alone = pd.read_csv(tmp_path / "one" / "predictions.csv")
    assert alone["score"][0] == pytest.approx(together["score"][1], abs=2e-5)


def test_non_empty_out_is_refused_unless_force(art, tmp_path, capsys):
    art["out"].mkdir()
    (art["out"] / "notes.txt").write_text("mine\n")
    rc = cli.main(_argv(art, art["single"]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert f"--out {art['out']}: exists and is not empty" in lines[0] and "--force" in lines[0]
    assert (art["out"] / "notes.txt").read_text() == "mine\n"
    assert cli.main(_argv(art, art["single"], force=True)) == 0  # replaced whole
    assert not (art["out"] / "notes.txt").exists() and (art["out"] / "predictions.csv").exists()
    # an existing empty folder is fine without --force
    empty = tmp_path / "empty_out"
    empty.mkdir()
    assert cli.main(_argv(art, art["single"], out=empty)) == 0
    assert (empty / "predictions.csv").exists()
    # --force never replaces what predict reads
    capsys.readouterr()
    assert cli.main(_argv(art, art["folder"] / "a.png", out=art["folder"], force=True)) == 2
    assert "would replace" in capsys.readouterr().err and (art["folder"] / "a.png").exists()


def _project(root: Path, art) -> Path:
    """A project folder as the pipeline leaves it: paths in meta.json relative to its root."""
    (root / "models").mkdir(parents=True)
    shutil.copy(art["ckpt"], root / "models" / "ddpm.pt")
    shutil.copytree(art["maps"], root / "data" / "maps" / "ddpm")
    meta = io.read_json(root / "data/maps/ddpm/meta.json")
    io.write_json(root / "data/maps/ddpm/meta.json", {**meta, "model": "models/ddpm.pt", "seed": 0})
    shutil.copytree(art["metrics"].parent, root / "metrics")
    return root


def test_project_resolves_the_pipeline_files_from_another_folder(art, tmp_path, monkeypatch, capsys):
    project = _project(tmp_path / "proj", art)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    io.write_png(elsewhere / "slab.png", _image(0))
    monkeypatch.chdir(elsewhere)
    assert cli.main(["predict", "slab.png", "--project", "../proj", "--out", "res", "--quiet"]) == 0
    got = pd.read_csv(elsewhere / "res" / "predictions.csv")  # inputs and --out: relative to the cwd
    assert got["path"].tolist() == ["slab.png"] and got["threshold"].tolist() == [0.0]
    assert (elsewhere / "res" / got["mask"][0]).exists()  # the project's pixel threshold
    # the same image with every file named explicitly gets the same score
    io.write_png(tmp_path / "slab.png", _image(0))
    assert cli.main(_argv(art, tmp_path / "slab.png", seed=0)) == 0
    assert pd.read_csv(art["out"] / "predictions.csv")["score"].tolist() == got["score"].tolist()
    # a method the project has not run through infer: which ones it has, and the command
    capsys.readouterr()
    assert cli.main(["predict", "slab.png", "--project", str(project), "--method", "gan", "--out", "res2"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "available there: ddpm" in lines[0] and "dvc repro infer@gan" in lines[0]
    assert not (elsewhere / "res2").exists()
    assert cli.main(["predict", "slab.png", "--project", str(tmp_path / "nope"), "--out", "res3"]) == 2
    assert "--project" in capsys.readouterr().err


def _params(project: Path, skip: bool) -> None:
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["skip_bad_files"] = skip
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def test_bad_image_in_a_folder_skipped_or_stopping_per_skip_bad_files(art, capsys):
    bad, tiny = art["folder"] / "c.png", art["folder"] / "d.png"
    bad.write_bytes(b"not a png")
    io.write_png(tiny, _image(3, size=4))  # smaller than predict's 8 px
    _params(art["project"], skip=False)
    line = _bad(art, capsys, _argv(art, art["folder"]), bad)
    assert "data.skip_bad_files: true" in line and str(art["project"] / "params.yaml") in line
    _params(art["project"], skip=True)
    # a file named on the command line is never skipped
    assert "at least 8 px" in _bad(art, capsys, _argv(art, art["single"], tiny), tiny)
    assert cli.main(_argv(art, art["folder"])) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("warning: ") and "skipped" in e for e in err)
    assert str(bad) in err[0] and str(tiny) in err[1] and "4x4 px" in err[1]
    table = pd.read_csv(art["out"] / "predictions.csv")
    assert table["path"].tolist() == [str(art["folder"] / "a.png"), str(art["folder"] / "b.png")]
    assert _stems(table) == ["0000_a", "0001_b"]


def test_too_small_image_names_the_file(art, tmp_path, capsys):
    tiny = tmp_path / "tiny.png"
    io.write_png(tiny, _image(3, size=5, width=20))
    assert "20x5 px" in _bad(art, capsys, _argv(art, art["single"], tiny), tiny)


def test_nothing_written_when_predict_fails_midway(art, tmp_path, capsys, monkeypatch):
    """A failure after some images were written (here the second overlay) leaves no --out, no
    temporary folder, and a previous --out untouched."""
    real, calls = plots.write_prediction, []

    def failing(path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise DataError(f"{path}: disk full")
        return real(path, *a, **k)

    monkeypatch.setattr(plots, "write_prediction", failing)
    _bad(art, capsys, _argv(art, art["single"], art["folder"], batch_size=1), "disk full")
    assert len(calls) == 2
    monkeypatch.setattr(plots, "write_prediction", real)
    assert cli.main(_argv(art, art["single"])) == 0
    before = (art["out"] / "predictions.csv").read_bytes()
    calls.clear()
    monkeypatch.setattr(plots, "write_prediction", failing)
    assert cli.main(_argv(art, art["single"], art["folder"], force=True, batch_size=1)) == 2
    assert (art["out"] / "predictions.csv").read_bytes() == before
    assert sorted(p.name for p in art["out"].parent.iterdir() if p.name.startswith(".")) == []


def test_every_option_documents_its_default():
    predict = cli.build_parser()._subparsers._group_actions[0].choices["predict"]
    for action in predict._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and "default" in action.help, action.option_strings
    assert cli.build_parser().parse_args(["predict", "x.png"]).batch_size == 16
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["predict", "x.png", "--method", "vae"])
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["predict", "x.png", "--batch-size", "0"])


def test_python_m_anodiff_version_and_help():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "anodiff", "--version"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"anodiff {cli.version()}"
    res = subprocess.run([sys.executable, "-m", "anodiff", "predict", "--help"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert "--project" in res.stdout and "--batch-size" in res.stdout and "(default: 16)" in res.stdout
