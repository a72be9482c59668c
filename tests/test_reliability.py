"""Reliability: what the pipeline promises when things go wrong.

Section "bad inputs" (this file's first part): the table BAD_INPUTS holds one case for each kind
of bad outside input (params.yaml, image folders, checkpoints, `anodiff predict`'s arguments).
Every case goes through the entry point the input comes in by (a stage's `run_stage`, the CLI's
`main`) and must fail with ONE line on stderr, `error: ...` naming the file or params key, exit
code 2, and leave nothing partial behind: the folder around the output holds exactly the bytes it
held before (an earlier output survives whole; no temp file or folder is left). STATIC_CHECKS
adds that no code path could run what an input smuggles in: checkpoints load with
weights_only=True, YAML with a SafeLoader, and no string reaches a shell.

Section "determinism": the tiny pipeline reproduced twice with `dvc repro -f` gives the same output
hashes in dvc.lock, the same bytes of every quality metrics file and training curve, an empty
`dvc metrics diff`, and a clean `dvc status`.

Section "kill and resume": the training loops resumed from a snapshot end with the uninterrupted
run's weights, in process; and `pretrain_ddpm` and `train_gan_noise`, run as real processes and
killed with SIGKILL, then run again, write the bytes an uninterrupted run writes.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from conftest import ROOT, _merge, back_to_the_committed_run
from test_checkpoint import _save_generator
from test_data import make_mvtec, square_mask
from test_predict import _argv, _image, _save_ckpt, _save_maps
from tinyrepo import ENV, make, sh

from anodiff import cli, io, resume
from anodiff import gan as G
from anodiff.errors import ConfigError
from anodiff.gan_selection import Selection
from anodiff.noisegen import Critic, NoiseGenerator
from anodiff.schedule import Schedule
from anodiff.train import train_ddpm
from anodiff.unet import UNet

sys.path.insert(0, str(ROOT / "stages"))

import _common  # noqa: E402
import infer  # noqa: E402
import prepare  # noqa: E402

SIZE = 16  # image_size of the params the stage cases run with


# ====================================================================== bad inputs
def tree(folder: Path) -> dict[str, bytes | None]:
    """Everything under `folder`, hidden too: a file -> its bytes, a folder -> None (so an empty temp
    folder left behind shows); {} when there is no folder."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@dataclass
class Failure:
    """What one attempt left: stderr, the exit code, and the folder around the output before/after."""

    err: str
    code: int
    around: Path
    before: dict[str, bytes | None]


class Attempt:
    """One bad input fed to its entry point inside `tmp`; each method returns a Failure.

    The stage runs are the real `run_stage(prepare.main)` / `run_stage(infer.main)` in this process,
    writing under tmp (the stage module's ROOT points there); `prepare_process` runs
    `python stages/prepare.py` itself in a copy of stages/ and src/."""

    def __init__(self, tmp: Path, capsys, monkeypatch):
        self.tmp, self.capsys, self.monkeypatch = tmp, capsys, monkeypatch

    # ------------------------------------------------------------ inputs
    def params(self, root: Path | None = None, text: str | None = None, **over) -> Path:
        """root/params.yaml: the repository's, small images, `over` merged in (or `text` verbatim)."""
        raw = yaml.safe_load((ROOT / "params.yaml").read_text())
        _merge(raw, {"data": {"image_size": SIZE}})
        _merge(raw, over)
        path = (root or self.tmp) / "params.yaml"
        path.write_text(text if text is not None else yaml.safe_dump(raw, sort_keys=False))
        return path

    def mvtec(self, damage: Callable[[Path], object]) -> Path:
        """A tiny MVTec folder (test_data.make_mvtec) with one thing broken by `damage(root)`."""
        src = make_mvtec(self.tmp / "mvtec")
        damage(src)
        return src

    def previous(self, out: Path, name: str) -> Path:
        """An earlier run's output that must survive the failed one byte for byte."""
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("previous run\n")
        return out

    # ------------------------------------------------------------ entry points
    def _stage(self, main, params_path: Path, out: Path) -> Failure:
        around = out.parent
        before = tree(around)
        self.capsys.readouterr()
        try:
            _common.run_stage(main, params_path)
            code = 0
        except SystemExit as exc:
            code = exc.code
        return Failure(self.capsys.readouterr().err, code, around, before)

    def prepare(self, text: str | None = None, **over) -> Failure:
        self.monkeypatch.setattr(prepare, "ROOT", self.tmp)
        out = self.previous(self.tmp / "data" / "prepared", "manifest.csv")
        return self._stage(prepare.main, self.params(text=text, **over), out)

    def prepare_process(self, **over) -> Failure:
        repo = self.tmp / "repo"
        for folder in ("stages", "src"):
            shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        out = self.previous(repo / "data" / "prepared", "manifest.csv")
        self.params(repo, **over)
        before = tree(out.parent)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"ANODIFF_THREADS": "1"}
        res = subprocess.run([sys.executable, "stages/prepare.py"], cwd=repo, env=env, capture_output=True,
                             text=True, timeout=300)
        return Failure(res.stderr, res.returncode, out.parent, before)

    def infer(self, model: Path, **over) -> Failure:
        self.monkeypatch.setattr(infer, "ROOT", self.tmp)
        self.monkeypatch.setattr(infer, "PREPARED", self.tmp / "data" / "prepared")
        out = self.previous(self.tmp / "data" / "maps" / "ddpm", "meta.json")
        return self._stage(lambda p: infer.main(p, "ddpm", str(model), str(model)), self.params(**over), out)

    def predict(self, *inputs, **opts) -> Failure:
        """`anodiff predict` on a working checkpoint, maps and metrics (test_predict's), `opts` changed."""
        art = {"ckpt": _save_ckpt(self.tmp / "models" / "ddpm.pt"), "maps": _save_maps(self.tmp / "maps" / "ddpm"),
               "metrics": self.tmp / "metrics.json", "out": self.tmp / "pred"}
        io.write_json(art["metrics"], {"thresholds": {"pixel": 1.5, "image": 0.0}})
        out = Path(opts.get("out", art["out"]))
        if not out.exists():
            self.previous(out, "predictions.csv")
        inputs = inputs or (self.image("slab.png"),)
        before = tree(self.tmp)
        self.capsys.readouterr()
        code = cli.main(_argv(art, *inputs, **opts))
        return Failure(self.capsys.readouterr().err, code, self.tmp, before)

    def image(self, name: str) -> Path:
        io.write_png(self.tmp / name, _image(0))
        return self.tmp / name

    def file(self, name: str, text: str) -> Path:
        (self.tmp / name).write_text(text)
        return self.tmp / name

    def folder(self, name: str) -> Path:
        (self.tmp / name).mkdir()
        return self.tmp / name


# ---------------------------------------------------------------------- bad files and checkpoints
def zero_byte(src):
    (src / "train/good/000.png").write_bytes(b"")


def truncated(src):
    f = src / "test/good/001.png"
    f.write_bytes(f.read_bytes()[:200])


def not_an_image(src):
    (src / "test/hole/002.png").write_text("a text file with an image's name\n")


def mask_size_differs(src):
    square_mask(src / "ground_truth/crack/001_mask.png", size=20)  # its image is 32x32


def missing_mask(src):
    (src / "ground_truth/hole/001_mask.png").unlink()


def empty_class(src):
    for f in (src / "test/hole").iterdir():
        f.unlink()


def unknown_layout(src):
    for sub in ("train", "test", "ground_truth"):
        shutil.rmtree(src / sub)
    (src / "pictures").mkdir()


MARKER = "code-ran.txt"  # what the hostile pickles below would create if their code ran


class RunsCode:
    """Unpickling this calls os.system: a checkpoint that runs code when loaded without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile_torch_save(tmp: Path) -> Path:
    path = tmp / "hostile.pt"
    torch.save({"format": "anodiff.ddpm/1", "arch": {}, "ema": RunsCode(tmp / MARKER)}, path)
    return path


def hostile_pickle(tmp: Path) -> Path:
    path = tmp / "hostile.pkl"
    path.write_bytes(pickle.dumps(RunsCode(tmp / MARKER)))
    return path


def truncated_ckpt(tmp: Path) -> Path:
    good = _save_ckpt(tmp / "good.pt")
    path = tmp / "cut.pt"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # an interrupted copy
    return path


def not_a_ckpt(tmp: Path) -> Path:
    path = tmp / "notes.pt"
    path.write_text("these are notes, not weights\n")
    return path


def generator_ckpt(tmp: Path) -> Path:
    _save_generator(tmp / "g.pt")  # the GAN's noise generator: a checkpoint of another kind
    return tmp / "g.pt"


# ---------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Bad:
    kind: str  # params | folders | checkpoints | predict
    id: str
    run: Callable[[Attempt], Failure]
    names: str  # must appear in the message, parts split by " ... " in this order; {tmp} is the
    # case's folder, {src} its mvtec folder


BAD_INPUTS = [
    # params.yaml, through prepare's run_stage
    Bad("params", "wrong-type", lambda a: a.prepare(data={"image_size": "64"}),
        "params.yaml: data.image_size: '64' is not an integer"),
    Bad("params", "out-of-range", lambda a: a.prepare(data={"contamination": 1.0}),
        "params.yaml: data.contamination: 1.0 is out of range; allowed: a number in [0, 1)"),
    Bad("params", "unknown-key", lambda a: a.prepare(data={"imagesize": 64}),
        "params.yaml: data.imagesize: unknown key; allowed under data:"),
    Bad("params", "missing-key", lambda a: a.prepare(text="seed: 0\n"),
        "params.yaml: data: missing"),
    Bad("params", "list-item-type", lambda a: a.prepare(ddpm={"channel_mults": [1, "x"]}),
        "params.yaml: ddpm.channel_mults[1]: 'x' is not an integer"),
    Bad("params", "list-item-range", lambda a: a.prepare(ddpm={"channel_mults": [1, -2]}),
        "params.yaml: ddpm.channel_mults[1]: -2 is out of range"),
    Bad("params", "list-empty", lambda a: a.prepare(ddpm={"channel_mults": []}),
        "params.yaml: ddpm.channel_mults: [] must be a list of at least 1 entry"),
    Bad("params", "brightness-item", lambda a: a.prepare(data={"augment": {"brightness": [0.9, "bright"]}}),
        "params.yaml: data.augment.brightness[1]: 'bright' is not a number"),
    Bad("params", "marble-normal-item", lambda a: a.prepare(data={"marble_normal": ["good", 3]}),
        "params.yaml: data.marble_normal[1]: 3 is not a string"),
    Bad("params", "duplicate-key",
        lambda a: a.prepare(text=(ROOT / "params.yaml").read_text().replace("\ndata:\n", "\ndata:\n  image_size: 8\n")),
        "{tmp}/params.yaml: not valid YAML at line ... duplicate key 'image_size'"),
    Bad("params", "not-yaml", lambda a: a.prepare(text="data: [unclosed\n"),
        "params.yaml: not valid YAML at line 2, column 1: expected ',' or ']'"),
    Bad("params", "source-not-found", lambda a: a.prepare(data={"source": str(a.tmp / "nowhere")}),
        "data.source: {tmp}/nowhere: folder not found"),
    # image folders, through prepare's run_stage (one through the real process)
    Bad("folders", "zero-byte-process", lambda a: a.prepare_process(data={"source": str(a.mvtec(zero_byte))}),
        "{src}/train/good/000.png: empty file (0 bytes)"),
    Bad("folders", "truncated", lambda a: a.prepare(data={"source": str(a.mvtec(truncated))}),
        "{src}/test/good/001.png: cannot be decoded"),
    Bad("folders", "not-an-image", lambda a: a.prepare(data={"source": str(a.mvtec(not_an_image))}),
        "{src}/test/hole/002.png: not an image file"),
    Bad("folders", "mask-size-differs", lambda a: a.prepare(data={"source": str(a.mvtec(mask_size_differs))}),
        "{src}/ground_truth/crack/001_mask.png: mask is 20x20 px but its image {src}/test/crack/001.png is 32x32"),
    Bad("folders", "missing-mask", lambda a: a.prepare(data={"source": str(a.mvtec(missing_mask))}),
        "{src}/test/hole/001.png: anomalous test image has no mask"),
    Bad("folders", "empty-class", lambda a: a.prepare(data={"source": str(a.mvtec(empty_class))}),
        "{src}/test/hole: empty folder: no images"),
    Bad("folders", "unknown-layout", lambda a: a.prepare(data={"source": str(a.mvtec(unknown_layout))}),
        "data.source: {src}: cannot recognise the layout"),
    # checkpoints, through infer's run_stage
    Bad("checkpoints", "missing", lambda a: a.infer(a.tmp / "ddpm.pt"),
        "{tmp}/ddpm.pt: checkpoint not found"),
    Bad("checkpoints", "truncated", lambda a: a.infer(truncated_ckpt(a.tmp)),
        "{tmp}/cut.pt: not a readable checkpoint"),
    Bad("checkpoints", "other-configuration", lambda a: a.infer(_save_ckpt(a.tmp / "gray.pt", channels=1)),
        "{tmp}/gray.pt: architecture differs from the params: in_channels 1 in the file, 3 asked"),
    Bad("checkpoints", "other-kind", lambda a: a.infer(generator_ckpt(a.tmp)),
        "{tmp}/g.pt: not an anodiff ddpm checkpoint (kind 'gan_generator')"),
    Bad("checkpoints", "not-a-checkpoint", lambda a: a.infer(not_a_ckpt(a.tmp)),
        "{tmp}/notes.pt: not a readable checkpoint (not a PyTorch file)"),
    Bad("checkpoints", "pickle-runs-code-torch-save", lambda a: a.infer(hostile_torch_save(a.tmp)),
        "{tmp}/hostile.pt: not a readable checkpoint (refused: it asks to call posix.system"),
    Bad("checkpoints", "pickle-runs-code-plain", lambda a: a.infer(hostile_pickle(a.tmp)),
        "{tmp}/hostile.pkl: not a readable checkpoint"),
    # `anodiff predict`, through cli.main
    Bad("predict", "missing-input", lambda a: a.predict(a.tmp / "ghost.png"),
        "{tmp}/ghost.png: no such file or folder"),
    Bad("predict", "unreadable-image", lambda a: a.predict(a.image("ok.png"), a.file("x.png", "text\n")),
        "{tmp}/x.png: not an image file"),
    Bad("predict", "empty-folder", lambda a: a.predict(a.folder("empty")),
        "{tmp}/empty: folder holds no images"),
    Bad("predict", "bad-checkpoint", lambda a: a.predict(checkpoint=truncated_ckpt(a.tmp)),
        "{tmp}/cut.pt: not a readable checkpoint"),
    Bad("predict", "missing-maps", lambda a: a.predict(maps=a.tmp / "nomaps"),
        "{tmp}/nomaps/meta.json: missing"),
    Bad("predict", "out-is-an-input", lambda a: a.predict(a.image("in/slab.png").parent, out=a.tmp / "in"),
        "--out {tmp}/in: would replace {tmp}/in"),
    Bad("predict", "threshold-nan", lambda a: a.predict(threshold="nan"),
        "--threshold: nan is not a finite number"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[f"{c.kind}-{c.id}" for c in BAD_INPUTS])
def test_bad_input_fails_cleanly(case, tmp_path, capsys, monkeypatch):
    got = case.run(Attempt(tmp_path, capsys, monkeypatch))
    lines = got.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), got.err
    at = 0
    for part in case.names.format(tmp=tmp_path, src=tmp_path / "mvtec").split(" ... "):
        assert part in lines[0][at:], (part, lines[0])
        at = lines[0].index(part, at) + len(part)
    assert got.code == 2, got.err
    assert tree(got.around) == got.before  # the old output whole, no temp file or folder left
    assert not (tmp_path / MARKER).exists()  # no pickled code ran


# ---------------------------------------------------------------------- static checks
def _calls(tree_: ast.AST):
    for node in ast.walk(tree_):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func), {k.arg: k.value for k in node.keywords}


def _safe_loaders(tree_: ast.AST) -> set[str]:
    """Names of the classes in a module that subclass yaml's SafeLoader (config.ParamsLoader)."""
    return {n.name for n in ast.walk(tree_) if isinstance(n, ast.ClassDef)
            and any(ast.unparse(b).endswith(("SafeLoader", "CSafeLoader")) for b in n.bases)}


def _true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def yaml_without_safe_loader(tree_):
    safe = _safe_loaders(tree_)
    for call, func, kw in _calls(tree_):
        if func in ("yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all"):
            yield func
        elif func in ("yaml.load", "yaml.load_all"):
            loader = ast.unparse(kw["Loader"]) if "Loader" in kw else ""
            if not (loader.endswith(("SafeLoader", "CSafeLoader")) or loader in safe):
                yield f"{func}(Loader={loader or '?'})"


def torch_load_without_weights_only(tree_):
    for _, func, kw in _calls(tree_):
        if func == "torch.load" and not _true(kw.get("weights_only")):
            yield func


def shell_true(tree_):
    for _, func, kw in _calls(tree_):
        if "shell" in kw and not (isinstance(kw["shell"], ast.Constant) and kw["shell"].value is False):
            yield f"{func}(shell=...)"


def os_system(tree_):
    for node in ast.walk(tree_):
        if isinstance(node, ast.Attribute) and ast.unparse(node) in ("os.system", "os.popen"):
            yield ast.unparse(node)
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            yield from (f"from os import {a.name}" for a in node.names if a.name in ("system", "popen"))


def pickle_loads(tree_):
    for _, func, kw in _calls(tree_):
        if func in ("pickle.load", "pickle.loads", "pickle.Unpickler"):
            yield func
        elif func in ("np.load", "numpy.load") and not (isinstance(kw.get("allow_pickle"), ast.Constant)
                                                        and kw["allow_pickle"].value is False):
            yield f"{func} without allow_pickle=False"


STATIC_CHECKS = [yaml_without_safe_loader, torch_load_without_weights_only, shell_true, os_system, pickle_loads]
SOURCES = sorted([*(ROOT / "src").rglob("*.py"), *(ROOT / "stages").glob("*.py")])


@pytest.mark.parametrize("check", STATIC_CHECKS, ids=[c.__name__ for c in STATIC_CHECKS])
def test_no_input_can_run_code(check):
    found = [f"{p.relative_to(ROOT)}:{hit}" for p in SOURCES for hit in check(ast.parse(p.read_text()))]
    assert found == []


def test_the_static_checks_catch_what_they_look_for():
    bad = ast.parse("import yaml, torch, subprocess, os, pickle\nimport numpy as np\n"
                    "yaml.load(t, Loader=yaml.Loader)\ntorch.load(\n  p,\n  map_location='cpu')\n"
                    "subprocess.run(cmd, shell=True)\nos.system(cmd)\npickle.loads(b)\nnp.load(p)\n")
    assert [len(list(check(bad))) for check in STATIC_CHECKS] == [1, 1, 1, 1, 2]
    good = ast.parse("class L(yaml.SafeLoader): pass\nyaml.load(t, Loader=L)\nyaml.safe_load(t)\n"
                     "torch.load(p, weights_only=True)\nsubprocess.run([a, b])\nnp.load(p, allow_pickle=False)\n")
    assert [len(list(check(good))) for check in STATIC_CHECKS] == [0] * len(STATIC_CHECKS)


# ====================================================================== determinism
def _bytes_of_a_run(d):
    """Every output hash dvc.lock records (timing files aside: they hold seconds), and the bytes of
    the quality metrics and the DVCLive curves."""
    lock = yaml.safe_load((d / "dvc.lock").read_text())["stages"]
    hashes = {(name, o["path"]): o["md5"] for name, st in lock.items() for o in st.get("outs", [])
              if not o["path"].startswith("metrics/timing")}
    files = [*(d / "metrics").glob("*.json"), *(d / "plots").rglob("*.tsv")]
    return hashes, {f.relative_to(d).as_posix(): f.read_bytes() for f in files}


def test_repro_twice_gives_the_same_bytes_and_a_clean_status(workflow_repo):
    d, _ = workflow_repo
    back_to_the_committed_run(d)
    assert json.loads(sh("dvc", "status", "--json", cwd=d).stdout) == {}
    hashes, files = _bytes_of_a_run(d)
    sh("dvc", "repro", "-f", cwd=d)
    hashes_again, files_again = _bytes_of_a_run(d)
    assert {k for k in hashes if hashes[k] != hashes_again.get(k)} == set()
    assert {k for k in files if files[k] != files_again.get(k)} == set()
    assert json.loads(sh("dvc", "status", "--json", cwd=d).stdout) == {}
    diff = json.loads(sh("dvc", "metrics", "diff", "--json", cwd=d).stdout or "{}")
    assert not any(v.get("old") != v.get("new") for figures in diff.values() for v in figures.values())
    sh("git", "checkout", "--", ".", cwd=d)  # the timing files differ; leave the repo as committed


# ====================================================================== kill and resume
# In-process: a Snapshots that stops the loop (as a kill would) right after its n-th snapshot;
# then a fresh run with other initial weights and another seed must load the snapshot and end
# with exactly the uninterrupted run's weights, optimiser state and history.
class Stopped(Exception):
    """Stands for SIGKILL inside one process."""


class StopAfter(resume.Snapshots):
    def __init__(self, path, n, key="k"):
        super().__init__(path, key=key, every=0, name="test")
        self.left = n

    def maybe_save(self, make_state):
        saved = super().maybe_save(make_state)
        self.left -= saved
        if self.left == 0:
            raise Stopped
        return saved


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _ddpm_run(snapshots=None, init=0, seed=0, lr_schedule="constant"):
    torch.manual_seed(init)
    model = UNet(1, base_channels=8, channel_mults=[1, 2], num_res_blocks=1, attention_resolutions=[], image_size=8)
    images = torch.rand((10, 1, 8, 8), generator=torch.Generator().manual_seed(5)) * 2 - 1
    return train_ddpm(model, Schedule(50), images, loss="mse", noise="gaussian",
                      generator=torch.Generator().manual_seed(seed), epochs=6, batch_size=4, lr=1e-3, grad_clip=1.0,
                      ema_decay=0.9, train_crop=0, device="cpu", progress=False, snapshots=snapshots,
                      lr_schedule=lr_schedule)


@pytest.mark.parametrize("lr_schedule", ["constant", "cosine"])
def test_ddpm_resumes_to_the_uninterrupted_weights(tmp_path, lr_schedule):
    full = _ddpm_run(lr_schedule=lr_schedule)
    path = tmp_path / "pretrain_ddpm.pt"
    with pytest.raises(Stopped):
        _ddpm_run(StopAfter(path, 2), lr_schedule=lr_schedule)
    assert path.exists()
    resumed = _ddpm_run(resume.Snapshots(path, key="k", every=0), init=1, seed=1, lr_schedule=lr_schedule)
    assert _same_state(resumed.model.state_dict(), full.model.state_dict())
    assert _same_state(resumed.ema_model.state_dict(), full.ema_model.state_dict())
    assert resumed.history[["step", "epoch", "loss"]].equals(full.history[["step", "epoch", "loss"]])
    assert resumed.summary["steps"] == full.summary["steps"] and resumed.summary["final_loss"] == full.summary["final_loss"]
    opt_a, opt_b = resumed.optimizer.state_dict()["state"], full.optimizer.state_dict()["state"]
    assert all(_same_state(opt_a[i], opt_b[i]) for i in opt_b)


def test_a_snapshot_with_another_key_is_not_resumed(tmp_path, capsys):
    path = tmp_path / "pretrain_ddpm.pt"
    with pytest.raises(Stopped):
        _ddpm_run(StopAfter(path, 2, key="old params"))
    other = _ddpm_run(resume.Snapshots(path, key="new params", every=0), init=1)
    assert "written for other params" in capsys.readouterr().out
    fresh = _ddpm_run(init=1)
    assert _same_state(other.model.state_dict(), fresh.model.state_dict())


def _gan_run(snapshots=None, init=1, seed=0):
    C = 3
    torch.manual_seed(0)
    ddpm = UNet(C, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(), image_size=8)
    torch.manual_seed(init)
    net, critic = NoiseGenerator(C, 4, 2, 1.5, residual=True), Critic(C, 4)
    data = torch.rand((12, C, 8, 8), generator=torch.Generator().manual_seed(3)) * 2 - 1

    def evaluate(g):  # a val figure that depends on G's weights: the kept step varies with training
        s = float(g.conv_out.weight.abs().sum())
        return {"map_criterion": 0.5 + (s % 0.01), "image_auroc": 0.5 + (s % 0.01)}

    return net, G.train_gan(net, critic, ddpm, Schedule(20, "linear", 1e-4, 0.02), data[:6], data[6:],
                            rng=torch.Generator().manual_seed(seed), device="cpu", lr=1e-3, batch_size=2,
                            epochs=5, n_critic=2, gp_weight=10.0, mse_weight=1.0, t=6, denoise_steps=1,
                            grad_clip=1.0, crop=0, selection=Selection(evaluate, every=4),
                            progress=False, snapshots=snapshots)


def test_gan_resumes_to_the_uninterrupted_generator_and_selection(tmp_path):
    net_full, (hist_full, sum_full) = _gan_run()
    path = tmp_path / "train_gan_noise.pt"
    with pytest.raises(Stopped):
        _gan_run(StopAfter(path, 3))
    net, (hist, summary) = _gan_run(resume.Snapshots(path, key="k", every=0), init=2, seed=2)
    assert _same_state(net.state_dict(), net_full.state_dict())
    assert hist.equals(hist_full)
    assert summary["selection"] == sum_full["selection"] and summary["selected_step"] == sum_full["selected_step"]


def test_snapshots_are_taken_every_so_many_seconds(tmp_path, monkeypatch):
    snaps = resume.Snapshots(tmp_path / "s.pt", key="k", every=3600)
    assert not snaps.maybe_save(lambda: {"step": 1, "epoch": 1})  # less than an hour since it began
    snaps.every = 0
    assert snaps.maybe_save(lambda: {"step": 1, "epoch": 1}) and (tmp_path / "s.pt").exists()
    assert snaps.load() == {"step": 1, "epoch": 1}
    snaps.done()
    assert not (tmp_path / "s.pt").exists() and snaps.load() is None
    monkeypatch.setenv(resume.ENV_EVERY, "0")
    assert resume.every_from_env() == 0
    monkeypatch.delenv(resume.ENV_EVERY)
    assert resume.every_from_env() == resume.DEFAULT_EVERY
    for bad in ("-1", "soon", "nan"):
        monkeypatch.setenv(resume.ENV_EVERY, bad)
        with pytest.raises(ConfigError, match="ANODIFF_RESUME_EVERY"):
            resume.every_from_env()


def test_the_key_follows_params_inputs_and_threads(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"1")
    key = resume.fingerprint("s", {"lr": 1e-3}, [tmp_path / "in"])
    assert key == resume.fingerprint("s", {"lr": 1e-3}, [tmp_path / "in"])
    assert key != resume.fingerprint("s", {"lr": 2e-3}, [tmp_path / "in"])
    assert key != resume.fingerprint("t", {"lr": 1e-3}, [tmp_path / "in"])
    (tmp_path / "in" / "a.png").write_bytes(b"2")
    assert key != resume.fingerprint("s", {"lr": 1e-3}, [tmp_path / "in"])
    (tmp_path / "in" / "a.png").write_bytes(b"1")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert key != resume.fingerprint("s", {"lr": 1e-3}, [tmp_path / "in"])
    finally:
        torch.set_num_threads(threads)


# With real processes: a training stage killed by SIGKILL and run again ends with the same bytes.
KILL_PARAMS = {"ddpm": {"epochs": 30}, "gan": {"epochs": 10}}
OUTPUTS = {"pretrain_ddpm": ["data/models/ddpm.pt", "metrics/train_pretrain_ddpm.json", "plots/pretrain_ddpm/loss.tsv"],
           "train_gan_noise": ["data/models/gan_generator.pt", "metrics/train_gan_noise.json",
                               "plots/train_gan_noise/gen_loss.tsv", "plots/train_gan_noise/selection/image_auroc.tsv"]}


@pytest.fixture(scope="module")
def killrepo(tmp_path_factory):
    d = make(tmp_path_factory.mktemp("resume"), extra=KILL_PARAMS)
    sh(sys.executable, "stages/prepare.py", cwd=d)
    return d


def _stage(repo, stage, **env):
    return subprocess.Popen([sys.executable, f"stages/{stage}.py"], cwd=repo, env={**ENV, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("stage", ["pretrain_ddpm", "train_gan_noise"])  # in this order: the GAN reads ddpm.pt
def test_a_stage_killed_by_sigkill_resumes_to_the_same_bytes(killrepo, stage):
    outs = [killrepo / f for f in OUTPUTS[stage]]
    snapshot = killrepo / ".anodiff/resume" / f"{stage}.pt"
    proc = _stage(killrepo, stage)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-2000:]
    uninterrupted = {f: f.read_bytes() for f in outs}
    assert not snapshot.exists()  # removed once the outputs are written
    for f in outs:
        f.unlink()

    proc = _stage(killrepo, stage, ANODIFF_RESUME_EVERY="0")
    deadline = time.monotonic() + 300
    while not snapshot.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)  # kill somewhere after the first snapshot, mid-epoch or mid-write
    assert proc.poll() is None, "the stage ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close(), proc.stderr.close()
    assert snapshot.exists() and not any(f.exists() for f in outs)  # nothing written half, nothing lost

    proc = _stage(killrepo, stage, ANODIFF_RESUME_EVERY="0")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert "resuming from" in out + err
    assert {f: f.read_bytes() for f in outs} == uninterrupted
    assert not snapshot.exists()
    leftovers = [p.name for f in outs for p in f.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_a_killed_writers_temp_file_is_removed_by_the_next_write(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs (as after SIGKILL)
    orphan = tmp_path / f".ddpm.pt.{dead.pid}.x1y2.tmp"
    orphan.write_bytes(b"half")
    orphan_dir = tmp_path / f".maps.{dead.pid}.z3.tmp"
    orphan_dir.mkdir()
    mine = tmp_path / f".ddpm.pt.{os.getpid()}.live.tmp"  # a writer that still runs: kept
    mine.write_bytes(b"busy")
    io.save_checkpoint(tmp_path / "ddpm.pt", {"a": 1})
    with io.atomic_dir(tmp_path / "maps") as d:
        (d / "m.npy").write_bytes(b"m")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ddpm.pt", "maps", mine.name])


def test_atomic_outputs_get_the_mode_a_plain_write_would(tmp_path):
    """The temp file and folder an output is written through are private (0600, 0700); the output
    itself gets what open() and mkdir() would give under the umask, so others can read it."""
    old = os.umask(0o022)
    try:
        io.write_json(tmp_path / "m.json", {"a": 1})
        with io.atomic_dir(tmp_path / "maps") as d:
            (d / "m.npy").write_bytes(b"m")
        os.umask(0o077)
        io.write_json(tmp_path / "private.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "maps").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600
