"""dvc.yaml declares exactly what each stage reads: its script, the stage helpers and the
src/anodiff modules it imports (found from the real import statements, transitively)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def expand_stages() -> dict[str, dict]:
    """dvc.yaml stages with foreach expanded (enough of DVC's templating for our file)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, st in stages.items():
        if "foreach" not in st:
            out[name] = st
            continue
        items = st["foreach"]
        pairs = items.items() if isinstance(items, dict) else ((i, i) for i in items)
        for key, item in pairs:
            text = yaml.safe_dump(st["do"])
            text = text.replace("${key}", str(key))
            if isinstance(item, dict):
                for k, v in item.items():
                    text = text.replace("${item.%s}" % k, str(v))
            else:
                text = text.replace("${item}", str(item))
            out[f"{name}@{key}"] = yaml.safe_load(text)
    return out


def local_imports(path: Path) -> set[Path]:
    """Files of this repo that `path` imports: anodiff modules and stages/_*.py helpers."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "anodiff":
                names = [f"anodiff.{a.name}" for a in node.names]
            else:
                names = [node.module]
        for name in names:
            if name.startswith("anodiff.") and (ROOT / "src" / (name.replace(".", "/") + ".py")).exists():
                found.add(ROOT / "src" / (name.replace(".", "/") + ".py"))
            elif name.startswith("_") and (ROOT / "stages" / f"{name}.py").exists():
                found.add(ROOT / "stages" / f"{name}.py")
    return found


def closure(script: Path) -> set[str]:
    seen, todo = set(), [script]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        todo.extend(local_imports(p))
    return {str(p.relative_to(ROOT)) for p in seen}


STAGES = expand_stages()


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_declares_exactly_the_code_it_runs(name):
    st = STAGES[name]
    scripts = re.findall(r"stages/\w+\.py", st["cmd"])
    assert scripts, f"{name}: no stage script in cmd"
    reads = set()
    for s in scripts:
        reads |= closure(ROOT / s)
    deps = {d if isinstance(d, str) else next(iter(d)) for d in st.get("deps", [])}
    code_deps = {d for d in deps if d.startswith(("src/", "stages/"))}
    assert reads - code_deps == set(), f"{name} imports but does not declare {sorted(reads - code_deps)}"
    assert code_deps - reads == set(), f"{name} declares but never imports {sorted(code_deps - reads)}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_params_keys_exist(name):
    """Every declared params key names something in params.yaml (a typo here would never rerun)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key in STAGES[name].get("params", []):
        node = params
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{name}: params key {key} not in params.yaml"
            node = node[part]


def test_only_gan_branch_reads_gan_params():
    for name, st in STAGES.items():
        keys = st.get("params", [])
        reads_gan = any(k == "gan" or k.startswith("gan.") for k in keys)
        assert reads_gan == (name == "train_gan_noise"), name
