"""stages/_live.py: training curves and summaries through DVCLive, in its formats, reproducibly."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "stages"))

import _live  # noqa: E402


def test_write_live_writes_dvclive_curves_and_summary_reproducibly(monkeypatch, tmp_path):
    """Training curves go through DVCLive: one `step<TAB>name` .tsv per metric under plots/<stage>/,
    the summary (plus Live's `step`) to the metrics JSON; no timestamp, no dvc.yaml, no report, and
    the same bytes when logged again. The folder is replaced whole: a stale file does not survive."""
    monkeypatch.setattr(_live, "ROOT", tmp_path)
    monkeypatch.delenv("DVC_STUDIO_OFFLINE", raising=False)
    (tmp_path / "plots/stage").mkdir(parents=True)
    (tmp_path / "plots/stage/loss.csv").write_text("stale\n")
    curves = {"": pd.DataFrame({"step": [1, 2, 3], "loss": [0.5, 0.25, float("nan")], "epoch": [0, 0, 1]}),
              "selection/": pd.DataFrame({"step": [0, 2], "auroc": [0.5, None], "map": ["none", "pixel"]})}
    metrics = tmp_path / "metrics/train_stage.json"

    def run():
        _live.write_live("stage", curves, {"final_loss": 0.25, "n_train": 3}, metrics)
        return {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}

    first = run()
    assert set(first) == {"plots/stage/loss.tsv", "plots/stage/epoch.tsv", "plots/stage/selection/auroc.tsv",
                          "plots/stage/selection/map.tsv", "metrics/train_stage.json"}
    assert first["plots/stage/loss.tsv"] == b"step\tloss\n1\t0.5\n2\t0.25\n3\tnan\n"
    assert first["plots/stage/epoch.tsv"] == b"step\tepoch\n1\t0\n2\t0\n3\t1\n"
    assert first["plots/stage/selection/auroc.tsv"] == b"step\tauroc\n0\t0.5\n2\tnan\n"
    assert first["plots/stage/selection/map.tsv"] == b"step\tmap\n0\tnone\n2\tpixel\n"
    assert json.loads(first["metrics/train_stage.json"]) == {"final_loss": 0.25, "n_train": 3, "step": 3}
    assert os.environ["DVC_STUDIO_OFFLINE"] == "true"
    assert run() == first
