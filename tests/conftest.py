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
    repo_params(infer={"t_start": 5}) -> validated Params."""
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
    """infer.* from params.yaml with `over` changed (single-level plans by default: t_starts [])."""
    return repo_params(infer={"t_starts": [], "level_steps": [], "guidance": [], **over}).infer


@pytest.fixture(scope="session")
def workflow_repo(tmp_path_factory):
    """(repository, log): the tracked files with the tiny params (plus one noise level and one draw:
    DVC's bookkeeping, not the maps), `dvc repro` once and committed. Shared by test_dvc_workflow.py
    and test_reliability.py's determinism check, which puts it back to that commit first."""
    from tinyrepo import FASTER, make, sh

    d = make(tmp_path_factory.mktemp("workflow"), skip=("bench/",), extra=FASTER)
    res = sh("dvc", "repro", cwd=d)
    sh("git", "add", "-A", cwd=d)
    sh("git", "commit", "-qm", "repro", cwd=d)
    return d, res.stdout + res.stderr
