"""Plumbing shared by the stage scripts: typed params, seeding, threads, and clean error exits.

A stage's user-facing failure is one line on stderr naming the file or params key, and exit
code 2; a traceback is kept for bugs, not for bad input.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("DVC_NO_ANALYTICS", "1")

ROOT = Path(__file__).resolve().parents[1]
# This checkout's own library first: `dvc exp run --temp` and queued experiments run in a copy of
# the repository, and the editable install (`pip install -e .`) would import the workspace's src/.
if not sys.path or sys.path[0] != str(ROOT / "src"):
    sys.path.insert(0, str(ROOT / "src"))

from anodiff.config import Params, load_params  # noqa: E402
from anodiff.errors import AnodiffError, ConfigError  # noqa: E402


def run_stage(main, params_path: str | os.PathLike = "params.yaml", setup=None) -> None:
    """Load params, call `main(params)`, and turn AnodiffError into `error: ...` + exit 2.

    `setup`: called once the params are read, before `main`; it returns a function to call after
    `main` (the training stages join torchrun's process group there: anodiff.distributed.setup)."""
    started = time.perf_counter()
    try:
        set_threads_from_env()
        deterministic_cuda()
        params = load_params(params_path)
        teardown = setup() if setup is not None else None
        try:
            main(params)
        finally:
            if teardown is not None:
                teardown()
    except AnodiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the stage
        name = os.environ.get("DVC_STAGE") or Path(sys.argv[0]).stem
        print(f"{name}: done in {time.perf_counter() - started:.1f} s", file=sys.stderr)


#: torch threads per stage when ANODIFF_THREADS is unset: fixed, not the machine's core count, so
#: two machines run the same arithmetic by default (the thread count changes float32 sums' order)
DEFAULT_THREADS = 2


def set_threads_from_env() -> int:
    """`torch.set_num_threads(n)` for ANODIFF_THREADS=n (a positive integer), DEFAULT_THREADS when unset.

    More for a bigger CPU; fewer for several jobs side by side (`dvc queue start --jobs N`, or runs
    in parallel), each with its share of the cores. Returns n (recorded in metrics/timing/).
    Only where the stage has imported torch: every stage that computes with it does so at import;
    evaluate and report read maps and metrics without torch (500 MB of memory saved)."""
    value = os.environ.get("ANODIFF_THREADS")
    if value is None:
        n = DEFAULT_THREADS
    else:
        text = value.strip()
        if not (text.isascii() and text.isdigit()) or int(text) < 1:
            raise ConfigError(f"ANODIFF_THREADS: {value!r} must be a positive integer (threads per stage), or unset")
        n = int(text)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)
    return n


def deterministic_cuda() -> None:
    """On CUDA, ask for the same arithmetic each run: cuDNN's deterministic kernels, no autotuning
    (which picks kernels by timing), and cuBLAS's fixed workspace (must be set before CUDA starts).
    Nothing changes on CPU, where torch's kernels are deterministic at a fixed thread count."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch = sys.modules.get("torch")
    if torch is None:  # a stage without torch
        return
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


#: run-to-run figures: kept out of the `metrics:` files (see write_timing)
TIMING_KEYS = ("seconds", "seconds_per_image", "images_per_s", "device")


def split_timing(summary: dict) -> tuple[dict, dict]:
    """(the quality figures, the timing figures: TIMING_KEYS) of a summary dict."""
    return ({k: v for k, v in summary.items() if k not in TIMING_KEYS},
            {k: v for k, v in summary.items() if k in TIMING_KEYS})


def write_timing(stage: str, timing: dict) -> None:
    """metrics/timing/<stage>.json: how long a stage took and where. A plain `cache: false` out in
    dvc.yaml, not a `metrics:` file, so `dvc metrics diff` of two runs of the same params is empty."""
    import torch

    from anodiff import io

    # what makes two runs comparable bit for bit (docs/reproducibility.md, "Same bytes where")
    timing = {**timing, "threads": torch.get_num_threads(), "torch": torch.__version__}
    io.write_json(ROOT / f"metrics/timing/{stage}.json",
                  {k: round(v, 6) if isinstance(v, float) else v for k, v in timing.items()})


def torch_generator(seed: int, offset: int = 0):
    """A CPU torch.Generator seeded from params (offset separates independent streams): the
    library's `runtime.seeded`, imported here so that stages which draw nothing never load torch."""
    from anodiff.runtime import seeded

    return seeded(seed, offset)
