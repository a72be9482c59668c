"""`anodiff predict` end to end on tiny artefacts built here (nothing is trained), and its
bad-input contract: one-line `error: ...` naming the file, exit code 2, no output folder."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from anodiff import cli, io
from anodiff.config import to_dict
from conftest import infer_settings
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


def _image(seed, size=12, rgb=True):
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if rgb else (size, size)
    return rng.integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def art(tmp_path):
    """Checkpoint, maps folder, metrics JSON and three input images (two in a folder)."""
    a = {"ckpt": _save_ckpt(tmp_path / "models" / "ddpm.pt"),
         "maps": _save_maps(tmp_path / "maps" / "ddpm"),
         "metrics": tmp_path / "metrics" / "ddpm.json",
         "out": tmp_path / "pred"}
    io.write_json(a["metrics"], {"thresholds": {"pixel": 1.5, "image": 0.0}})
    a["single"] = tmp_path / "single.png"
    io.write_png(a["single"], _image(0))
    a["folder"] = tmp_path / "slabs"
    io.write_png(a["folder"] / "b.png", _image(1, rgb=False))  # grayscale input on an RGB model
    io.write_png(a["folder"] / "a.png", _image(2, size=SIZE))
    return a


def _argv(a, *inputs, **over):
    opts = {"checkpoint": a["ckpt"], "maps": a["maps"], "metrics": a["metrics"], "out": a["out"], **over}
    argv = ["predict", *map(str, inputs), "--quiet"]
    for k, v in opts.items():
        argv += [f"--{k}", str(v)]
    return argv


# ------------------------------------------------------------------ success
def test_predict_files_and_folder(art, capsys):
    rc = cli.main(_argv(art, art["single"], art["folder"]))
    assert rc == 0
    out = art["out"]
    table = pd.read_csv(out / "predictions.csv")
    assert list(table.columns) == ["path", "overlay", "score", "anomalous"]
    # the folder's images come sorted by name after the single file
    assert table["path"].tolist() == [str(art["single"]), str(art["folder"] / "a.png"),
                                      str(art["folder"] / "b.png")]
    assert table["overlay"].tolist() == ["0000_single.png", "0001_a.png", "0002_b.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(table["overlay"].tolist() + ["predictions.csv"])
    assert np.isfinite(table["score"]).all()
    assert table["anomalous"].tolist() == (table["score"] >= 0.0).tolist()
    for name in table["overlay"]:
        png = io.load_image_uint8(out / name, 8, 3)  # readable PNG
        assert png.shape == (8, 8, 3)
    assert "wrote 3 overlays" in capsys.readouterr().out
    # nothing stray left beside the output (temp folders are renamed or removed)
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []


def test_predict_folder_only_and_deterministic(art):
    assert cli.main(_argv(art, art["folder"])) == 0
    first = (art["out"] / "predictions.csv").read_bytes()
    overlay = (art["out"] / "0000_a.png").read_bytes()
    assert len(pd.read_csv(art["out"] / "predictions.csv")) == 2
    assert cli.main(_argv(art, art["folder"])) == 0  # rerun replaces the folder whole
    assert (art["out"] / "predictions.csv").read_bytes() == first
    assert (art["out"] / "0000_a.png").read_bytes() == overlay


def test_predict_threshold_override_and_no_metrics(art, tmp_path, capsys):
    assert cli.main(_argv(art, art["single"], metrics=tmp_path / "absent.json")) == 0
    table = pd.read_csv(art["out"] / "predictions.csv")
    assert table["anomalous"].isna().all()  # no threshold known: the label is left empty
    assert "no threshold" in capsys.readouterr().out
    assert cli.main(_argv(art, art["single"], threshold=1e9)) == 0
    assert pd.read_csv(art["out"] / "predictions.csv")["anomalous"].tolist() == [False]


def test_predict_without_normalisation(art, tmp_path):
    maps = _save_maps(tmp_path / "plain", normalize="none")
    assert cli.main(_argv(art, art["single"], maps=maps)) == 0
    assert (art["out"] / "0000_single.png").exists()


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
    assert cli.main(_argv(art, bad)) == 2
    assert "error: " in capsys.readouterr().err
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
