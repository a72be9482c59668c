"""The experiment driver of the methods' claims as a grid of DVC experiments, and its report.

    python experiments/grid.py run --seeds 0 1 2 --jobs 2      # queue the grid, run it, then report
    python experiments/grid.py run --category moon --seeds 0   # on a real-photo category instead
    python experiments/grid.py report                          # table and plot from finished experiments

The claims: robust loss against contamination, simplex against Gaussian noise, over seeds, queued
and run with DVC's own machinery.

`run` queues one experiment per cell (names `grid-<data>-c<contamination>-<loss>-s<seed>` and
`grid-<data>-<noise>-s<seed>`):

    dvc exp run --queue -f -n <name> -S data.contamination=<c> -S robust.loss=<loss> -S seed=<s> evaluate@ddpm evaluate@rddpm
    dvc exp run --queue -f -n <name> -S ddpm.noise=simplex -S seed=<s> evaluate@ddpm

and starts `dvc queue start --jobs N` with `ANODIFF_THREADS` set to the cores over N, so the jobs
share the CPU without oversubscribing it. `ddpm` (plain MSE) trained on the same contaminated data
is the baseline of each robust loss; the Gaussian cell of the noise claim is the default cell
(contamination 0.1, `huber`), whose `ddpm` uses Gaussian noise.

`report` reads every method's `metrics/<method>.json` back from the newest experiment of each
name and writes `experiments/results/grid_<data>.json` (one row a cell and method, with the
experiment it came from), `experiments/results/grid_<data>.md` (the mean over seeds, the range in
brackets; then each claim as paired differences, a robust loss minus `ddpm` of the same experiment
and simplex minus Gaussian of the same seed, mean and range over seeds) and
`plots/grid_contamination_<data>.png` (pixel AP and pixel AUROC against contamination, a line per
loss and seed; below, the paired differences). A seed whose default cell did not run takes it from
runs of default params kept elsewhere (`_committed_default`, `_recorded_default`). Test figures,
settings chosen on val by the pipeline itself.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # the real-photo benchmark's DVC helpers
sys.path.insert(0, str(ROOT / "experiments" / "data"))  # the data builders
sys.path.insert(0, str(ROOT / "src"))  # this checkout's anodiff, not whichever is installed

from anodiff import io  # noqa: E402
from anodiff.data import contamination_count  # noqa: E402
from realphoto import _env, _exp_ref, _read_metrics  # noqa: E402
from realphoto_data import CATEGORIES, build_category  # noqa: E402

CONTAMINATION = (0.0, 0.1, 0.2, 0.3)
LOSSES = ("huber", "lts")
NOISES = ("simplex",)  # Gaussian: the default cell
KEYS = ("pixel_auroc", "pixel_ap", "aupro", "image_auroc")


def cells(data: str, seeds: list[int], contamination=CONTAMINATION, losses=LOSSES, noises=NOISES) -> list[dict]:
    """Every experiment of the grid: its name, its `-S` overrides, its targets and what it measures."""
    out = []
    for seed in seeds:
        for c in contamination:
            for loss in losses:
                out.append({"name": f"grid-{data}-c{c:g}-{loss}-s{seed}", "seed": seed, "contamination": c,
                            "loss": loss, "noise": "gaussian",
                            "set": [f"data.contamination={c:g}", f"robust.loss={loss}", f"seed={seed}",
                                    *_enough_anomalous(data, c)],
                            "targets": ["evaluate@ddpm", "evaluate@rddpm"], "methods": ["ddpm", "rddpm"]})
        for noise in noises:
            out.append({"name": f"grid-{data}-{noise}-s{seed}", "seed": seed, "contamination": 0.1, "loss": "mse",
                        "noise": noise, "set": [f"ddpm.noise={noise}", f"seed={seed}"],
                        "targets": ["evaluate@ddpm"], "methods": ["ddpm"]})
    return out


def _enough_anomalous(data: str, c: float) -> list[str]:
    """The embedded set has synth.n_train_anomalous anomalous training slabs; a contamination that
    needs more gets `synth.n_train_anomalous=<what it needs>`. The other slabs do not change with
    the counts (synth.py), so val and test stay the same images."""
    if data != "embedded":
        return []
    synth = yaml.safe_load((ROOT / "params.yaml").read_text())["synth"]
    need = contamination_count(synth["n_train_normal"], c)
    return [f"synth.n_train_anomalous={need}"] if need > synth["n_train_anomalous"] else []


def _data_args(category: str | None, data_dir: Path) -> tuple[str, list[str]]:
    if category is None:
        return "embedded", []
    folder = build_category(category, data_dir.resolve(), seed=0)
    return category, [f"data.source={folder}", "data.layout=mvtec"]


def _dvc(args: list[str], log) -> str:
    print("$", " ".join(args), file=log, flush=True)
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=_env())
    log.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(args)} failed (exit {proc.returncode}); see {log.name}")
    return proc.stdout


def _tasks(status: str) -> set[str]:
    """The task ids `dvc queue status` lists (first column)."""
    states = ("Queued", "Running", "Success", "Failed")
    return {line.split()[0] for line in status.splitlines() if line.split() and line.split()[-1] in states}


def _failed(status: str, names: set[str], old: set[str] = frozenset()) -> list[str]:
    """The experiments of `names` that `dvc queue status` lists as Failed, tasks in `old` aside: the
    queue keeps listing earlier runs' tasks, a failed earlier try of the same name among them."""
    rows = [line.split() for line in status.splitlines() if line.strip()]
    return [r[1] for r in rows if len(r) > 2 and r[1] in names and r[0] not in old and "Failed" in r]


def _wait(log, names: set[str], old: set[str], poll: float = 20.0) -> None:
    """Until the queue has nothing queued or running; a failed experiment of this grid is an error."""
    while True:
        status = _dvc(["dvc", "queue", "status"], log)
        failed = _failed(status, names, old)
        if failed:
            raise SystemExit(f"error: {', '.join(failed)} failed; `dvc queue logs <name>` tells why ({log.name})")
        if not any(word in line for line in status.splitlines() for word in ("Queued", "Running")):
            return
        time.sleep(poll)


def run(args) -> None:
    data, data_sets = _data_args(args.category, args.data_dir)
    grid = cells(data, args.seeds, args.contamination, args.losses, args.noises)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    started = time.perf_counter()
    with open(args.log, "w") as log:
        old = _tasks(_dvc(["dvc", "queue", "status"], log))  # earlier runs' tasks, still listed
        for cell in grid:
            sets = [s for kv in data_sets + cell["set"] for s in ("-S", kv)]
            _dvc(["dvc", "exp", "run", "--queue", "-f", "-n", cell["name"], *sets, *cell["targets"]], log)
        os.environ["ANODIFF_THREADS"] = str(threads)  # the workers and their stages inherit it
        _dvc(["dvc", "queue", "start", "--jobs", str(args.jobs)], log)
        _wait(log, {cell["name"] for cell in grid}, old)
    minutes = (time.perf_counter() - started) / 60
    print(f"{len(grid)} experiments in {minutes:.1f} min ({args.jobs} jobs, {threads} thread(s) each)")
    report(args, data=data)


def collect(data: str, seeds: list[int], contamination=CONTAMINATION) -> pd.DataFrame:
    rows = []
    for cell in cells(data, seeds, contamination):
        try:
            ref = _exp_ref(cell["name"])
        except SystemExit:
            continue  # not run (yet)
        for method in cell["methods"]:
            m = _read_metrics(ref, method)
            loss = "mse" if method == "ddpm" else cell["loss"]
            rows.append(_row(m, data=data, experiment=cell["name"], seed=cell["seed"], method=method,
                             contamination=cell["contamination"], loss=loss, noise=cell["noise"]))
    found = {r["experiment"] for r in rows}
    rows += _committed_default(data, seeds, found)
    rows += _recorded_default(data, seeds, found | {f"grid-{data}-c0.1-huber-s{r['seed']}" for r in rows
                                                    if r["experiment"] == "HEAD (dvc repro)"})
    return pd.DataFrame(rows)


def _recorded_default(data: str, seeds: list[int], found: set[str], realphoto: Path = ROOT / "bench/realphoto.json",
                      results: Path = ROOT / "experiments/results") -> list[dict]:
    """The default cell (contamination 0.1, huber, Gaussian) of a seed whose grid experiment did not
    run, where another run of default params with that seed kept the test figures: a real-photo
    category's `ddpm` and `rddpm` from the benchmark's `bench/realphoto.json` (per seed), the
    marble's `ddpm` from `experiments/results/gan_vs_ddpm/marble_s<seed>.json` (its `rddpm` did not
    run). They may come from another machine than the grid (the last digits move); the `experiment`
    column says where each row comes from."""
    rows = []
    todo = [s for s in seeds if f"grid-{data}-c0.1-huber-s{s}" not in found]
    if data == "embedded":
        for seed in todo:
            path = results / "gan_vs_ddpm" / f"marble_s{seed}.json"
            if path.exists():
                m = io.read_json(path)["ddpm"]
                rows.append(_row(m, data=data, experiment=f"experiments/results/gan_vs_ddpm/{path.name}", seed=seed,
                                 method="ddpm", contamination=0.1, loss="mse", noise="gaussian"))
        return rows
    recorded = io.read_json(realphoto).get(data, {}) if realphoto.exists() else {}
    for method, loss in (("ddpm", "mse"), ("rddpm", "huber")):
        for m in recorded.get(method, {}).get("per_seed", []):
            if m.get("seed") in todo:
                rows.append(_row(m, data=data, experiment="bench/realphoto.json", seed=m["seed"], method=method,
                                 contamination=0.1, loss=loss, noise="gaussian"))
    return rows


def _committed_default(data: str, seeds: list[int], found: set[str], params: dict | None = None) -> list[dict]:
    """The default cell (contamination 0.1, huber, Gaussian) of the embedded data is what `dvc repro`
    with params.yaml committed at HEAD computed, when HEAD's params (`params`) are exactly that cell
    for a seed whose experiment did not run: the same params, so the same figures, without a rerun."""
    if data != "embedded":
        return []
    if params is None:
        head = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=ROOT, capture_output=True, text=True)
        if head.returncode != 0:
            return []
        params = yaml.safe_load(head.stdout)
    seed = params["seed"]
    if (seed not in seeds or f"grid-embedded-c0.1-huber-s{seed}" in found or params["data"]["source"] != "synthetic"
            or params["data"]["contamination"] != 0.1 or params["robust"]["loss"] != "huber"
            or params["ddpm"]["noise"] != "gaussian"):
        return []
    rows = []
    for method, loss in (("ddpm", "mse"), ("rddpm", "huber")):
        m = _read_metrics("HEAD", method)
        rows.append(_row(m, data=data, experiment="HEAD (dvc repro)", seed=seed, method=method,
                         contamination=0.1, loss=loss, noise="gaussian"))
    return rows


def _row(m: dict, **cell) -> dict:
    """One table row: what the cell is, then a method's test figures `m` (per defect family too)."""
    return {**cell, **{k: m[k] for k in KEYS},
            **{f"pixel_auroc_{d}": v.get("pixel_auroc") for d, v in m.get("per_defect", {}).items()}}


def _summary(df: pd.DataFrame, by: list[str], keys=KEYS) -> pd.DataFrame:
    g = df.groupby(by)
    out = g[list(keys)].mean()
    lo, hi = g[list(keys)].min(), g[list(keys)].max()
    text = out.copy().astype(object)
    for k in keys:
        text[k] = [f"{m:.3f}" if n == 1 else f"{m:.3f} ({a:.3f}-{b:.3f})"
                   for m, a, b, n in zip(out[k], lo[k], hi[k], g.size())]
    text["seeds"] = g["seed"].apply(lambda s: ",".join(str(v) for v in sorted(s)))
    return text.reset_index()


def deltas(loss_rows: pd.DataFrame, noise_rows: pd.DataFrame, keys=KEYS) -> pd.DataFrame:
    """Each claim as paired differences: per seed, the claimed-better variant minus its baseline on
    the same data and seed, then the mean and range over seeds (what the verdicts quote). A robust
    loss pairs with the `mse` row of its own experiment, so `loss_rows` keeps every experiment's rows."""
    cols = ["seed", *keys]
    pairs = [(f"{loss} - mse", f"{c:g}", m) for (c, loss), m in _paired(loss_rows, keys).groupby(["contamination", "loss"])]
    gauss = noise_rows[noise_rows["noise"] == "gaussian"][cols]
    for noise, part in noise_rows[noise_rows["noise"] != "gaussian"].groupby("noise"):
        m = part[cols].merge(gauss, on="seed", suffixes=("", "_base"))
        pairs.append((f"{noise} - gaussian", "0.1", m.assign(**{k: m[k] - m[f"{k}_base"] for k in keys})))
    out = []
    for what, c, m in pairs:
        if m.empty:
            continue
        row = {"difference": what, "contamination": c}
        for k in keys:
            d = m[k]
            row[k] = f"{d.mean():+.3f}" if len(d) == 1 else f"{d.mean():+.3f} ({d.min():+.3f} to {d.max():+.3f})"
        row["seeds"] = ",".join(str(s) for s in sorted(m["seed"]))
        out.append(row)
    return pd.DataFrame(out, columns=["difference", "contamination", *keys, "seeds"])


def _paired(rows: pd.DataFrame, keys) -> pd.DataFrame:
    """Per seed and contamination, each robust loss's `keys` minus the `mse` of its own experiment."""
    on = ["experiment", "seed", "contamination"]
    base = rows[rows["loss"] == "mse"][[*on, *keys]]
    m = rows[rows["loss"] != "mse"].merge(base, on=on, suffixes=("", "_mse"))
    return m.assign(**{k: m[k] - m[f"{k}_mse"] for k in keys})[["loss", "seed", "contamination", *keys]]


def plot(df: pd.DataFrame, path: Path, title: str) -> None:
    """Top: pixel AP and pixel AUROC against contamination, a line per loss and seed (seeds differ
    more than losses do, so a mean over whichever seeds ran a cell would mislead). Bottom: the
    claim itself, each robust loss minus `mse` of the same run, a marker per seed, the line their mean."""
    colours = {loss: f"C{i}" for i, loss in enumerate(sorted(df["loss"].unique()))}
    markers = dict(zip(sorted(df["seed"].unique()), "os^vDP*X"))
    once = df.drop_duplicates(["seed", "contamination", "loss"])  # one row a cell (huber and lts runs share mse)
    paired = _paired(df, ["pixel_ap", "pixel_auroc"])
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for col, (key, label) in enumerate((("pixel_ap", "pixel AP"), ("pixel_auroc", "pixel AUROC"))):
        ax = axes[0, col]
        for (loss, seed), part in once.sort_values("contamination").groupby(["loss", "seed"]):
            ax.plot(part["contamination"], part[key], marker=markers[seed], color=colours[loss], lw=1, alpha=0.8,
                    label=f"{loss}, seed {seed}")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax = axes[1, col]
        ax.axhline(0, color="k", lw=0.8)
        for loss, part in paired.groupby("loss"):
            for seed, one in part.groupby("seed"):
                ax.scatter(one["contamination"], one[key], marker=markers[seed], color=colours[loss], alpha=0.7)
            mean = part.groupby("contamination")[key].mean()
            ax.plot(mean.index, mean.to_numpy(), color=colours[loss], lw=2, label=f"{loss} - mse (mean)")
        ax.set_ylabel(f"{label}: robust loss - mse, same run")
        ax.set_xlabel("data.contamination (share of defective training images)")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=2)
    if axes[1, 0].get_legend_handles_labels()[0]:
        axes[1, 0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)  # never half-written


def report(args, data: str | None = None) -> None:
    if data is None:
        data = "embedded" if args.category is None else args.category
    df = collect(data, args.seeds, args.contamination)
    if df.empty:
        raise SystemExit(f"error: no finished grid experiment for {data}, seeds {args.seeds}; "
                         "run `python experiments/grid.py run` first")
    out = args.out_dir
    io.write_json(out / f"grid_{data}.json", df.to_dict(orient="records"))
    gaussian = df[df["noise"] == "gaussian"]  # every experiment's rows: a robust loss pairs with its own run's mse
    loss_rows = gaussian.drop_duplicates(["seed", "contamination", "loss"])
    # the Gaussian cell of a seed: the ddpm of its default cell (the huber and lts experiments of
    # contamination 0.1 train the same ddpm; rows are in `collect`'s order, grid experiments first)
    noise_rows = df[(df["method"] == "ddpm") & (df["contamination"] == 0.1)].drop_duplicates(["seed", "noise"])
    loss_tab = _summary(loss_rows, ["contamination", "loss"])
    families = [c for c in df.columns if c.startswith("pixel_auroc_")]  # per defect family
    noise_tab = _summary(noise_rows, ["noise"], KEYS + tuple(families))
    md = (f"Robust loss against contamination ({data}; `mse` is method `ddpm`):\n\n"
          + loss_tab.to_markdown(index=False) + "\n\n"
          + f"Simplex against Gaussian noise ({data}, method `ddpm`, contamination 0.1):\n\n"
          + noise_tab.to_markdown(index=False) + "\n\n"
          + "Paired differences, the mean over seeds (min to max): a robust loss minus `mse` of the same run "
          + "(same data, same seed), simplex minus Gaussian of the same seed:\n\n"
          + deltas(gaussian, noise_rows).to_markdown(index=False) + "\n\n"
          + "Simplex minus Gaussian per defect family (pixel AUROC), the same pairs:\n\n"
          + deltas(df.iloc[:0], noise_rows, tuple(families)).to_markdown(index=False) + "\n")
    io.write_text(out / f"grid_{data}.md", md)
    plot(gaussian, args.plot_dir / f"grid_contamination_{data}.png",
         f"{data}: test figures against training contamination, seeds {','.join(map(str, sorted(df['seed'].unique())))}")
    print(md)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("run", "report"))
    parser.add_argument("--category", choices=CATEGORIES, default=None,
                        help="a real-photo category of experiments/data/realphoto_data.py; default: the embedded marble")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--contamination", nargs="*", type=float, default=list(CONTAMINATION),
                        help="data.contamination values of the loss grid (none: only the noise cells)")
    parser.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES),
                        help="robust.loss values of the loss grid (`run`; `report` reads whatever ran)")
    parser.add_argument("--noises", nargs="*", choices=NOISES, default=list(NOISES),
                        help="ddpm.noise cells besides the Gaussian default (`run`; none: only the loss grid)")
    parser.add_argument("--jobs", type=int, default=2, help="dvc queue start --jobs")
    parser.add_argument("--threads", type=int, default=0,
                        help="ANODIFF_THREADS of each job; default: the cores over --jobs")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "bench/realphoto_data",
                        help="where the category is built; default: the real-photo benchmark's images")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "experiments/results")
    parser.add_argument("--plot-dir", type=Path, default=ROOT / "plots")
    parser.add_argument("--log", type=Path, default=ROOT / "experiments/results/grid.log")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise SystemExit("error: --jobs must be at least 1")
    run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    main()
