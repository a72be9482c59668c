"""The experiment grid's bookkeeping (experiments/grid.py): which experiments it queues, and the table and
plot it makes of them. Running the grid (DVC's queue) is a benchmark, not a test."""

import argparse
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import grid  # noqa: E402


def test_cells_cover_contamination_times_loss_and_simplex_for_every_seed():
    cells = grid.cells("embedded", [0, 1])
    assert len(cells) == 2 * (len(grid.CONTAMINATION) * len(grid.LOSSES) + len(grid.NOISES))
    assert len({c["name"] for c in cells}) == len(cells)  # every name once: each is its own experiment
    lts = next(c for c in cells if c["name"] == "grid-embedded-c0.3-lts-s1")
    # 0.3 of 160 normal slabs needs 69 anomalous ones, more than params.yaml's 48: the cell asks for them
    assert lts["set"] == ["data.contamination=0.3", "robust.loss=lts", "seed=1", "synth.n_train_anomalous=69"]
    c01 = next(c for c in cells if c["name"] == "grid-embedded-c0.1-huber-s0")
    assert c01["set"] == ["data.contamination=0.1", "robust.loss=huber", "seed=0"]  # the default data
    assert lts["targets"] == ["evaluate@ddpm", "evaluate@rddpm"]  # ddpm: the MSE baseline, same data
    simplex = next(c for c in cells if c["name"] == "grid-embedded-simplex-s0")
    assert simplex["set"] == ["ddpm.noise=simplex", "seed=0"] and simplex["methods"] == ["ddpm"]
    some = grid.cells("embedded", [0], [0.3], ["huber"])  # a part of the grid: --contamination 0.3 --losses huber
    assert [c["name"] for c in some] == ["grid-embedded-c0.3-huber-s0", "grid-embedded-simplex-s0"]
    assert [c["name"] for c in grid.cells("embedded", [0], [])] == ["grid-embedded-simplex-s0"]  # --contamination
    assert [c["name"] for c in grid.cells("embedded", [0], [0.3], ["huber"], [])] == ["grid-embedded-c0.3-huber-s0"]


def _fake_metrics(ref, method):
    seed, c = int(ref[-1]), float(ref.split("-c")[1].split("-")[0]) if "-c" in ref else 0.1
    base = 0.9 - c / 2 if method == "ddpm" else 0.9 - c / 4  # a robust loss that holds up
    if "simplex" in ref:
        base = 0.95
    v = base + 0.01 * seed
    return {"pixel_auroc": v, "pixel_ap": v - 0.5, "aupro": v - 0.1, "image_auroc": v - 0.2,
            "per_defect": {"crack": {"pixel_auroc": v}}}


def test_report_writes_table_json_and_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(grid, "_exp_ref", lambda name: "refs/exps/x/" + name)
    monkeypatch.setattr(grid, "_read_metrics", _fake_metrics)
    args = argparse.Namespace(category=None, seeds=[0, 1], contamination=grid.CONTAMINATION, out_dir=tmp_path, plot_dir=tmp_path)
    grid.report(args)
    rows = pd.read_json(tmp_path / "grid_embedded.json")
    assert len(rows) == 2 * (8 * 2 + 1)  # two methods a loss cell, one a noise cell
    md = (tmp_path / "grid_embedded.md").read_text()
    # contamination 0.3: MSE 0.75 and 0.76 -> mean 0.755 (range); huber 0.825/0.835
    assert "0.755 (0.750-0.760)" in md and "0.830 (0.825-0.835)" in md
    assert "simplex" in md and "0.955 (0.950-0.960)" in md  # the noise table, with per-family columns
    assert "pixel_auroc_crack" in md
    with Image.open(tmp_path / "grid_contamination_embedded.png") as im:
        assert im.size[0] > 400


def test_report_without_experiments_says_what_to_run(tmp_path, monkeypatch):
    def missing(name):
        raise SystemExit("no ref")
    monkeypatch.setattr(grid, "_exp_ref", missing)
    monkeypatch.setattr(grid, "_committed_default", lambda *a: [])  # nor a committed default run
    monkeypatch.setattr(grid, "_recorded_default", lambda *a: [])  # nor one another benchmark kept
    args = argparse.Namespace(category=None, seeds=[0], contamination=grid.CONTAMINATION, out_dir=tmp_path, plot_dir=tmp_path)
    with pytest.raises(SystemExit, match="experiments/grid.py run"):
        grid.report(args)


def test_only_this_grids_failures_count():
    status = ("Task     Name                         Created       Status\n"
              "4f8067d  grid-embedded-c0.1-huber-s0  Nov 28, 2026  Failed\n"
              "530008c  grid-embedded-simplex-s0     01:21 AM      Success\n\nWorker status: 0 active, 0 idle\n")
    assert grid._failed(status, {"grid-embedded-simplex-s0"}) == []  # yesterday's failure is not this run's
    assert grid._failed(status, {"grid-embedded-c0.1-huber-s0"}) == ["grid-embedded-c0.1-huber-s0"]
    # the same name failed in an earlier try and succeeded in this one: only this try's task counts
    again = status.replace("Nov 28, 2026  Failed", "Nov 28, 2026  Failed\n9a8b7c6  grid-embedded-c0.1-huber-s0  02:00 AM      Success")
    assert grid._tasks(again) == {"4f8067d", "530008c", "9a8b7c6"}
    assert grid._failed(again, {"grid-embedded-c0.1-huber-s0"}, old={"4f8067d", "530008c"}) == []


def test_the_committed_run_is_the_default_cell_only_when_its_params_are(monkeypatch):
    import yaml

    read = []
    monkeypatch.setattr(grid, "_read_metrics", lambda ref, method: read.append(ref) or _fake_metrics("x-s1", method))
    params = yaml.safe_load((Path(grid.ROOT) / "params.yaml").read_text())
    params.update(seed=1)
    params["data"].update(source="synthetic", contamination=0.1)
    params["robust"]["loss"], params["ddpm"]["noise"] = "huber", "gaussian"
    rows = grid._committed_default("embedded", [0, 1], set(), params)
    assert [(r["method"], r["loss"], r["seed"], r["experiment"]) for r in rows] == \
        [("ddpm", "mse", 1, "HEAD (dvc repro)"), ("rddpm", "huber", 1, "HEAD (dvc repro)")]
    assert read == ["HEAD", "HEAD"]  # the committed metrics/<method>.json
    assert grid._committed_default("embedded", [0, 1], {"grid-embedded-c0.1-huber-s1"}, params) == []  # it ran
    assert grid._committed_default("embedded", [0], set(), params) == []  # another seed
    assert grid._committed_default("moon", [1], set(), params) == []  # another data set
    params["robust"]["loss"] = "lts"
    assert grid._committed_default("embedded", [1], set(), params) == []  # not the default cell


def test_recorded_default_runs_fill_seeds_the_grid_did_not_run(tmp_path):
    from anodiff import io

    per_seed = [dict(_fake_metrics("x-s0", "ddpm"), seed=0), dict(_fake_metrics("x-s2", "ddpm"), seed=2)]
    io.write_json(tmp_path / "realphoto.json", {"moon": {"ddpm": {"per_seed": per_seed},
                                                        "rddpm": {"per_seed": [dict(p, pixel_ap=0.1) for p in per_seed]}}})
    kept = dict(realphoto=tmp_path / "realphoto.json", results=tmp_path)
    rows = grid._recorded_default("moon", [0, 1, 2], {"grid-moon-c0.1-huber-s2"}, **kept)
    # seed 2's default cell ran in the grid, seed 1 was never recorded: only seed 0, both methods
    assert [(r["method"], r["loss"], r["seed"], r["contamination"]) for r in rows] == \
        [("ddpm", "mse", 0, 0.1), ("rddpm", "huber", 0, 0.1)]
    assert rows[1]["pixel_ap"] == 0.1 and rows[0]["experiment"] == "bench/realphoto.json"
    assert grid._recorded_default("hubble", [0], set(), **kept) == []  # no such category there
    (tmp_path / "gan_vs_ddpm").mkdir()
    io.write_json(tmp_path / "gan_vs_ddpm" / "marble_s1.json", {"ddpm": _fake_metrics("x-s1", "ddpm")})
    rows = grid._recorded_default("embedded", [0, 1], set(), **kept)
    assert [(r["method"], r["seed"], r["experiment"]) for r in rows] == \
        [("ddpm", 1, "experiments/results/gan_vs_ddpm/marble_s1.json")]


def test_deltas_pair_each_variant_with_its_baseline_of_the_same_seed():
    def row(exp, seed, c, loss, noise, v):
        return dict(experiment=exp, seed=seed, contamination=c, loss=loss, noise=noise, method="ddpm" if loss == "mse" else "rddpm",
                    pixel_auroc=v, pixel_ap=v, aupro=v, image_auroc=v)
    loss_rows = pd.DataFrame([row("a", 0, 0.2, "mse", "gaussian", 0.5), row("a", 0, 0.2, "huber", "gaussian", 0.6),
                              row("b", 1, 0.2, "mse", "gaussian", 0.7), row("b", 1, 0.2, "huber", "gaussian", 0.6),
                              row("c", 2, 0.2, "huber", "gaussian", 0.9)])  # no mse of run c: unpaired, left out
    noise_rows = pd.DataFrame([row("d", 0, 0.1, "mse", "gaussian", 0.5), row("e", 0, 0.1, "mse", "simplex", 0.45),
                               row("f", 1, 0.1, "mse", "simplex", 0.1)])  # seed 1 has no Gaussian run: left out
    d = grid.deltas(loss_rows, noise_rows)
    assert d["difference"].tolist() == ["huber - mse", "simplex - gaussian"]
    assert d.iloc[0]["pixel_ap"] == "+0.000 (-0.100 to +0.100)" and d.iloc[0]["seeds"] == "0,1"
    assert d.iloc[1]["pixel_auroc"] == "-0.050" and d.iloc[1]["seeds"] == "0"
