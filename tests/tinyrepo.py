"""A tiny copy of this repository for the tests that run DVC end to end (test_pipeline.py,
test_dvc_workflow.py): the environment, a shell helper and the tiny params profile that CI uses
(.ci/params-tiny.yaml, merged into params.yaml by .ci/tiny_params.py)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
       "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid", "PYTHONHASHSEED": "0"}
TINY_SCRIPT = ROOT / ".ci" / "tiny_params.py"
PROFILE = ROOT / ".ci" / "params-tiny.yaml"


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location("tiny_params", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny_params = load_script(TINY_SCRIPT)


def sh(*cmd, cwd, check=True, env=None):
    res = subprocess.run(cmd, cwd=cwd, env={**ENV, **(env or {})}, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def make(dest: Path, skip: tuple[str, ...] = (), extra: dict | None = None) -> Path:
    """The repository's tracked (and not ignored) files copied to dest, without outputs, with the
    tiny params (plus `extra`), committed in a fresh git repository."""
    listed = sh("git", "ls-files", "--cached", "--others", "--exclude-standard", cwd=ROOT).stdout.split("\n")
    for f in filter(None, listed):
        if f == "dvc.lock" or f.startswith(("data/", "metrics/", "plots/", ".venv") + skip) \
                or not (ROOT / f).is_file():
            continue
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)
    params = tiny_params.merge(yaml.safe_load((dest / "params.yaml").read_text()), tiny_params.load_profile(PROFILE))
    (dest / "params.yaml").write_text(tiny_params.dump(tiny_params.merge(params, extra or {})))
    sh("git", "init", "-q", cwd=dest)
    sh("git", "add", "-A", cwd=dest)
    sh("git", "commit", "-qm", "tiny", cwd=dest)
    return dest
