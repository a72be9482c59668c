"""bench/bench.py's pieces that run in seconds: the evaluation-memory probe and the goals' verdicts."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def test_evaluate_memory_probe_reports_its_own_peak():
    ballast = bytearray(600 * 2**20)  # the spawning process is bigger than the probe will ever be
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])  # touched, so resident
    done = subprocess.run([sys.executable, str(ROOT / "bench/evaluate_memory.py"), "20", "64"],
                          capture_output=True, text=True, check=True)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["evaluate_inputs_mb"] > 0
    assert out["evaluate_peak_mb"] >= out["evaluate_rss_before_mb"] > 0
    if sys.platform == "linux":  # VmHWM; elsewhere ru_maxrss, which carries the parent's over
        assert out["evaluate_peak_mb"] < 550  # its own peak, not its parent's 600 MB
    del ballast


def test_verdicts_compare_each_figure_with_its_goal():
    import bench

    figures = {"repro_seconds": 301, "bench_seconds": 500.0, "bare_train_images_per_s": 115.0,
               "peak_rss_mb": 900.0, "infer_speedup_vs_full_chain": 35.0,
               "auroc_delta_vs_full_chain": -0.02, "simplex_cost_fraction": 0.05}
    figures.update(bench.units(figures))
    assert figures["repro_units"] == 34615 and figures["bench_units"] == 57500  # seconds x the bare loop's rate
    out = bench.verdicts(figures)
    assert out["repro_units"]["met"] is False and out["bench_units"]["met"] is True
    assert out["peak_rss_mb"]["met"] is True
    assert out["infer_speedup_vs_full_chain"]["met"] is True
    assert out["abs_auroc_delta_vs_full_chain"]["met"] is False  # |-0.02| > 0.01
    assert "evaluate_peak_mb" not in out  # not measured: no verdict


def test_stage_units_add_up_to_the_repro_units():
    import bench

    figures = {"repro_seconds": 100.0, "bench_seconds": 150.0, "bare_train_images_per_s": 90.0,
               "repro_stage_seconds": {"pretrain_ddpm": 40.0, "infer_ddpm": 20.5}}
    got = bench.units(figures)
    assert got["repro_stage_units"] == {"pretrain_ddpm": 3600, "infer_ddpm": 1845, "other": 3555}
    assert sum(got["repro_stage_units"].values()) == got["repro_units"] == 9000
