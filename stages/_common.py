"""Plumbing shared by the stage scripts: typed params, seeding, and clean error exits.

A stage's user-facing failure is one line on stderr naming the file or params key, and exit
code 2; a traceback is kept for bugs, not for bad input.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from anodiff.config import Params, load_params  # noqa: E402
from anodiff.errors import AnodiffError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_stage(main, params_path: str | os.PathLike = "params.yaml") -> None:
    """Load params, call `main(params)`, and turn AnodiffError into `error: ...` + exit 2."""
    started = time.perf_counter()
    try:
        params = load_params(params_path)
        main(params)
    except AnodiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    name = os.environ.get("DVC_STAGE") or Path(sys.argv[0]).stem
    print(f"{name}: done in {time.perf_counter() - started:.1f} s", file=sys.stderr)


def torch_generator(seed: int, offset: int = 0):
    """A CPU torch.Generator seeded from params (offset separates independent streams)."""
    import torch

    return torch.Generator().manual_seed(seed * 1_000_003 + offset)
