"""Shared test set-up."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models in unit tests: with other processes on 2 cores, OpenMP threads mostly wait on
    each other, so one thread is several times faster (and results are thread-count specific)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ROOT = Path(__file__).resolve().parents[1]


def repo_params(**sections):
    """The repository's params.yaml (the one source of every default), with some keys changed:
    repo_params(infer={"n_seeds": 2}) -> validated Params."""
    import yaml

    from anodiff.config import parse_params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, over in sections.items():
        if isinstance(over, dict) and isinstance(raw.get(name), dict):
            _merge(raw[name], over)
        else:
            raw[name] = over
    return parse_params(raw)


def _merge(base: dict, over: dict) -> None:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def infer_settings(**over):
    """infer.* from params.yaml with `over` changed (a single unguided level by default: t_start
    30, one step)."""
    return repo_params(infer={"t_start": 30, "steps": 1, "guidance": 0, **over}).infer


@pytest.fixture(scope="session")
def workflow_repo(tmp_path_factory):
    """(repository, log): the tracked files with the tiny params (.ci/params-tiny.yaml, the CI
    workflow's profile: the default infer plan, two levels, one guided), `dvc repro` once and
    committed. One tiny run for the whole session (each costs about two minutes on 2 cores, most of
    it process start-up): test_pipeline.py and test_dvc_workflow.py read and change it, and
    test_reliability.py's determinism check reproduces it again; a test that needs the committed
    run puts it back first (`back_to_the_committed_run`)."""
    from tinyrepo import make, sh

    d = make(tmp_path_factory.mktemp("workflow"), skip=("bench/", "experiments/"))
    res = sh("dvc", "repro", cwd=d)
    sh("git", "add", "-A", cwd=d)
    sh("git", "commit", "-qm", "repro", cwd=d)
    return d, res.stdout + res.stderr


def back_to_the_committed_run(d):
    """The workflow repository as committed after its repro: other tests ran experiments in it."""
    from tinyrepo import sh

    sh("git", "checkout", "-f", "HEAD", "--", ".", cwd=d)
    sh("dvc", "checkout", "-f", cwd=d)
