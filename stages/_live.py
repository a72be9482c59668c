"""Training curves and a stage's summary, logged with DVCLive (`dvclive.Live`), in its formats.

Only the training stages import this (and dvclive): pretrain_ddpm and train_robust_ddpm
(stages/_ddpm.py) and train_gan_noise.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from _common import ROOT


def write_live(stage: str, curves: dict, summary: dict, metrics_path) -> None:
    """A training stage's curves and summary, logged with DVCLive (`dvclive.Live`) in its formats.

    `curves` maps a name prefix ("" or "selection/") to a DataFrame with a `step` column; every other
    column is one metric, `Live.log_metric(prefix + column)` at that step. Live writes into a
    temporary folder outside the repository; the curves then replace plots/<stage>/ whole
    (`<metric>.tsv`, columns `step` and the metric, tab-separated: Live's plots/metrics/ folder) and
    Live's summary (`summary`, plus `step`: the last step logged) goes to `metrics_path`, each
    atomically. Byte-reproducible: no timestamps, and nothing else of the run's own.

    Live here only writes files: no dvc.yaml (dvcyaml=None), no report, no experiment of its own
    (save_dvc_exp=False; the pipeline's `dvc exp run` records the outputs), no DVC Studio
    (DVC_STUDIO_OFFLINE), and no DVC repository lookup (`_init_dvc`, below). Steps are set, not
    counted with `next_step()`: each `next_step()` rereads every curve logged so far (Live.sync, for
    Studio), quadratic in the steps (2000 steps: 25 s on this CPU; paper scale has 25 000)."""
    os.environ["DVC_STUDIO_OFFLINE"] = "true"  # whatever the user's DVC config or STUDIO_TOKEN says
    from dvclive import Live

    from anodiff import io

    class FilesOnly(Live):
        def _init_dvc(self):
            # Live's own lookup opens the DVC repository: outside one, inside a git repo, it runs
            # `dvc init`; inside `dvc exp run` it `git add`s what it finds untracked in its folder.
            self._dvc_file = "dvc.yaml"  # unused with dvcyaml=None

    with tempfile.TemporaryDirectory(prefix=f"anodiff-live-{stage}-") as tmp:
        live = FilesOnly(dir=tmp, report=None, save_dvc_exp=False, dvcyaml=None, monitor_system=False)
        last = 0
        for prefix, frame in curves.items():
            names = [c for c in frame.columns if c != "step"]
            for row in frame.itertuples(index=False):
                live.step = int(row.step)
                last = max(last, live.step)
                for name in names:
                    value = getattr(row, name)
                    value = float("nan") if value is None else value.item() if hasattr(value, "item") else value
                    live.log_metric(prefix + name, value, timestamp=False)  # NaN: Live writes "nan"
        live.summary = dict(summary)
        live.step = last  # the summary's `step`: the last step of any curve
        live.end()
        with io.atomic_dir(ROOT / f"plots/{stage}") as out:
            written = Path(live.plots_dir) / "metrics"
            if written.is_dir():
                shutil.copytree(written, out, dirs_exist_ok=True)
        with io.atomic_write(metrics_path, "wb") as fh:
            fh.write(Path(live.metrics_file).read_bytes())
