"""The session's tiny end-to-end run of the real pipeline with DVC, in a temporary git repo
(conftest.workflow_repo, shared with test_dvc_workflow.py and the determinism check).

Tiny params (.ci/params-tiny.yaml: 32 px, a UNet of width 8, one epoch) keep it to a minute or
two on 2 CPU cores; the point is the wiring: every stage runs, every metrics key is written, the
pipeline is clean afterwards, `gan.lr` reruns only the GAN branch, a typo'd key is refused. That
the same params give the same bytes is test_reliability.py's determinism check.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest

from conftest import back_to_the_committed_run
# the tiny profile and its script; TINY_SCRIPT, PROFILE and merge are the CI workflow's (test_ci_workflow.py)
from tinyrepo import PROFILE, TINY_SCRIPT, sh, tiny_params  # noqa: F401

# quality figures only: seconds_per_image is in metrics/timing/infer_<method>.json (test_dvc_workflow.py)
KEYS = {"pixel_auroc", "pixel_ap", "aupro", "pixel_f1_max", "dice", "image_auroc", "image_ap",
        "n_test_images", "per_defect"}
TINY = tiny_params.load_profile(PROFILE)
merge = tiny_params.merge


@pytest.fixture(scope="module")
def repo(workflow_repo):
    """The session's tiny reproduced repository (conftest.py), as committed after its repro; the
    tests below run in this order on it, the last leaving an experiment's results."""
    d, _ = workflow_repo
    back_to_the_committed_run(d)
    return d


def test_every_method_writes_every_metrics_key(repo):
    for method in ("ddpm", "rddpm", "gan", "patchcore"):
        result = json.loads((repo / f"metrics/{method}.json").read_text())
        assert KEYS <= set(result), method
        assert result["n_test_images"] == 10
        assert set(result["per_defect"]) == {"crack", "dot"}
        for key in ("pixel_auroc", "aupro", "image_auroc"):
            assert result[key] is not None and 0.0 <= result[key] <= 1.0, (method, key)
    summary = (repo / "metrics/summary.md").read_text()
    assert "| gan " in summary and "| patchcore " in summary
    for f in ("plots/ddpm/overlays.png", "plots/gan/roc.csv", "plots/pretrain_ddpm/loss.tsv",
              "plots/train_gan_noise/gen_loss.tsv", "metrics/train_robust_ddpm.json", "plots/prepare_samples.png"):
        assert (repo / f).stat().st_size > 0, f


def test_infer_records_the_calibration_chosen_on_val(repo):
    from anodiff import anomaly
    from anodiff.config import accelerated

    for method in ("ddpm", "rddpm", "gan"):
        chosen = json.loads((repo / f"metrics/infer_{method}.json").read_text())
        kind, memory = anomaly.split_kind(chosen["map_calibration"])
        assert kind in anomaly.CALIBRATIONS, method
        assert chosen["map_sources"] == ("reconstruction+memory" if memory else "reconstruction")
        assert anomaly.split_kind(chosen["score_calibration"])[0] in anomaly.CALIBRATED, method  # never self-standardised
        meta = json.loads((repo / f"data/maps/{method}/meta.json").read_text())
        assert meta["calibration"] == {"map": chosen["map_calibration"], "score": chosen["score_calibration"]}
        # precision recorded as resolved on this machine (not `auto`): predict draws the same maps anywhere
        assert meta["settings"]["amp"] is accelerated("auto", "cpu", precision=True)
        # every fused candidate was judged on val beside the reconstruction-only ones
        assert {"texture+memory", "mahalanobis+memory", "pixel"} <= set(meta["selection"])
        table = meta["selection"]  # every candidate's val figures; the winner has the best criterion
        best = max(row["map_criterion"] for row in table.values())
        assert table[chosen["map_calibration"]]["map_criterion"] == best
        assert chosen["val_map_criterion"] == pytest.approx(best, abs=1e-6)
    assert json.loads((repo / "metrics/infer_patchcore.json").read_text())["map_sources"] == "memory"


@pytest.mark.parametrize("method", ["ddpm", "patchcore"])
def test_predict_gives_the_scores_and_verdicts_infer_and_evaluate_measured(repo, tmp_path, method):
    """The same test image scored by `anodiff predict`, alone and in another order, gets infer's score."""
    import pandas as pd

    scores = pd.read_csv(repo / f"data/maps/{method}/scores.csv")
    test = scores[scores["split"] == "test"].iloc[::-1].reset_index(drop=True)  # another order and batching
    files = [str(repo / "data/prepared" / p) for p in test["path"]]
    sh("anodiff", "predict", "--method", method, "--out", str(tmp_path / "out"), "--quiet", *files, cwd=repo)
    got = pd.read_csv(tmp_path / "out/predictions.csv")
    assert got["score"].to_numpy() == pytest.approx(test["score"].to_numpy(), abs=2e-5)
    threshold = json.loads((repo / f"metrics/{method}.json").read_text())["thresholds"]["image"]
    assert list(got["anomalous"]) == list(test["score"] >= threshold)


def test_infer_gan_shares_ddpms_levels_and_gets_the_bytes_it_would_compute(repo, tmp_path):
    """infer@gan takes the levels its generator leaves alone from infer@ddpm (--share): the maps,
    scores and choice are exactly those of computing every level itself, and its timing says so."""
    import numpy as np

    timing = json.loads((repo / "metrics/timing/infer_gan.json").read_text())
    assert timing["shared_levels"] == [200] and timing["shared_from"] == "infer@ddpm"
    assert timing["shared_seconds_estimate"] > 0
    d = tmp_path / "copy"
    shutil.copytree(repo, d, ignore=shutil.ignore_patterns("cache", "tmp"))
    res = sh("python", "stages/infer.py", "--method", "gan", "--model", "data/models/ddpm.pt", "--noise-from",
             "data/models/gan_generator.pt", "--memory", "data/maps/patchcore", "--share", "data/models/ddpm.pt",
             cwd=d)
    assert "shared" not in json.loads((d / "metrics/timing/infer_gan.json").read_text())
    shared = np.load(repo / "data/maps/gan/maps.npz")
    computed = np.load(d / "data/maps/gan/maps.npz")
    assert set(shared.files) == set(computed.files)
    for key in shared.files:
        assert np.array_equal(shared[key], computed[key]), key
    assert (repo / "data/maps/gan/scores.csv").read_bytes() == (d / "data/maps/gan/scores.csv").read_bytes()
    assert (repo / "metrics/infer_gan.json").read_bytes() == (d / "metrics/infer_gan.json").read_bytes(), res.stdout


def test_tiny_run_holds_the_ci_baseline(repo):
    """The figures CI compares against (.ci/baseline/metrics, the tiny profile's committed run) are
    this code's: a change that moves them fails here first (regenerate the baseline on purpose:
    docs/reproducibility.md)."""
    import subprocess
    import sys

    from tinyrepo import ROOT

    res = subprocess.run([sys.executable, str(ROOT / ".ci/check_regression.py"), "--baseline",
                          str(ROOT / ".ci/baseline/metrics"), "--current", str(repo / "metrics")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_training_curves_are_dvclive_files(repo):
    """Each training stage logs its curves with DVCLive (stages/_live.py): one `<metric>.tsv` per
    metric under plots/<stage>/ (columns step and the metric, no timestamp), its summary to
    metrics/train_<stage>.json with Live's `step`; no dvclive/ folder, dvc.yaml or report of its own."""
    for stage in ("pretrain_ddpm", "train_robust_ddpm"):
        summary = json.loads((repo / f"metrics/train_{stage.removeprefix('train_')}.json").read_text())
        assert summary["step"] == summary["steps"] > 0 and {"final_loss", "n_train", "n_anomalous"} <= set(summary)
        assert sorted(p.name for p in (repo / f"plots/{stage}").iterdir()) == ["epoch.tsv", "loss.tsv"]
        lines = (repo / f"plots/{stage}/loss.tsv").read_text().splitlines()
        assert lines[0] == "step\tloss" and len(lines) == 1 + summary["steps"]
        assert [int(line.split("\t")[0]) for line in lines[1:]] == list(range(1, summary["steps"] + 1))
        last_epoch = [float(v.split("\t")[1]) for v in lines[1:]]  # one epoch in the tiny profile
        assert summary["final_loss"] == pytest.approx(sum(last_epoch) / len(last_epoch), abs=1e-6)
    gan = repo / "plots/train_gan_noise"
    assert {p.name for p in gan.glob("*.tsv")} == {"critic_loss.tsv", "wasserstein.tsv", "grad_norm.tsv",
                                                   "gen_loss.tsv", "mse.tsv"}
    summary = json.loads((repo / "metrics/train_gan_noise.json").read_text())
    header = (gan / "selection/map_criterion.tsv").read_text().splitlines()
    assert header[0] == "step\tmap_criterion" and len(header) == 1 + summary["candidates"]
    assert (gan / "selection/map_calibration.tsv").is_file()  # the calibration each candidate chose
    for f in repo.rglob("*"):
        if ".dvc" in f.parts or ".git" in f.parts:
            continue
        assert f.name not in ("dvclive", "report.html", "report.md") and not (f.name == "dvc.yaml" and f.parent != repo), f
        if f.suffix == ".tsv":
            assert "timestamp" not in f.read_text().splitlines()[0], f


def test_pipeline_is_clean_after_repro(repo):
    assert json.loads(sh("dvc", "status", "--json", cwd=repo).stdout) == {}


def test_training_stages_run_under_torchrun_from_the_environment(repo, tmp_path):
    """ANODIFF_NPROC=2: each training stage re-launches itself under torchrun (two gloo ranks), rank
    0 alone speaks and writes, and what it writes loads (the unit tests of anodiff.distributed check
    that the weights are a one-process run's). On a copy of the reproduced repository."""
    from anodiff import checkpoint
    from anodiff.noisegen import NoiseGenerator
    from anodiff.unet import UNet

    d = tmp_path / "copy"
    shutil.copytree(repo, d, ignore=shutil.ignore_patterns("cache", "tmp"))
    for stage, out, cls in (("pretrain_ddpm", "data/models/ddpm.pt", UNet),
                            ("train_gan_noise", "data/models/gan_generator.pt", NoiseGenerator)):
        (d / out).unlink()
        res = sh("python", f"stages/{stage}.py", cwd=d, env={"ANODIFF_NPROC": "2", "ANODIFF_THREADS": "1"})
        said = res.stdout + res.stderr
        assert said.count(f"{stage}: done in") == 1, said[-2000:]
        assert len(re.findall(rf"^{stage}: .*(final loss|kept step)", res.stdout, re.M)) == 1, said[-2000:]
        checkpoint.load(d / out, cls)
    assert "selected_step" in json.loads((d / "metrics/train_gan_noise.json").read_text())


def test_typo_in_params_is_refused_naming_the_key(repo):
    # DVC 3.67 itself refuses to override a key that params.yaml lacks ...
    res = sh("dvc", "exp", "run", "-S", "data.imagesize=64", cwd=repo, check=False)
    assert res.returncode != 0 and "data.imagesize" in res.stdout + res.stderr
    # ... and when the key is forced in (`+key=`, or an edited params.yaml), prepare refuses it
    res = sh("dvc", "exp", "run", "-S", "+data.imagesize=64", cwd=repo, check=False)
    sh("git", "checkout", "params.yaml", cwd=repo)
    # DVC removed prepare's outputs before the failing run: put them back (same bytes, so nothing downstream reruns)
    again = sh("dvc", "repro", cwd=repo)
    assert "Running stage 'prepare'" in again.stdout + again.stderr
    assert res.returncode != 0
    assert "error: params.yaml: data.imagesize: unknown key" in res.stdout + res.stderr


def test_gan_lr_reruns_only_the_gan_branch(repo):
    """Last in the file: it leaves an experiment's results in the workspace."""
    res = sh("dvc", "exp", "run", "-S", "gan.lr=0.0001", "-S", "gan.eval_every=0", cwd=repo)
    ran = set(re.findall(r"Running stage '([^']+)'", res.stdout + res.stderr))
    assert ran == {"train_gan_noise", "infer@gan", "evaluate@gan", "report"}
    # model selection off: no candidate, so no selection curve; the training curves are there
    assert not (repo / "plots/train_gan_noise/selection").exists()
    assert (repo / "plots/train_gan_noise/gen_loss.tsv").read_text().startswith("step\tgen_loss\n")
    assert "candidates" not in json.loads((repo / "metrics/train_gan_noise.json").read_text())
