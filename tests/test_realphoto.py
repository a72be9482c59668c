"""The real-photo benchmark's bookkeeping (bench/realphoto.py): the mean over seeds, the spread,
the per-defect figures and the table; its Markdown (experiments/realphoto_table.py). Running it
(DVC per category) is a benchmark, not a test."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))  # realphoto_table

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


def test_elpv_is_a_category_and_patchcore_a_method():
    assert realphoto.CATEGORIES == ("tissue", "moon", "hubble", "terrain", "elpv")
    assert realphoto.METHODS == ("ddpm", "rddpm", "gan", "patchcore")
    assert [realphoto.layout(c) for c in realphoto.CATEGORIES] == ["mvtec"] * 4 + ["folder"]


def _image_only(img):
    """metrics/<method>.json of data without masks: every pixel key null."""
    m = dict.fromkeys(realphoto.KEYS, None)
    m.update(image_auroc=img, image_ap=img - 0.05, n_test_images=124)
    m["per_defect"] = {"anomalous": dict(m)}
    return m


@pytest.mark.parametrize("per_defect", ["pixel_none", "empty", "missing", "null"])
def test_summarise_and_table_cope_with_image_only_metrics(per_defect):
    seeds = [_image_only(0.7), _image_only(0.8)]
    for m in seeds:
        if per_defect == "empty":
            m["per_defect"] = {}
        elif per_defect == "missing":
            del m["per_defect"]
        elif per_defect == "null":
            m["per_defect"] = None
    out = realphoto.summarise(seeds)
    assert out["image_auroc"] == pytest.approx(0.75) and out["spread"]["image_auroc"] == pytest.approx([0.7, 0.8])
    assert all(out[k] is None for k in ("pixel_auroc", "pixel_ap", "aupro", "pixel_f1_max", "dice"))
    assert out["spread"]["pixel_auroc"] is None and out["spread"]["aupro"] is None
    if per_defect == "pixel_none":
        assert out["per_defect"]["anomalous"]["pixel_auroc"] is None
        assert out["per_defect"]["anomalous"]["image_auroc"] == pytest.approx(0.75)
    else:
        assert out["per_defect"] == {}
    results = {"moon": {"ddpm": realphoto.summarise([_metrics(0.9, 0.8, {"hole": 0.7})])},
               "elpv": {"ddpm": out, "patchcore": realphoto.summarise(seeds)}}
    tab = realphoto.table(results)
    assert list(tab["category"]) == ["moon", "elpv", "elpv"]
    elpv = tab[tab["category"] == "elpv"]
    assert elpv["image_auroc"].tolist() == pytest.approx([0.75, 0.75])
    assert elpv["pixel_auroc"].isna().all() and elpv["worst_defect"].isna().all()
    assert elpv["worst_defect_pixel_auroc"].isna().all()
    assert tab.to_string(index=False, float_format=lambda v: f"{v:.3f}")  # the table main() prints
    only_elpv = realphoto.table({"elpv": {"ddpm": out}})
    assert only_elpv.iloc[0]["worst_defect"] is None and only_elpv.iloc[0]["pixel_auroc"] is None
    assert only_elpv.to_string(index=False, float_format=lambda v: f"{v:.3f}")


def test_main_runs_elpv_with_the_folder_layout(tmp_path, monkeypatch):
    """main() without DVC: the commands it would run and the JSON it writes."""
    commands, installs = [], []
    elpv_folder, moon_folder = tmp_path / "data" / "elpv", tmp_path / "data" / "moon"

    def build_elpv(root, seed, source):
        assert (root, seed, source) == (tmp_path / "data", 0, tmp_path / "pkg")
        for cls, n in (("normal", 3), ("anomalous", 2)):
            (elpv_folder / cls).mkdir(parents=True)
            for i in range(n):
                (elpv_folder / cls / f"cell{i:04d}.png").write_bytes(b"")
        return elpv_folder

    monkeypatch.setattr(realphoto.elpv_data, "ensure_installed", lambda: installs.append(1) or tmp_path / "pkg")
    monkeypatch.setattr(realphoto.elpv_data, "build_elpv", build_elpv)
    monkeypatch.setattr(realphoto.elpv_data, "mono_counts", lambda source: {"normal": 9, "anomalous": 4})
    monkeypatch.setattr(realphoto, "build_category", lambda cat, root, seed: moon_folder)
    monkeypatch.setattr(realphoto, "_run", lambda cmd, log: commands.append(cmd))
    monkeypatch.setattr(realphoto, "_exp_ref", lambda name: name)
    monkeypatch.setattr(realphoto, "_read_metrics", lambda ref, m: _image_only(0.6 if m == "ddpm" else 0.7))
    out = tmp_path / "rp.json"
    realphoto.main(["--categories", "moon", "elpv", "--methods", "ddpm", "patchcore", "--data-dir",
                    str(tmp_path / "data"), "--out", str(out), "--log", str(tmp_path / "rp.log")])
    assert installs == [1]
    layouts = [next(c for c in cmd if c.startswith("data.layout=")) for cmd in commands]
    assert layouts == ["data.layout=mvtec", "data.layout=folder"]
    assert f"data.source={elpv_folder}" in commands[1] and commands[1][:6] == \
        ["dvc", "exp", "run", "--temp", "-f", "-n"] and commands[1][6] == "rp-elpv-s0"
    assert commands[1][-2:] == ["evaluate@ddpm", "evaluate@patchcore"]
    results = json.loads(out.read_text())
    assert list(results) == ["moon", "elpv"] and list(results["elpv"]) == ["ddpm", "patchcore"]
    assert results["elpv"]["patchcore"]["image_auroc"] == pytest.approx(0.7)
    assert results["elpv"]["patchcore"]["pixel_auroc"] is None
    run = json.loads((tmp_path / "rp_run.json").read_text())
    assert run["data"] == {"elpv": {"package": "elpv-dataset==1.0.0.post1", "cell_type": "mono",
                                    "available": {"normal": 9, "anomalous": 4},
                                    "sampled": {"normal": 3, "anomalous": 2}}}


def test_main_without_elpv_installs_nothing(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(realphoto.elpv_data, "ensure_installed", lambda: pytest.fail("installed elpv"))
    monkeypatch.setattr(realphoto, "build_category", lambda cat, root, seed: tmp_path / cat)
    monkeypatch.setattr(realphoto, "_run", lambda cmd, log: commands.append(cmd))
    monkeypatch.setattr(realphoto, "_exp_ref", lambda name: name)
    monkeypatch.setattr(realphoto, "_read_metrics", lambda ref, m: _metrics(0.9, 0.8, {"hole": 0.7}))
    realphoto.main(["--categories", "moon", "--data-dir", str(tmp_path), "--out", str(tmp_path / "rp.json"),
                    "--log", str(tmp_path / "rp.log")])
    assert len(commands) == 1 and "data.layout=mvtec" in commands[0]
    assert not any(c.startswith("evaluate@") for c in commands[0])  # every method: the whole pipeline
    assert list(json.loads((tmp_path / "rp.json").read_text())["moon"]) == list(realphoto.METHODS)
    assert "data" not in json.loads((tmp_path / "rp_run.json").read_text())


def test_merge_joins_runs_of_separate_seeds_and_summarises_them_again():
    a = {**_metrics(0.9, 0.8, {"hole": 0.7}), "seed": 0}
    b = {**_metrics(0.7, 0.6, {"hole": 0.9}), "seed": 1}
    b2 = {**_metrics(0.8, 0.6, {"hole": 0.9}), "seed": 1}  # seed 1 again, in a later file: it wins
    parts = [{"moon": {"ddpm": realphoto.summarise([a])}}, {"moon": {"ddpm": realphoto.summarise([b])}},
             {"moon": {"ddpm": realphoto.summarise([b2])}, "elpv": {"patchcore": realphoto.summarise([a])}}]
    out = realphoto.merge(parts)
    assert out["moon"]["ddpm"]["pixel_auroc"] == pytest.approx(0.85)
    assert [r["seed"] for r in out["moon"]["ddpm"]["per_seed"]] == [0, 1]
    assert out["elpv"]["patchcore"]["per_seed"] == [a]


def test_markdown_table_is_written_from_the_json():
    import realphoto_table

    a = {**_metrics(0.9, 0.8, {"hole": 0.7, "stain": 0.95}), "seed": 0,
         "infer": {"map_calibration": "texture+memory", "score_calibration": "texture"}}
    b = {**_metrics(0.7, 0.6, {"hole": 0.9, "stain": 0.85}), "seed": 1,
         "infer": {"map_calibration": "image", "score_calibration": "texture"}}
    main = {"moon": {"ddpm": realphoto.summarise([a, b])}}
    pix = {"moon": {"ddpm": realphoto.summarise([b])}}
    text = realphoto_table.markdown(main, [("ddpm, reconstruction only", pix, "ddpm")])
    lines = text.splitlines()
    assert lines[2] == ("| moon | `ddpm` | 0.800 (0.700-0.900) | 0.700 (0.600-0.800) | 0.700 (0.600-0.800) | "
                        "hole 0.80 | 0,1 | texture+memory / texture; image / texture |")
    assert lines[3].startswith("| moon | ddpm, reconstruction only | 0.700 | 0.600 | 0.600 | stain 0.85 | 1 |")


def test_table_replaces_only_its_block_in_a_markdown_file(tmp_path):
    import realphoto_table

    res = tmp_path / "r.json"
    res.write_text(json.dumps({"moon": {"ddpm": realphoto.summarise([{**_metrics(0.9, 0.8, {}), "seed": 0}])}}))
    doc = tmp_path / "README.md"
    doc.write_text(f"before\n{realphoto_table.BEGIN}\nold table\n{realphoto_table.END}\nafter\n")
    realphoto_table.main([str(res), "--into", str(doc)])
    text = doc.read_text()
    assert text.startswith("before\n") and text.endswith(f"{realphoto_table.END}\nafter\n")
    assert "old table" not in text and "| moon | `ddpm` | 0.900 |" in text
    doc.write_text("no block\n")
    with pytest.raises(SystemExit, match="no .* block"):
        realphoto_table.main([str(res), "--into", str(doc)])


def test_versus_gives_the_differences_on_the_seeds_both_ran():
    import realphoto_table

    def run(pix, img, seed):
        return {**_metrics(pix, img, {}), "seed": seed}

    main = {"moon": {"ddpm": realphoto.summarise([run(0.9, 0.8, 0), run(0.7, 0.8, 1)]),
                     "patchcore": realphoto.summarise([run(0.8, 0.9, 0), run(0.8, 0.9, 1)])},
            "hubble": {"ddpm": realphoto.summarise([run(0.9, 0.8, 0)]),
                       "patchcore": realphoto.summarise([run(0.8, 0.9, 0)])}}
    pixel = {"moon": {"ddpm": realphoto.summarise([run(0.95, 0.7, 0)])}}
    lines = realphoto_table.versus(main, pixel=pixel).splitlines()
    # best of (0.8, 0.95) pixel AUROC, (0.7, 0.85) AUPRO, (0.9, 0.7) image on seed 0
    # ddpm - patchcore over seeds 0 and 1; best of both over seed 0, the one the pixel run has
    assert lines[2] == "| moon | +0.000 / +0.000 / -0.100 | 0,1 | -0.050 / -0.050 / -0.100 | 0 |"
    assert lines[3] == "| hubble | +0.100 / +0.100 / -0.100 | 0 | n/a | |"
