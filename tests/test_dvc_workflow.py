"""What a user does with DVC, in a tiny temporary git repo (the approach of test_pipeline.py):

- the `metrics:` files hold quality figures only, timing goes to metrics/timing/ (not a DVC metric;
  that `dvc repro -f` then gives an empty `dvc metrics diff` is test_reliability.py's determinism check);
- no library warning reaches the user;
- a grid of two experiments queued and run with `dvc queue start -j 2` gives the same metrics as
  the same two run one by one with `dvc exp run`;
- `dvc exp run -S gan.lr=5e-5`: DVC writes `5e-05` into params.yaml and the stage reads it as a float.

Tiny params (.ci/params-tiny.yaml: 32 px, one epoch; here also one noise level and one draw) keep
the whole file to a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import re
import time

import pytest
import yaml

from tinyrepo import BIN, sh

TIMING_KEYS = {"seconds", "seconds_per_image", "images_per_s", "device"}
TIMING_FILES = ("pretrain_ddpm", "train_robust_ddpm", "train_gan_noise", "infer_ddpm", "infer_rddpm", "infer_gan")


@pytest.fixture
def repo(workflow_repo):
    """The repository's tracked files with tiny params, reproduced once and committed (conftest.py)."""
    return workflow_repo


def test_no_library_warning_reaches_the_user(repo):
    _, log = repo
    bad = [line for line in log.splitlines() if "Warning" in line or "not writable" in line]
    assert not bad, bad


def test_timing_is_out_of_the_metrics_files(repo):
    d, _ = repo
    for name in TIMING_FILES:
        timing = json.loads((d / f"metrics/timing/{name}.json").read_text())
        assert TIMING_KEYS & set(timing) and timing["device"] == "cpu", name
    shown = json.loads(sh("dvc", "metrics", "show", "--json", cwd=d).stdout)
    files = {path: entry["data"] for rev in shown.values() for path, entry in rev["data"].items()}
    assert files and not any(p.startswith("metrics/timing") for p in files)

    def keys(obj):
        return set(obj) | {k for v in obj.values() if isinstance(v, dict) for k in keys(v)} \
            if isinstance(obj, dict) else set()

    for path, data in files.items():
        assert not keys(data) & TIMING_KEYS, path
    # the report shows the speed beside, not inside, the quality table (which is then reproducible to the byte)
    assert "seconds_per_image" not in (d / "metrics/summary.md").read_text()
    speed = (d / "metrics/timing/summary.md").read_text()
    assert "seconds_per_image" in speed and "pretrain_ddpm + train_gan_noise" in speed and "threads" in speed


def test_run_sh_repro_ends_with_the_summary(repo):
    """`./run.sh repro` prints metrics/summary.md (the methods side by side) at the end, not the
    40-column `dvc metrics show`. Its .venv here is this interpreter (run.sh installs nothing)."""
    d, _ = repo
    venv = d / ".venv" / "bin"  # .venv is gitignored
    venv.mkdir(parents=True, exist_ok=True)
    for name in ("python", "dvc"):
        (venv / name).write_text(f'#!/bin/sh\nexec "{BIN / name}" "$@"\n')
        (venv / name).chmod(0o755)
    stamp = sh("sh", "-c", "sha256sum requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1", cwd=d).stdout
    (d / ".venv" / ".requirements.sha256").write_text(stamp)
    res = sh("./run.sh", "repro", cwd=d)
    summary = (d / "metrics/summary.md").read_text()
    assert res.stdout.rstrip().endswith(summary.rstrip())
    assert "Path" not in res.stdout  # `dvc metrics show`'s header


def exp_results(d, names):
    """{experiment name: (its metrics/train_gan_noise.json, its dvc.lock record of train_gan_noise's
    non-timing outputs)}, read from the git commit of each experiment (refs/exps/.../<name>)."""
    refs = sh("git", "for-each-ref", "--format=%(refname)", "refs/exps", cwd=d).stdout.split()
    found = {}
    for name in names:
        (ref,) = [r for r in refs if r.rsplit("/", 1)[-1] == name]
        lock = yaml.safe_load(sh("git", "show", f"{ref}:dvc.lock", cwd=d).stdout)["stages"]["train_gan_noise"]
        outs = {o["path"]: o["md5"] for o in lock["outs"] if not o["path"].startswith("metrics/timing/")}
        found[name] = (json.loads(sh("git", "show", f"{ref}:metrics/train_gan_noise.json", cwd=d).stdout), outs)
    return found


def test_queued_grid_gives_the_metrics_of_runs_one_by_one(repo):
    """A grid of two experiments queued and run side by side (`ANODIFF_THREADS=1 dvc queue start -j 2`,
    each in its own copy of the repository) gives exactly what the same two give run one by one with
    `dvc exp run` in the workspace: the GAN's metrics, its curves and the generator's bytes (what
    infer@gan and evaluate@gan compute from, deterministically: test_pipeline.py). The grid is on
    `gan.lr` and runs to train_gan_noise only, to keep this test short. Leaves the workspace at an
    experiment's results."""
    d, _ = repo
    threads = {"ANODIFF_THREADS": "1"}
    grid = {"a": "gan.lr=0.0002", "b": "gan.lr=0.0004"}
    for name, value in grid.items():
        sh("dvc", "exp", "run", "--queue", "-n", f"queued-{name}", "-S", value, "train_gan_noise", cwd=d, env=threads)
    sh("dvc", "queue", "start", "-j", "2", cwd=d, env=threads)
    deadline, polls = time.monotonic() + 600, 0

    def collected():  # git alone, cheap: the two jobs have the 2 cores to themselves
        refs = sh("git", "for-each-ref", "--format=%(refname)", "refs/exps", cwd=d).stdout.split()
        return {r.rsplit("/", 1)[-1] for r in refs} >= {f"queued-{name}" for name in grid}

    while not collected():
        polls += 1
        if polls % 15 == 0 or time.monotonic() > deadline:  # a failed task never gets its ref
            status = sh("dvc", "queue", "status", cwd=d).stdout
            if "Failed" in status or time.monotonic() > deadline:
                logs = [sh("dvc", "queue", "logs", f"queued-{n}", cwd=d, check=False).stdout[-3000:] for n in grid]
                raise AssertionError(status + "\n".join(logs))
        time.sleep(1)
    for name, value in grid.items():
        sh("dvc", "exp", "run", "-n", f"one-{name}", "-S", value, "train_gan_noise", cwd=d, env=threads)
    found = exp_results(d, [f"{kind}-{name}" for kind in ("queued", "one") for name in grid])
    for name in grid:
        (queued, queued_outs), (one, one_outs) = found[f"queued-{name}"], found[f"one-{name}"]
        assert {"val_map_criterion", "gen_loss", "wasserstein"} <= set(one)
        assert queued == one, name
        assert set(one_outs) == {"data/models/gan_generator.pt", "plots/train_gan_noise", "metrics/train_gan_noise.json"}
        assert queued_outs == one_outs, name
    assert found["one-a"][0] != found["one-b"][0]  # the grid's two points differ


def test_exp_run_with_a_small_float(repo):
    """DVC writes 5e-05 (YAML 1.2); PyYAML alone would read it as a string, and the stage would
    refuse it ("is not a number")."""
    d, _ = repo
    res = sh("dvc", "exp", "run", "-S", "gan.lr=5e-5", "train_gan_noise", cwd=d)
    assert "Running stage 'train_gan_noise'" in res.stdout + res.stderr
    assert re.search(r"^\s+lr: 5e-05\b", (d / "params.yaml").read_text(), re.M)
    import torch

    meta = torch.load(d / "data/models/gan_generator.pt", map_location="cpu", weights_only=True)["meta"]
    assert meta["gan"]["lr"] == 5e-5
