"""Kill and resume for the training stages.

A training loop gives `Snapshots.maybe_save` a function that returns everything it needs to go on
(weights, optimiser and RNG states, step, history). At the end of an epoch, once `every` seconds
have passed since the last snapshot, that state is written, atomically, to one file per stage. A
rerun of the stage with the same key loads it and goes on from the next epoch, and ends with the
weights an uninterrupted run gives, bit for bit. The key is a hash of what decides the result:
the stage's params, the bytes of its inputs and code, torch's version, the device and the thread
count (`fingerprint`). Any other key starts over, so a changed param never resumes a stale run.
The stage removes the file once its outputs are written (`done`).

The files live in `<repo>/.anodiff/resume/<stage>.pt` (git-ignored, and no stage's output, so DVC
never deletes them). `ANODIFF_RESUME_EVERY` sets the seconds between snapshots (default 60; 0: at
every epoch's end). Why not a library: PyTorch Lightning and Accelerate checkpoint and resume, but
they would take the training loops over; what is needed here is one file and one key.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from anodiff import io
from anodiff.errors import CheckpointError, ConfigError

FORMAT = "anodiff.resume/1"
ENV_EVERY = "ANODIFF_RESUME_EVERY"
DEFAULT_EVERY = 60.0


def every_from_env() -> float:
    """Seconds between snapshots from ANODIFF_RESUME_EVERY (default 60; 0: every epoch)."""
    value = os.environ.get(ENV_EVERY)
    if value is None or not value.strip():
        return DEFAULT_EVERY
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not (seconds >= 0 and np.isfinite(seconds)):
        raise ConfigError(f"{ENV_EVERY}: {value!r} must be a number of seconds >= 0 (0: a snapshot every epoch)")
    return seconds


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return [path]


def fingerprint(stage: str, params: dict, inputs: Iterable[Path], device: str = "cpu") -> str:
    """sha256 of the stage's name and params, every byte (and relative name) of `inputs`, files or
    folders, the torch version, the device and torch's thread count: what decides the weights."""
    h = hashlib.sha256()
    head = {"stage": stage, "params": params, "torch": torch.__version__, "device": str(device),
            "threads": torch.get_num_threads()}
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    for root in inputs:
        root = Path(root)
        for f in _files(root):
            h.update(str(f.relative_to(root.parent)).encode() + b"\0")
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _plain(obj):
    """`obj` with tensors on the CPU and NumPy scalars as Python numbers: loadable with weights_only."""
    if torch.is_tensor(obj):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


class Snapshots:
    """One stage's resume file: `load` at the start, `maybe_save` at each epoch's end, `done` at the end.

    `path=None` turns it off (library calls and tests that want no files)."""

    def __init__(self, path: Path | None, key: str = "", every: float = DEFAULT_EVERY, name: str = "train"):
        self.path = None if path is None else Path(path)
        self.key, self.every, self.name = key, every, name
        self._last = time.monotonic()

    @classmethod
    def off(cls) -> Snapshots:
        return cls(None)

    def load(self) -> dict | None:
        """The saved state when the file exists and has this key; otherwise None (a stale or
        unreadable file is removed, and the run starts over)."""
        if self.path is None or not self.path.exists():
            return None
        try:
            saved = io.load_checkpoint(self.path)
        except CheckpointError as exc:
            print(f"{self.name}: ignoring the resume file, {exc}; starting over", flush=True)
            self.done()
            return None
        if saved.get("format") != FORMAT or saved.get("key") != self.key:
            print(f"{self.name}: {self.path} was written for other params, inputs, code or threads; "
                  "starting over", flush=True)
            self.done()
            return None
        state = saved["state"]
        print(f"{self.name}: resuming from {self.path} (epoch {state['epoch']}, step {state['step']})", flush=True)
        return state

    def maybe_save(self, make_state: Callable[[], dict]) -> bool:
        """Write `make_state()` when `every` seconds have passed since the last snapshot."""
        if self.path is None or time.monotonic() - self._last < self.every:
            return False
        io.save_checkpoint(self.path, {"format": FORMAT, "key": self.key, "state": _plain(make_state())})
        self._last = time.monotonic()
        return True

    def done(self) -> None:
        """Remove the file: the stage's outputs are written, nothing is left to resume."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def for_stage(root: Path, stage: str, params: dict, inputs: list, device) -> Snapshots:
    """A stage's snapshots: `<root>/.anodiff/resume/<stage>.pt`, keyed to `params`, the bytes of
    `inputs` and of the code (`<root>/stages`, `<root>/src/anodiff`), torch, the device and threads."""
    root = Path(root)
    key = fingerprint(stage, params, [*inputs, root / "stages", root / "src/anodiff"], device)
    return Snapshots(root / ".anodiff/resume" / f"{stage}.pt", key, every_from_env(), stage)
