"""The peak memory of the `evaluate` stage's metrics on a synthetic test set: n maps of size x size px.

    python bench/evaluate_memory.py 500 256      # bench/bench.py runs it for evaluate_peak_mb

Imports what stages/evaluate.py imports, then runs what it runs on the maps (thresholds on a val
fifth, every metric with the per-defect blocks, the ROC and PR tables) and prints, as JSON, the
process's peak resident memory (its own process: nothing else counts) and the inputs' size.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from anodiff import data, io, metrics, plots  # noqa: E402,F401  (the stage's imports: its baseline)


def peak_mb() -> float:
    """This process's peak resident memory. Linux: VmHWM of /proc/self/status, which starts anew at
    exec; ru_maxrss would carry over the high-water mark of the process that spawned this one
    (bench/bench.py, with torch and models loaded)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kib / 1024 if sys.platform != "darwin" else kib / 2**20, 1)  # ru_maxrss: KiB (bytes on macOS)


def main(n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    labels = (np.arange(n) % 2).astype(np.int64)  # half anomalous
    masks = np.zeros((n, size, size), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for i in np.flatnonzero(labels):  # one or two discs per anomalous map, as defects
        for _ in range(1 + i % 2):
            cy, cx, r = rng.integers(size // 8, size - size // 8, 2).tolist() + [int(rng.integers(3, max(4, size // 10)))]
            masks[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    maps = rng.standard_normal((n, size, size), dtype=np.float32)  # float32, as infer writes them
    maps += np.float32(1.5) * masks  # in place: the inputs' own peak stays below the evaluation's
    scores = maps.reshape(n, -1).max(axis=1)
    defects = np.where(labels == 1, np.where(np.arange(n) % 4 == 1, "crack", "dot"), "good")
    inputs_mb = round((maps.nbytes + masks.nbytes) / 2**20, 1)
    val = np.arange(n) < max(4, n // 5)  # the stage chooses thresholds on val, scores test
    test = ~val
    before = peak_mb()
    tick = time.perf_counter()
    pixel_thr, _ = metrics.choose_thresholds(maps[val], masks[val], scores[val], labels[val])
    metrics.evaluate(maps[test], masks[test], scores[test], labels[test], defects[test], pixel_thr)
    metrics.roc_curve_table(maps[test], masks[test], scores[test], labels[test])
    metrics.pr_curve_table(maps[test], masks[test], scores[test], labels[test])
    print(json.dumps({"evaluate_seconds": round(time.perf_counter() - tick, 1), "evaluate_inputs_mb": inputs_mb,
                      "evaluate_rss_before_mb": before,
                      "evaluate_peak_mb": peak_mb()}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
