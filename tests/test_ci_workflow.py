"""The GitHub Actions workflow (.github/workflows/ci.yml) runs what the test suite runs.

Its test step is the README's test command; its tiny-profile step merges the same profile file with
the same script that tests/test_pipeline.py uses (and that step, run here on a copy of params.yaml,
gives params that `anodiff.config.load_params` accepts). Fast: no DVC run here, test_pipeline.py
already runs the pipeline on the tiny profile.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# pytest's default (prepend) import mode puts tests/ on sys.path: the module the suite runs
import test_pipeline

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


@pytest.fixture(scope="module")
def steps(workflow) -> list[dict]:
    (job,) = workflow["jobs"].values()
    return job["steps"]


def runs(steps) -> list[str]:
    return [s["run"].strip() for s in steps if "run" in s]


def step_running(steps, pattern: str) -> tuple[int, dict]:
    """The one step whose `run` matches `pattern` (regex), with its index."""
    found = [(i, s) for i, s in enumerate(steps) if "run" in s and re.search(pattern, s["run"])]
    assert len(found) == 1, f"expected one step running {pattern!r}, found {len(found)}"
    return found[0]


def readme_test_command() -> str:
    """The test command in the README's "Two commands" section (the one CI runs)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.strip() for line in block.splitlines() if line.strip().startswith("./run.sh test")]
    assert len(commands) == 1, commands
    return commands[0]


def tiny_step_args(steps) -> tuple[str, list[str]]:
    """The tiny-profile step's command: (interpreter, arguments after it)."""
    _, step = step_running(steps, r"tiny_params\.py")
    (line,) = step["run"].strip().splitlines()
    python, *args = shlex.split(line)
    return python, args


def test_triggers_and_environment(workflow):
    on = workflow.get("on", workflow.get(True))  # PyYAML (YAML 1.1) reads a bare `on` key as True
    assert set(on) == {"push", "pull_request"}
    assert str(workflow["env"]["DVC_NO_ANALYTICS"]) == "1"
    (job,) = workflow["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"


def test_checkout_has_full_history_and_python_is_311(steps):
    checkout = next(s for s in steps if s.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["fetch-depth"] == 0  # `main` must exist for `dvc metrics diff main`
    python = next(s for s in steps if s.get("uses", "").startswith("actions/setup-python@"))
    assert python["with"]["python-version"] == "3.11"  # a string: YAML's 3.10 would be 3.1
    assert steps.index(checkout) < steps.index(python) < min(i for i, s in enumerate(steps) if "run" in s)


def test_install_is_pip_from_requirements_via_run_sh(steps):
    i_setup, _ = step_running(steps, r"^\./run\.sh setup$")
    # run.sh's `setup` is the pip install of requirements.txt that `./run.sh test` would do itself
    run_sh = (ROOT / "run.sh").read_text()
    assert re.search(r"^\s*setup\)", run_sh, re.M)
    assert "pip install" in run_sh and "-r requirements.txt" in run_sh
    i_test, _ = step_running(steps, r"run\.sh test")
    assert i_setup < i_test


def test_test_step_is_the_readme_test_command(steps):
    _, step = step_running(steps, r"run\.sh test")
    assert step["run"].strip() == readme_test_command() == "./run.sh test"


def test_tiny_step_uses_the_profile_and_script_test_pipeline_uses(steps):
    python, args = tiny_step_args(steps)
    assert python == ".venv/bin/python"  # the environment run.sh set up
    script, params, flag, profile = args
    assert ROOT / script == test_pipeline.TINY_SCRIPT
    assert (flag, ROOT / profile) == ("--profile", test_pipeline.PROFILE)
    assert params == "params.yaml"  # in place: the workspace's params.yaml
    # and test_pipeline.py's merge and profile are that script's and that file's
    assert test_pipeline.tiny_params.__file__ == str(test_pipeline.TINY_SCRIPT)
    assert test_pipeline.merge is test_pipeline.tiny_params.merge
    assert test_pipeline.TINY == yaml.safe_load(test_pipeline.PROFILE.read_text())


def test_order_tests_then_tiny_profile_then_repro_then_summary(steps):
    i_test, _ = step_running(steps, r"run\.sh test")
    i_tiny, _ = step_running(steps, r"tiny_params\.py")
    i_repro, repro = step_running(steps, r"(run\.sh|dvc) repro")
    i_diff, diff = step_running(steps, r"dvc metrics diff")
    i_check, check = step_running(steps, r"check_regression\.py")
    assert i_test < i_tiny < i_repro < i_diff < i_check
    assert repro["run"].strip() in ("./run.sh repro", "dvc repro", ".venv/bin/dvc repro")
    assert re.search(r'dvc metrics diff "\$\(\.ci/baseline_rev\.sh\)" --md >> "\$GITHUB_STEP_SUMMARY"', diff["run"])
    assert "--baseline .ci/baseline/metrics --current metrics" in check["run"]


def test_downloads_nothing_but_packages(steps):
    text = "\n".join(runs(steps)) + "\n" + (ROOT / "requirements.txt").read_text()
    for word in ("index-url", "find-links", "curl ", "wget ", "dvc pull", "dvc fetch", "dvc import", "dvc get"):
        assert word not in text, word


def test_tiny_step_run_on_a_copy_gives_valid_params(steps, tmp_path):
    from anodiff.config import load_params

    _, step = step_running(steps, r"tiny_params\.py")
    (tmp_path / ".ci").mkdir()
    for f in (test_pipeline.TINY_SCRIPT, test_pipeline.PROFILE):
        (tmp_path / ".ci" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "params.yaml").write_bytes((ROOT / "params.yaml").read_bytes())
    # the step's own command line, its .venv/bin/python being this interpreter
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    (venv / "python").chmod(0o755)
    res = subprocess.run(["bash", "-eo", "pipefail", "-c", step["run"]], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr

    params = load_params(tmp_path / "params.yaml")
    assert params.data.image_size == 32 and params.ddpm.epochs == 1 and params.gan.n_blocks == 1
    assert params.ddpm.channel_mults in ([1, 2], (1, 2))
    # the same params the tests' tiny repository gets (tinyrepo.make, conftest.workflow_repo)
    expected = test_pipeline.merge(yaml.safe_load((ROOT / "params.yaml").read_text()), test_pipeline.TINY)
    assert yaml.safe_load((tmp_path / "params.yaml").read_text()) == expected
    assert (tmp_path / "params.yaml").read_text() == test_pipeline.tiny_params.dump(expected)


def test_every_profile_key_is_in_params_yaml():
    def keys(d, prefix=""):
        for k, v in d.items():
            yield from keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]

    params = set(keys(yaml.safe_load((ROOT / "params.yaml").read_text())))
    assert set(keys(test_pipeline.TINY)) <= params


def test_merge_refuses_an_unknown_key_naming_it(tmp_path):
    tiny = test_pipeline.tiny_params
    with pytest.raises(tiny.ProfileError, match=r"^ddpm\.epochz: unknown key .*allowed under ddpm: .*epochs"):
        tiny.merge({"ddpm": {"epochs": 60}}, {"ddpm": {"epochz": 1}})
    with pytest.raises(tiny.ProfileError, match=r"^data: is a section"):
        tiny.merge({"data": {"image_size": 64}}, {"data": 32})
    assert tiny.merge({"a": {"b": 1, "c": 2}, "d": [1]}, {"a": {"b": 3}, "d": []}) == {"a": {"b": 3, "c": 2}, "d": []}

    # the script: exit 1, the key named, params.yaml left as it was
    (tmp_path / "params.yaml").write_text("ddpm:\n  epochs: 60\n")
    (tmp_path / "bad.yaml").write_text("ddpm:\n  epochz: 1\n")
    res = subprocess.run([sys.executable, str(test_pipeline.TINY_SCRIPT), "params.yaml", "--profile", "bad.yaml"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 1
    assert "error: bad.yaml: ddpm.epochz: unknown key" in res.stderr
    assert (tmp_path / "params.yaml").read_text() == "ddpm:\n  epochs: 60\n"


# ------------------------------------------------------------------ the regression check
def _check(*args):
    return subprocess.run([sys.executable, str(ROOT / ".ci/check_regression.py"), *args],
                          capture_output=True, text=True)


def test_baseline_is_committed_for_every_method():
    import json

    for method in ("ddpm", "rddpm", "gan", "patchcore"):
        m = json.loads((ROOT / f".ci/baseline/metrics/{method}.json").read_text())
        assert m["pixel_auroc"] is not None and m["image_auroc"] is not None


def test_regression_check_fails_on_a_worsened_metric_and_passes_otherwise(tmp_path):
    import json
    import shutil

    base = ROOT / ".ci/baseline/metrics"
    cur = tmp_path / "metrics"
    shutil.copytree(base, cur)
    same = _check("--baseline", str(base), "--current", str(cur))
    assert same.returncode == 0, same.stderr
    assert "| ddpm | image_auroc |" in same.stdout  # the Markdown table for the job summary

    m = json.loads((cur / "ddpm.json").read_text())
    m["aupro"] -= 0.04  # within the tolerance (0.05): passes
    (cur / "ddpm.json").write_text(json.dumps(m))
    assert _check("--baseline", str(base), "--current", str(cur)).returncode == 0
    m["aupro"] -= 0.03  # 0.07 below the baseline: fails, naming the method and the metric
    (cur / "ddpm.json").write_text(json.dumps(m))
    worse = _check("--baseline", str(base), "--current", str(cur))
    assert worse.returncode == 1 and "ddpm aupro" in worse.stderr

    g = json.loads((cur / "gan.json").read_text())
    g["image_auroc"] = None  # a figure that vanished is a regression too
    (cur / "gan.json").write_text(json.dumps(g))
    assert "gan image_auroc" in _check("--baseline", str(base), "--current", str(cur)).stderr
    assert _check("--baseline", str(tmp_path / "none"), "--current", str(cur)).returncode == 2


def test_baseline_revision_holds_the_baseline_and_leaves_the_work_tree_alone(tmp_path):
    import shutil

    from tinyrepo import sh

    (tmp_path / ".ci").mkdir()
    shutil.copy2(ROOT / ".ci/baseline_rev.sh", tmp_path / ".ci/baseline_rev.sh")
    shutil.copytree(ROOT / ".ci/baseline", tmp_path / ".ci/baseline")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/ddpm.json").write_text("{}")
    sh("git", "init", "-q", cwd=tmp_path)
    sh("git", "add", "-A", cwd=tmp_path)
    sh("git", "commit", "-qm", "x", cwd=tmp_path)
    rev = sh("bash", ".ci/baseline_rev.sh", cwd=tmp_path).stdout.strip()
    shown = sh("git", "show", f"{rev}:metrics/ddpm.json", cwd=tmp_path).stdout
    assert shown == (ROOT / ".ci/baseline/metrics/ddpm.json").read_text()
    assert (tmp_path / "metrics/ddpm.json").read_text() == "{}"
    assert sh("git", "status", "--porcelain", cwd=tmp_path).stdout == ""


def test_run_sh_takes_an_absolute_venv_path():
    """ANODIFF_VENV=/abs/path: run.sh puts that venv's bin on PATH (not $PWD/abs/path)."""
    venv = Path(sys.prefix).resolve()
    if not (venv / "bin" / "pytest").exists():
        pytest.skip("the suite does not run from a virtual environment with pytest")
    # PATH without the venv: run.sh alone must find it
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if not p.startswith(str(venv)))
    done = subprocess.run(["./run.sh", "test", "-q", "--collect-only", "tests/test_packaging.py"], cwd=ROOT,
                          env={**os.environ, "ANODIFF_VENV": str(venv), "PATH": path}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
