"""report: every method side by side, in metrics/summary.md, metrics/timing/summary.md and headline.json.

metrics/summary.md holds the quality, metrics/timing/summary.md the speed, and
metrics/headline.json three figures per method under short names, for `dvc exp show`.

The quality figures come from metrics/<method>.json; the speed, from metrics/timing/<stage>.json.
Two files, because the same params give the same quality bytes but never the same seconds: the
quality table is reproducible to the byte (dvc.lock's hash of it too), the timing table is not."""

from __future__ import annotations

import pandas as pd

from _common import ROOT, run_stage
from anodiff import io
from anodiff.errors import DataError

METHODS = ("ddpm", "rddpm", "gan", "patchcore")
KEYS = ("pixel_auroc", "pixel_ap", "aupro", "pixel_f1_max", "dice", "image_auroc", "image_ap",
        "n_test_images")
#: the training stages a method's result needs (its inference is infer@<method>)
TRAINING = {"ddpm": ("pretrain_ddpm",), "rddpm": ("train_robust_ddpm",), "gan": ("pretrain_ddpm", "train_gan_noise"),
            "patchcore": ("train_patchcore",)}


def table(results: dict[str, dict], sources: dict[str, str] | None = None) -> pd.DataFrame:
    """Rows = methods, columns = the metric keys; per-defect rows follow as method/defect.
    `sources`: what each method's map is made of (metrics/infer_<method>.json's map_sources)."""
    sources = sources or {}
    rows = [{"method": method, "map": "skipped" if res.get("skipped") else sources.get(method),
             **{k: res.get(k) for k in KEYS}} for method, res in results.items()]
    for method, res in results.items():
        for defect, sub in sorted(res.get("per_defect", {}).items()):
            rows.append({"method": f"{method} / {defect}", "map": sources.get(method), **{k: sub.get(k) for k in KEYS}})
    return pd.DataFrame(rows)


#: metrics/headline.json's short names: `dvc exp show` with the README's filter shows the methods side by
#: side in 120 columns (the full names, metrics/<method>.json:pixel_auroc, take 30 columns each)
HEADLINE = {"px": "pixel_auroc", "pro": "aupro", "img": "image_auroc"}


def headline(results: dict[str, dict]) -> dict:
    """{method: {px, pro, img}}: pixel AUROC, AUPRO and image AUROC of each method, for `dvc exp show`."""
    return {m: {short: res.get(key) for short, key in HEADLINE.items()} for m, res in results.items()}


def timing_table(timing: dict[str, dict]) -> pd.DataFrame:
    """Rows = methods: the seconds of the training stages it needs, of its inference, per test image,
    and the torch threads its inference ran with."""
    rows = []
    for method, stages in TRAINING.items():
        infer = timing[f"infer_{method}"]
        rows.append({"method": method, "training stages": " + ".join(stages),
                     "training (s)": sum(timing[s].get("seconds", float("nan")) for s in stages),
                     # gan's own level, plus what the levels it took from infer@ddpm cost there (estimated)
                     "inference (s)": (None if infer.get("seconds") is None else
                                       infer["seconds"] + (infer.get("shared_seconds_estimate") or 0)),
                     "seconds_per_image": infer.get("seconds_per_image"),
                     "threads": infer.get("threads")})
    return pd.DataFrame(rows)


def _read(path, stage: str) -> dict:
    if not path.exists():
        raise DataError(f"{path}: missing; run `dvc repro {stage}` first")
    return io.read_json(path)


def main(params) -> None:
    results = {m: _read(ROOT / f"metrics/{m}.json", f"evaluate@{m}") for m in METHODS}
    sources = {m: _read(ROOT / f"metrics/infer_{m}.json", f"infer@{m}").get("map_sources") for m in METHODS}
    names = sorted({s for stages in TRAINING.values() for s in stages} | {f"infer_{m}" for m in METHODS})
    timing = {s: _read(ROOT / f"metrics/timing/{s}.json", s.replace("infer_", "infer@")) for s in names}
    text = ("# anodiff: all methods on the test split\n\n"
            "Thresholds chosen on the validation split; `null` = undefined (no masks or one class).\n"
            + "".join(f"`{m}` skipped: {r['skipped']}.\n" for m, r in results.items() if r.get("skipped"))
            + "`map`: what the map is made of, as val chose it (`reconstruction+memory`: the diffusion "
            "map fuses in PatchCore's memory distance, which the `patchcore` row shows alone).\n"
            "Speed: metrics/timing/summary.md.\n\n"
            + table(results, sources).to_markdown(index=False, floatfmt=".4f", missingval="null") + "\n")
    speed = ("# anodiff: what each method cost on this machine\n\n"
             "Seconds of the training stages each method needs and of its inference (varies run to "
             "run; each stage's figures: metrics/timing/<stage>.json). gan's inference counts the levels "
             "it takes from infer@ddpm at what they cost there (`shared_seconds_estimate`).\n\n"
             + timing_table(timing).to_markdown(index=False, floatfmt=".2f", missingval="null") + "\n")
    io.write_json(ROOT / "metrics/headline.json", headline(results))
    io.write_text(ROOT / "metrics/timing/summary.md", speed)
    io.write_text(ROOT / "metrics/summary.md", text)
    print(speed)
    print(text)


if __name__ == "__main__":
    run_stage(main)
