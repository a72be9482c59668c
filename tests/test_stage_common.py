"""stages/_common.py: every stage imports its own checkout's anodiff, and ANODIFF_THREADS (default 2)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "stages"))

import _common  # noqa: E402

PROBE = "import _common\nimport anodiff\nprint(anodiff.__file__)\n"


def test_a_stage_imports_the_anodiff_of_its_own_checkout(tmp_path):
    """A copy of the repository (what `dvc exp run --temp` and queued experiments run in) imports
    its own src/, not the one the editable install (`pip install -e .`) points at."""
    for folder in ("stages", "src"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (tmp_path / "stages/probe.py").write_text(PROBE)  # run the way dvc.yaml runs a stage
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "stages/probe.py"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True)
    found = Path(res.stdout.strip()).resolve()
    assert found.is_relative_to((tmp_path / "src").resolve()), found
    # without _common the interpreter's own anodiff (the editable install, when present) wins
    plain = subprocess.run([sys.executable, "-c", "import anodiff; print(anodiff.__file__)"], cwd=tmp_path / "stages",
                           env=env, capture_output=True, text=True)
    if plain.returncode == 0:
        assert not Path(plain.stdout.strip()).resolve().is_relative_to(tmp_path.resolve())


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _run(monkeypatch, value):
    monkeypatch.setattr(_common, "load_params", lambda path: "params")
    seen = []
    if value is None:
        monkeypatch.delenv("ANODIFF_THREADS", raising=False)
    else:
        monkeypatch.setenv("ANODIFF_THREADS", value)
    _common.run_stage(lambda p: seen.append((p, torch.get_num_threads())))
    return seen


def test_anodiff_threads_sets_torch_threads(monkeypatch, threads):
    torch.set_num_threads(1)
    assert _run(monkeypatch, "3") == [("params", 3)]
    assert _run(monkeypatch, " 2 ") == [("params", 2)]


def test_unset_anodiff_threads_is_the_documented_default_not_the_core_count(monkeypatch, threads):
    torch.set_num_threads(1)
    assert _run(monkeypatch, None) == [("params", _common.DEFAULT_THREADS)] == [("params", 2)]


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", "", "1e2"])
def test_bad_anodiff_threads_is_one_line_and_exit_2(monkeypatch, capsys, threads, value):
    with pytest.raises(SystemExit) as exc:
        _run(monkeypatch, value)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ANODIFF_THREADS: ") and "positive integer" in err
    assert len(err.strip().splitlines()) == 1
