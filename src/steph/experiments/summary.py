"""Collect finished runs into ``summary.csv`` (one row per cohort, method, fold; results only, so
that reruns give the same bytes), ``timing.csv`` (training time and host of every run, from
``run.json``), a Markdown table of mean +- std per cohort and method with the average over
cohorts (like the paper's tables), and a plot of the per-fold C-indices.

For synthetic cohorts (a ``true_risk.csv`` beside the labels) an ``oracle`` row gives the
C-index of the true log-hazard on the same test patients: the ceiling any model can reach.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from steph.experiments.runs import METRICS, PREDICTIONS, read_run_record, run_dir
from steph.survival.metrics import concordance_index
from steph.utils.io import atomic_path, write_csv, write_text

ORACLE = "oracle"
COLUMNS = ["cohort", "method", "repeat", "fold", "c_index", "train_c_index", "uno_c_index", "ibs",
           "n_train", "n_test", "test_events"]
TIMING_COLUMNS = ["cohort", "method", "repeat", "fold", "train_seconds", "host"]


def collect(runs_root: str | Path, targets: Sequence[str] | None = None,
            methods: Sequence[str] | None = None, folds: Sequence[int] | None = None,
            repeats: int | None = None) -> pd.DataFrame:
    """Rows of every finished run matching the filters (all finished runs when None);
    ``repeats``: only repeats 0 .. repeats - 1."""
    root = Path(runs_root)
    rows = []
    paths = sorted([*root.glob(f"*/*/fold*/{METRICS}"), *root.glob(f"*/*/rep*/fold*/{METRICS}")])
    for metrics_path in paths:
        m = json.loads(metrics_path.read_text())
        m.setdefault("repeat", 0)  # runs written before repeats existed
        if targets is not None and m["cohort"] not in targets:
            continue
        if methods is not None and m["method"] not in methods:
            continue
        if folds is not None and m["fold"] not in folds:
            continue
        if repeats is not None and m["repeat"] >= repeats:
            continue
        rows.append({c: m.get(c, np.nan) for c in COLUMNS})
    df = pd.DataFrame(rows, columns=COLUMNS)
    if methods is not None and len(df):
        order = {name: i for i, name in enumerate(methods)}
        df = (df.assign(_o=df["method"].map(order))
              .sort_values(["cohort", "_o", "repeat", "fold"]).drop(columns="_o"))
    return df.reset_index(drop=True)


def collect_timing(runs_root: str | Path, summary: pd.DataFrame) -> pd.DataFrame:
    """Training seconds and host of every run of ``summary`` (from run.json; runs written
    before run.json existed kept their time in metrics.json)."""
    rows = []
    cols = ["cohort", "method", "fold", "repeat"]
    for cohort, method, fold, repeat in summary[cols].itertuples(index=False):
        if method == ORACLE:
            continue
        path = run_dir(runs_root, cohort, method, int(fold), int(repeat))
        rec = read_run_record(path)
        seconds = rec.get("train_seconds")
        if seconds is None:
            seconds = json.loads((path / METRICS).read_text()).get("train_seconds", np.nan)
        rows.append({"cohort": cohort, "method": method, "repeat": int(repeat), "fold": int(fold),
                     "train_seconds": seconds, "host": rec.get("host", "")})
    return pd.DataFrame(rows, columns=TIMING_COLUMNS)


def oracle_rows(runs_root: str | Path, data_root: str | Path, summary: pd.DataFrame) -> pd.DataFrame:
    """C-index of the true risk on each (cohort, fold)'s test patients, for synthetic cohorts."""
    rows = []
    for (cohort, repeat, fold), group in summary.groupby(["cohort", "repeat", "fold"]):
        truth_path = Path(data_root) / cohort / "true_risk.csv"
        if not truth_path.exists():
            continue
        truth = pd.read_csv(truth_path, dtype={"patient_id": str}).set_index("patient_id")
        pred = pd.read_csv(run_dir(runs_root, cohort, group["method"].iloc[0], fold, repeat) / PREDICTIONS,
                           dtype={"patient_id": str})
        test = pred[pred["split"] == "test"]
        risk = truth.loc[test["patient_id"], "true_risk"].to_numpy()
        c = concordance_index(test["time"].to_numpy(), test["event"].to_numpy(), risk)
        rows.append({"cohort": cohort, "method": ORACLE, "repeat": repeat, "fold": fold, "c_index": c,
                     "n_test": len(test), "test_events": int(test["event"].sum())})
    return pd.DataFrame(rows, columns=COLUMNS)


def markdown_table(summary: pd.DataFrame, methods: Sequence[str] | None = None,
                   value: str = "c_index") -> str:
    """Methods as rows, cohorts as columns, ``mean ± std`` over folds, plus ``Avg.`` (mean of
    the per-cohort means, only for methods evaluated on every cohort)."""
    if summary.empty:
        return "(no finished runs)\n"
    cohorts = list(dict.fromkeys(summary["cohort"]))
    methods = list(methods or dict.fromkeys(summary["method"]))
    if ORACLE in set(summary["method"]) and ORACLE not in methods:
        methods.append(ORACLE)
    stats = summary.groupby(["method", "cohort"])[value].agg(["mean", "std", "count"])
    n_rep = summary.groupby(["method", "cohort"])["repeat"].nunique() if "repeat" in summary else None
    lines = ["| method | " + " | ".join(cohorts) + " | Avg. |",
             "|---|" + "---|" * (len(cohorts) + 1)]
    for m in methods:
        cells, means = [], []
        for c in cohorts:
            if (m, c) in stats.index:
                s = stats.loc[(m, c)]
                std = 0.0 if np.isnan(s["std"]) else s["std"]
                reps = int(n_rep.loc[(m, c)]) if n_rep is not None else 1
                n = (f"n={int(s['count'])}" if reps <= 1
                     else f"n={int(s['count'])}: {int(s['count']) // reps} folds x {reps} repeats")
                cells.append(f"{s['mean']:.4f} ± {std:.3f} ({n})")
                means.append(s["mean"])
            else:
                cells.append("–")
        avg = f"{np.mean(means):.4f}" if len(means) == len(cohorts) else "–"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(lines) + "\n"


def timing_table(timing: pd.DataFrame) -> str:
    """Mean and total training seconds per method (``timing``: rows of :func:`collect_timing`)."""
    if timing.empty:
        return ""
    t = timing.groupby("method", sort=False)["train_seconds"].agg(["mean", "sum", "count"])
    lines = ["| method | runs | mean s/run | total s |", "|---|---|---|---|"]
    for m, r in t.iterrows():
        lines.append(f"| {m} | {int(r['count'])} | {r['mean']:.1f} | {r['sum']:.1f} |")
    return "\n".join(lines) + "\n"


def plot_summary(summary: pd.DataFrame, path: str | Path) -> Path:
    """Per-fold test C-index of each method, one panel per cohort."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cohorts = list(dict.fromkeys(summary["cohort"]))
    methods = list(dict.fromkeys(summary["method"]))
    fig, axes = plt.subplots(1, len(cohorts), figsize=(max(4.0, 1.0 + 0.7 * len(methods)) * len(cohorts), 3.6),
                             squeeze=False, sharey=True)
    for ax, cohort in zip(axes[0], cohorts):
        sub = summary[summary["cohort"] == cohort]
        data = [sub.loc[sub["method"] == m, "c_index"].dropna().to_numpy() for m in methods]
        ax.boxplot(data, showmeans=True, widths=0.6)
        for i, d in enumerate(data, start=1):
            ax.scatter(np.full(len(d), i) + np.linspace(-0.12, 0.12, len(d)) if len(d) else [], d, s=10,
                       alpha=0.7, color="k", zorder=3)
        ax.set_xticks(range(1, len(methods) + 1), methods, rotation=45, ha="right", fontsize=8)
        ax.set_title(cohort)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("test C-index (per fold)")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def with_paired_difference(summary: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Add ``baseline`` and ``c_index_diff`` (this run's test C-index minus the baseline
    method's on the same cohort, repeat and fold; NaN where the baseline has no such run)."""
    base = (summary[summary["method"] == baseline]
            .set_index(["cohort", "repeat", "fold"])["c_index"].rename("_base"))
    out = summary.join(base, on=["cohort", "repeat", "fold"])
    out["baseline"] = baseline
    out["c_index_diff"] = np.where(out["method"].isin([baseline, ORACLE]), np.nan,
                                   out["c_index"] - out["_base"])
    return out.drop(columns="_base")


def write_summary(runs_root: str | Path, data_root: str | Path | None = None,
                  targets: Sequence[str] | None = None, methods: Sequence[str] | None = None,
                  folds: Sequence[int] | None = None, plot: bool = True,
                  repeats: int | None = None, baseline: str = "abmil") -> pd.DataFrame:
    """Write summary.csv, comparisons.csv, timing.csv, summary.md and summary.png."""
    from steph.experiments.compare import comparison_markdown, compare_methods

    root = Path(runs_root)
    summary = collect(root, targets, methods, folds, repeats)
    if data_root is not None and not summary.empty:
        oracle = oracle_rows(root, data_root, summary)
        if not oracle.empty:
            summary = pd.concat([summary, oracle], ignore_index=True)
    summary = with_paired_difference(summary, baseline)
    write_csv(root / "summary.csv", summary)
    comparisons = compare_methods(summary, root, baseline=baseline)
    write_csv(root / "comparisons.csv", comparisons)
    timing = collect_timing(root, summary)
    write_csv(root / "timing.csv", timing)
    text = ["# Test C-index (cross-validation: mean ± std over folds)", "",
            markdown_table(summary, methods), "", f"## Compared with {baseline}", "",
            comparison_markdown(comparisons), "", "## Training time", "", timing_table(timing)]
    write_text(root / "summary.md", "\n".join(text))
    if plot and not summary.empty:
        plot_summary(summary, root / "summary.png")
    return summary
