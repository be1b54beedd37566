"""How close a data root's cross-cancer transfer is to the real one: the calibration of the
``calibrated`` synthetic preset (docs/calibration.md).

``calibrate``: cancer-specific ABMIL, 5-fold, on every cohort (``steph.experiments.run_cv``,
split between ``--jobs`` processes); the zero-shot matrix (each source's fold-0 model applied
unchanged to each target's test patients of every fold, mean C-index over folds) and its
statistics (``steph.analysis.transferability``); the event rates; the calibration table: each
statistic against the real UNI2-h / TCGA value, with the tolerance the synthetic value must be
within. Writes ``<runs>/study/``: ``calibration.csv``, ``calibration.json``, ``zero_shot.csv``,
``per_cohort.csv``.

``compare``: the given methods (e.g. ``abmil,steph,steph_xfit,joint``), 5-fold, on the given
targets (``run_cv`` split between ``--jobs`` processes, unless ``--no-train``); a table per
target of every method's mean test C-index and its paired per-fold difference to ABMIL; the
average over targets; joint's headroom (its gain over ABMIL) and the share of it each method
captures on the targets where joint gains >= 0.03; for every STEPH run, whether its source
coefficients w (1 - lambda) rank the helpful sources (zero-shot C-index > 0.5 on the fold's
*training* patients, the transferability map) above the others (AUC per fold). ``--extra
NAME=RUNS:METHOD`` adds a column read from another runs folder (e.g. the reference profile's).
Writes ``<runs>/study/compare.csv`` and ``ranking.csv``.

Example (2 processes, 1 thread each)::

    steph synth --out D --preset calibrated --seed 0
    python benchmarks/transfer_study.py calibrate --data D --runs R --jobs 2
    python benchmarks/transfer_study.py compare --data D --runs R --jobs 2 \
        --targets LUNG,BLCA --methods abmil,steph,steph_xfit,joint

Settings: ``benchmarks/configs/calibrated.yaml`` (64-d features: ABMIL 128 / 96; bags cached in
memory, one thread, no data workers) unless ``--config`` is given; ``--set`` overrides as
``steph cv`` takes them. ``--no-train`` only reads finished runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "configs" / "calibrated.yaml"

log = logging.getLogger("transfer_study")

# Real-data facts (UNI2-h, DSS, 13 TCGA cohorts; zero-shot = a source cancer's ABMIL applied
# unchanged to the target): statistic -> (key of steph.analysis.transferability's statistics,
# or of this script's, real value, tolerance the synthetic value must be within).
REAL: dict[str, tuple[str, float, float]] = {
    "abmil_mean": ("own_mean", 0.661, 0.02),
    "abmil_sd": ("own_sd", 0.080, 0.03),
    "abmil_min": ("own_min", 0.53, 0.04),
    "abmil_max": ("own_max", 0.80, 0.04),
    "zs_mean": ("zero_shot_mean", 0.537, 0.02),
    "zs_sd": ("zero_shot_sd", 0.073, 0.02),
    "zs_above_0.50": ("share_above_0.50", 0.72, 0.10),
    "zs_above_0.55": ("share_above_0.55", 0.39, 0.10),
    "zs_above_0.60": ("share_above_0.60", 0.21, 0.08),
    "best_source_gap": ("best_source_gap_mean", -0.053, 0.03),
    "targets_best_source_beats_own": ("best_source_beats_own", 2, 2),
    "target_variance_share": ("variance_by_target", 0.60, 0.15),
    "source_variance_share": ("variance_by_source", 0.05, 0.05),
    "symmetry_corr": ("symmetry_corr", 0.15, 0.15),
    "real_mutual_pairs_found": ("real_mutual_pairs_found", 4, 1),
    "event_rate_min": ("event_rate_min", 0.08, 0.02),
    "event_rate_max": ("event_rate_max", 0.48, 0.03),
    "event_rate_overall": ("event_rate_overall", 0.23, 0.02),
}
# the four pairs that are each other's best source in the real zero-shot matrix
REAL_MUTUAL = {("BLCA", "HNSC"), ("CESC", "STES"), ("LIHC", "SARC"), ("GBMLGG", "KIPAN")}


def study_config(config: str | None, sets: list[str]):
    from steph.config import load_config, parse_override

    return load_config(config or DEFAULT_CONFIG, dict(parse_override(s) for s in sets))


def cohorts_of(data: Path) -> list[str]:
    """The data root's cohorts, in the generator's order (Table S1's) when it has a manifest."""
    from steph.data.cohort import discover_cohorts

    names = discover_cohorts(data)
    manifest = data / "synth.json"
    if manifest.exists():
        order = [c["name"] for c in json.loads(manifest.read_text())["cohorts"]]
        names = [n for n in order if n in names] + [n for n in names if n not in order]
    return names


# -- the ABMIL grid ------------------------------------------------------------------------------

def _grid_worker(args: tuple) -> str:
    data, runs, methods, targets, folds, config, sets, logfile = args
    logging.basicConfig(filename=logfile, level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s", force=True)
    from steph.experiments import GridError, run_cv

    try:
        run_cv(data, runs, methods=methods, targets=targets, folds=folds,
               cfg=study_config(config, sets), progress=False)
    except GridError as err:  # the finished runs stand; report the failed ones
        return f"{','.join(targets)}: {err}"
    return ""


def run_grid(data: Path, runs: Path, methods: str, targets: list[str], folds: str, jobs: int,
             config: str | None, sets: list[str]) -> list[str]:
    """``run_cv`` over ``targets`` split between ``jobs`` processes, each its own targets (the
    runs folder's leases keep two processes off one run, e.g. theta_0); the failures."""
    parts = [p for p in (targets[i::jobs] for i in range(max(1, jobs))) if p]
    (runs / "study").mkdir(parents=True, exist_ok=True)
    args = [(str(data), str(runs), methods, p, folds, config, sets,
             str(runs / "study" / f"grid-{i}.log")) for i, p in enumerate(parts)]
    if len(args) == 1:
        errors = [_grid_worker(args[0])]
    else:
        with mp.get_context("spawn").Pool(len(args)) as pool:
            errors = pool.map(_grid_worker, args)
    return [e for e in errors if e]


# -- the calibration table -----------------------------------------------------------------------

def event_rates(data: Path, cohorts: list[str]) -> pd.DataFrame:
    from steph.data.cohort import Cohort

    rows = {}
    for c in cohorts:
        p = Cohort.load(data / c).patients
        rows[c] = {"n": len(p), "event_rate": float(p["event"].mean())}
    return pd.DataFrame.from_dict(rows, orient="index")


def synthetic_statistics(stats: dict[str, Any], ev: pd.DataFrame) -> dict[str, Any]:
    """``transfer_statistics`` plus the event rates and the real mutual-best pairs found."""
    out = dict(stats)
    out["real_mutual_pairs_found"] = sum(tuple(p) in REAL_MUTUAL
                                         for p in stats.get("mutual_best_pairs", []))
    out["event_rate_min"] = float(ev["event_rate"].min())
    out["event_rate_max"] = float(ev["event_rate"].max())
    out["event_rate_overall"] = float((ev["event_rate"] * ev["n"]).sum() / ev["n"].sum())
    return out


def calibration_table(synth: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for name, (key, real, tol) in REAL.items():
        v = float(synth.get(key, np.nan))
        rows.append({"statistic": name, "real": real, "synthetic": round(v, 4),
                     "tolerance": tol, "ok": bool(abs(v - real) <= tol + 1e-9)})
    return pd.DataFrame(rows)


def calibrate(args: argparse.Namespace) -> pd.DataFrame:
    from steph.analysis import transferability as T

    data, runs = Path(args.data), Path(args.runs)
    cfg = study_config(args.config, args.set)
    arch = cfg.model.arch
    cohorts = cohorts_of(data)
    t0 = time.perf_counter()
    if not args.no_train:
        for e in run_grid(data, runs, arch, cohorts, args.folds, args.jobs, args.config,
                          args.set):
            log.error("grid: %s", e)
    t_grid = time.perf_counter() - t0
    table = T.zero_shot_table(runs, data, arch=arch, targets=cohorts, sources=cohorts,
                              progress=True)
    M = T.transfer_matrix(table).reindex(index=cohorts, columns=cohorts)
    stats = T.transfer_statistics(M)
    ev = event_rates(data, cohorts)
    synth = synthetic_statistics(stats, ev)
    calib = calibration_table(synth)

    off = M.where(~np.eye(len(M), dtype=bool))
    per = ev.assign(event_rate=ev["event_rate"].round(3),
                    abmil=pd.Series(np.diag(M.to_numpy()), index=cohorts).round(4),
                    zs_as_target_mean=off.mean(axis=0).round(4),
                    zs_as_source_mean=off.mean(axis=1).round(4),
                    best_source=pd.Series(stats["best_source"]),
                    best_source_c=off.max(axis=0).round(4))
    out = runs / "study"
    out.mkdir(parents=True, exist_ok=True)
    M.round(4).to_csv(out / "zero_shot.csv")
    calib.to_csv(out / "calibration.csv", index=False)
    per.to_csv(out / "per_cohort.csv")
    extra = {"mutual_best_pairs": ["-".join(p) for p in stats.get("mutual_best_pairs", [])]}
    (out / "calibration.json").write_text(json.dumps(
        {"table": calib.to_dict(orient="records"), "extra": extra,
         "grid_seconds": round(t_grid, 1)}, indent=1, default=str))
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(per.to_string())
        print()
        print(M.round(3).to_string())
        print()
        print(calib.to_string(index=False))
    print(json.dumps(extra))
    print(f"ok {int(calib['ok'].sum())}/{len(calib)}; grid {t_grid:.0f} s")
    return calib


# -- methods against ABMIL on the calibrated preset ------------------------------------------------

def fold_scores(runs: Path, method: str, targets: list[str]) -> pd.DataFrame:
    """Test C-index per (target, fold) of ``method``'s finished runs (repeat 0)."""
    from steph.runs import RunsFolder

    rows = [{"target": ref.cohort, "fold": ref.fold, "c_index": run.read_metrics()["c_index"]}
            for ref, run in RunsFolder(runs).finished()
            if ref.method == method and ref.cohort in targets and ref.repeat == 0]
    return pd.DataFrame(rows, columns=["target", "fold", "c_index"])


def ranking_auc(coef: pd.Series, helpful: list[str]) -> float:
    """Probability that a helpful source gets a larger coefficient than an unhelpful one (ties
    count half); NaN when either group is empty."""
    good = coef[coef.index.isin(helpful)].to_numpy()
    bad = coef[~coef.index.isin(helpful)].to_numpy()
    if not (len(good) and len(bad)):
        return float("nan")
    diff = good[:, None] - bad[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def source_ranking(runs: Path, data: Path, method: str, targets: list[str]) -> pd.DataFrame:
    from steph.analysis import transferability as T
    from steph.experiments.demo import source_weights

    table = T.zero_shot_table(runs, data, targets=targets)
    rows = []
    for t in targets:
        w = source_weights(runs, t, method)
        for fold_dir, coef in w.iterrows():
            fold = int(str(fold_dir).removeprefix("fold"))
            helpful = T.helpful_sources(table, t, fold)
            rows.append({"target": t, "method": method, "fold": fold,
                         "helpful": len(helpful), "sources": int(coef.notna().sum()),
                         "auc": ranking_auc(coef.dropna(), helpful),
                         "top_source": coef.idxmax()})
    return pd.DataFrame(rows)


def compare(args: argparse.Namespace) -> pd.DataFrame:
    data, runs = Path(args.data), Path(args.runs)
    methods = [m for m in args.methods.split(",") if m]
    targets = [t for t in args.targets.split(",") if t] if args.targets else cohorts_of(data)
    if "abmil" not in methods:
        methods = ["abmil", *methods]
    t0 = time.perf_counter()
    if not args.no_train:
        for e in run_grid(data, runs, ",".join(methods), targets, args.folds, args.jobs,
                          args.config, args.set):
            log.error("grid: %s", e)
    columns = {m: (runs, m) for m in methods}
    for spec in args.extra:
        name, _, where = spec.partition("=")
        folder, _, method = where.rpartition(":")
        columns[name] = (Path(folder), method)
    scores = {name: fold_scores(folder, m, targets) for name, (folder, m) in columns.items()}
    base = scores["abmil"].set_index(["target", "fold"])["c_index"]
    rows = []
    for t in targets:
        row: dict[str, Any] = {"target": t}
        for name, s in scores.items():
            s = s[s["target"] == t].set_index(["target", "fold"])["c_index"]
            row[name] = s.mean() if len(s) else np.nan
            if name != "abmil":  # paired: folds both have
                d = (s - base).dropna()
                row[f"{name}-abmil"] = d.mean() if len(d) else np.nan
                row[f"{name}_folds"] = len(d)
        rows.append(row)
    table = pd.DataFrame(rows).set_index("target")
    diffs = [c for c in table.columns if c.endswith("-abmil")]
    avg = table[[c for c in table.columns if not c.endswith("_folds")]].mean()
    if "joint-abmil" in table:
        room = table["joint-abmil"]
        where = room >= 0.03
        for c in diffs:
            if c != "joint-abmil":
                share = (table.loc[where, c] / room[where]).mean() if where.any() else np.nan
                log.info("%s captures %.2f of joint's headroom on %d target(s) where joint "
                         "gains >= 0.03", c.removesuffix("-abmil"), share, int(where.sum()))
    out = runs / "study"
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "compare.csv")
    steph_like = [m for m in methods if m.startswith("steph")]
    ranking = pd.concat([source_ranking(runs, data, m, targets) for m in steph_like],
                        ignore_index=True) if steph_like else pd.DataFrame()
    ranking.to_csv(out / "ranking.csv", index=False)
    with pd.option_context("display.width", 220, "display.max_columns", 30):
        print(table.round(4).to_string())
        print("average", avg.round(4).to_dict())
        if len(ranking):
            print(ranking.round(3).to_string(index=False))
            summary = ranking.groupby(["method", "target"])["auc"].agg(
                folds_above_half=lambda a: int((a > 0.5).sum()), folds="count", mean="mean")
            print(summary.round(3).to_string())
    print(f"compare: {time.perf_counter() - t0:.0f} s")
    return table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate", help="the ABMIL grid, the zero-shot matrix, the table")
    c.add_argument("--data", required=True)
    c.add_argument("--runs", required=True)
    c.add_argument("--config", default=None, help=f"default: {DEFAULT_CONFIG.name}")
    c.add_argument("--set", action="append", default=[], help="section.key=value")
    c.add_argument("--jobs", type=int, default=1, help="training processes")
    c.add_argument("--folds", default="0-4")
    c.add_argument("--no-train", action="store_true", help="only read finished runs")
    k = sub.add_parser("compare", help="methods against ABMIL, joint's headroom, source ranking")
    k.add_argument("--data", required=True)
    k.add_argument("--runs", required=True)
    k.add_argument("--targets", default=None, help="comma-separated (default: all)")
    k.add_argument("--methods", default="abmil,steph,steph_xfit,joint")
    k.add_argument("--extra", action="append", default=[], help="NAME=RUNS:METHOD")
    k.add_argument("--config", default=None, help=f"default: {DEFAULT_CONFIG.name}")
    k.add_argument("--set", action="append", default=[], help="section.key=value")
    k.add_argument("--jobs", type=int, default=1, help="training processes")
    k.add_argument("--folds", default="0-4")
    k.add_argument("--no-train", action="store_true", help="only read finished runs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s: %(message)s")
    import torch

    from steph.errors import StephError

    torch.set_num_threads(1)  # the predictions run here; the grid's runs pin train.threads
    try:
        calibrate(args) if args.cmd == "calibrate" else compare(args)
    except StephError as err:  # one line, as the CLI reports it
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
