"""The real-photo benchmark's results (its JSON) rendered as Markdown tables.

    python experiments/realphoto_table.py                             # bench/realphoto.json
    python experiments/realphoto_table.py bench/realphoto.json \
        --variant 'ddpm, reconstruction only=experiments/results/realphoto_s0_pix.json:ddpm'

docs/make_results.py renders docs/results/realphoto.md with it, so the tables cannot drift from the
figures they quote.

One row per category and method: the mean over seeds of pixel AUROC, AUPRO and image AUROC (the
range over seeds in brackets where there are several), the worst defect family's pixel AUROC,
the seeds, and what val chose for the map (`metrics/infer_<method>.json`: calibration and sources,
per seed). `--variant LABEL=FILE:METHOD` adds the rows of another run of the benchmark (e.g. with
`--set infer.memory=false`) under its own label.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("pixel_auroc", "aupro", "image_auroc")
BEGIN, END = "<!-- realphoto-table: experiments/realphoto_table.py -->", "<!-- /realphoto-table -->"


def _fmt(m: dict, key: str) -> str:
    value = m.get(key)
    if value is None:
        return "n/a"
    spread = (m.get("spread") or {}).get(key)
    if spread and len(m.get("per_seed", [])) > 1:
        return f"{value:.3f} ({spread[0]:.3f}-{spread[1]:.3f})"
    return f"{value:.3f}"


def _worst(m: dict) -> str:
    found = [(d, v["pixel_auroc"]) for d, v in (m.get("per_defect") or {}).items() if v.get("pixel_auroc") is not None]
    if not found:
        return "n/a"
    d, v = min(found, key=lambda dv: dv[1])
    return f"{d} {v:.2f}"


def _choice(m: dict) -> str:
    picks = []
    for run in m.get("per_seed", []):
        infer = run.get("infer") or {}
        if "map_calibration" in infer:
            picks.append(f"{infer['map_calibration']} / {infer['score_calibration']}")
        elif infer.get("map_sources"):
            picks.append(infer["map_sources"])
    return "; ".join(dict.fromkeys(picks)) or "n/a"


def rows(results: dict, label: dict | None = None) -> list[str]:
    out = []
    for cat, methods in results.items():
        for method, m in methods.items():
            name = (label or {}).get(method, f"`{method}`")
            seeds = ",".join(str(r["seed"]) for r in m.get("per_seed", []))
            out.append(f"| {cat} | {name} | " + " | ".join(_fmt(m, k) for k in FIGURES)
                       + f" | {_worst(m)} | {seeds} | {_choice(m)} |")
    return out


def markdown(main: dict, variants: list[tuple[str, dict, str]] = ()) -> str:
    by_cat: dict[str, list[str]] = {}
    for line in rows(main):
        by_cat.setdefault(line.split(" | ")[0][2:], []).append(line)
    for label, results, method in variants:
        part = {c: {method: ms[method]} for c, ms in results.items() if method in ms}
        for line in rows(part, {method: label}):
            by_cat.setdefault(line.split(" | ")[0][2:], []).append(line)
    head = ["| category | method | pixel AUROC | AUPRO | image AUROC | worst family (pixel AUROC) | seeds | "
            "val chose (map / score calibration) |", "|---|---|---|---|---|---|---|---|"]
    return "\n".join(head + [line for lines in by_cat.values() for line in lines]) + "\n"


def versus(main: dict, method: str = "ddpm", reference: str = "patchcore", pixel: dict | None = None) -> str:
    """Per category: `method` minus `reference` on each figure (means over the seeds both ran), and,
    with `pixel` (the same benchmark with the reconstruction alone), `method` minus the better of
    the two ("best of both": within -0.01 on every figure is the target)."""
    head = [f"| category | `{method}` - `{reference}` (pixel AUROC / AUPRO / image AUROC) | seeds | "
            + (f"`{method}` - best of (`{reference}`, `{method}` reconstruction only) | seeds |" if pixel else ""),
            "|---|---|---|" + ("---|---|" if pixel else "")]
    out = []

    def mean(m, key, seeds):
        values = [r[key] for r in m["per_seed"] if r["seed"] in seeds and r.get(key) is not None]
        return sum(values) / len(values) if values else None

    def diff(a, b):
        return "n/a" if a is None or b is None else f"{round(a - b, 3) + 0.0:+.3f}"  # + 0.0: no "-0.000"

    for cat, methods in main.items():
        if method not in methods or reference not in methods:
            continue
        m, r = methods[method], methods[reference]
        seeds = {x["seed"] for x in m["per_seed"]} & {x["seed"] for x in r["per_seed"]}
        row = " / ".join(diff(mean(m, k, seeds), mean(r, k, seeds)) for k in FIGURES)
        line = f"| {cat} | {row} | {','.join(map(str, sorted(seeds)))} |"
        p = (pixel or {}).get(cat, {}).get(method)
        if pixel and p is None:  # no run with the reconstruction alone: no best-of-both figure
            line += " n/a | |"
        elif pixel:
            both = seeds & {x["seed"] for x in p["per_seed"]}
            best = []
            for k in FIGURES:
                others = [v for v in (mean(r, k, both), mean(p, k, both)) if v is not None]
                best.append(diff(mean(m, k, both), max(others) if others else None))
            line += " " + " / ".join(best) + f" | {','.join(map(str, sorted(both)))} |"
        out.append(line)
    return "\n".join(head + out) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", type=Path, default=ROOT / "bench/realphoto.json")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=FILE:METHOD")
    parser.add_argument("--versus", action="store_true",
                        help="also: ddpm minus patchcore per category (and minus the better of the two, with --pixel)")
    parser.add_argument("--pixel", type=Path, metavar="JSON", help="the benchmark run with infer.memory=false")
    parser.add_argument("--into", type=Path, metavar="MARKDOWN",
                        help=f"replace the lines between {BEGIN!r} and {END!r} in this file (e.g. README.md)")
    args = parser.parse_args(argv)
    variants = []
    for spec in args.variant:
        label, rest = spec.split("=", 1)
        path, method = rest.rsplit(":", 1)
        variants.append((label, json.loads(Path(path).read_text()), method))
    text = markdown(json.loads(args.results.read_text()), variants)
    if args.versus:
        pixel = json.loads(args.pixel.read_text()) if args.pixel else None
        text += "\n" + versus(json.loads(args.results.read_text()), pixel=pixel)
    if args.into is None:
        print(text, end="")
        return
    doc = args.into.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"error: {args.into}: no {BEGIN} ... {END} block to replace")
    head, rest = doc.split(BEGIN, 1)
    args.into.write_text(head + BEGIN + "\n" + text + rest[rest.index(END):])


if __name__ == "__main__":
    main()
