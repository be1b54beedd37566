"""Collect finished runs into ``summary.csv`` (one row per cohort, method, fold; results only, so
that reruns give the same bytes; only the runs that are *results* of the runs folder, never the
source models that exist only as inputs of transfer runs, see :mod:`steph.runs.requests`), ``timing.csv`` (training time and host of every run, from
``run.json``), a Markdown table of mean +- std per cohort and method with the average over
cohorts (like the paper's tables), and a plot of the per-fold C-indices.

For synthetic cohorts (a ``true_risk.csv`` beside the labels) an ``oracle`` row gives the
C-index of the true log-hazard on the same test patients: the ceiling any model can reach.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from steph.runs import INPUT, RESULT, RunRef, RunsFolder
from steph.survival.metrics import concordance_index
from steph.utils.io import atomic_path, write_csv, write_text

ORACLE = "oracle"
COLUMNS = ["cohort", "method", "repeat", "fold", "c_index", "train_c_index", "uno_c_index", "ibs",
           "n_train", "n_test", "test_events"]
TIMING_COLUMNS = ["cohort", "method", "repeat", "fold", "train_seconds", "host"]


def collect(runs_root: str | Path, targets: Sequence[str] | None = None,
            methods: Sequence[str] | None = None, folds: Sequence[int] | None = None,
            repeats: int | None = None, role: str | None = RESULT) -> pd.DataFrame:
    """Rows of every finished run matching the filters (all finished runs when None);
    ``repeats``: only repeats 0 .. repeats - 1; ``role``: only the results of the runs folder
    (default), only its input runs (``"input"``) or both (None)."""
    folder = RunsFolder(runs_root)
    roles = folder.roles() if role is not None else None
    rows = []
    for ref, run in folder.finished():
        if roles is not None and roles.role(ref.cohort, ref.method) != role:
            continue
        m = run.read_metrics()
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
    first = methods if methods is not None else (roles.methods if roles is not None else None)
    if first and len(df):
        order = {name: i for i, name in enumerate(method_order(df, first))}
        df = (df.assign(_o=df["method"].map(order))
              .sort_values(["cohort", "_o", "repeat", "fold"], kind="stable").drop(columns="_o"))
    return df.reset_index(drop=True)


def collect_timing(runs_root: str | Path, summary: pd.DataFrame) -> pd.DataFrame:
    """Training seconds and host of every run of ``summary`` (from run.json; runs written
    before run.json existed kept their time in metrics.json)."""
    rows = []
    cols = ["cohort", "method", "fold", "repeat"]
    for cohort, method, fold, repeat in summary[cols].itertuples(index=False):
        if method == ORACLE:
            continue
        run = RunsFolder(runs_root).run(RunRef(cohort, method, int(fold), int(repeat)))
        rec = run.read_record()
        seconds = rec.get("train_seconds")
        if seconds is None:  # runs written before run.json kept it in metrics.json
            seconds = run.read_metrics().get("train_seconds", np.nan)
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
        ref = RunRef(cohort, group["method"].iloc[0], fold, repeat)
        pred = RunsFolder(runs_root).run(ref).read_predictions()
        test = pred[pred["split"] == "test"]
        risk = truth.loc[test["patient_id"], "true_risk"].to_numpy()
        c = concordance_index(test["time"].to_numpy(), test["event"].to_numpy(), risk)
        rows.append({"cohort": cohort, "method": ORACLE, "repeat": repeat, "fold": fold, "c_index": c,
                     "n_test": len(test), "test_events": int(test["event"].sum())})
    return pd.DataFrame(rows, columns=COLUMNS)


def method_order(summary: pd.DataFrame, first: Sequence[str] | None = None) -> list[str]:
    """``first`` (e.g. the methods of this call, in their order), then every other method of
    ``summary`` in order of appearance, the oracle last."""
    names = list(dict.fromkeys([*(first or []), *summary["method"]]))
    return [m for m in names if m != ORACLE] + ([ORACLE] if ORACLE in names else [])


def input_runs_line(runs_root: str | Path) -> str:
    """One line naming the finished input runs a summary leaves out ('' when none)."""
    folder = RunsFolder(runs_root)
    roles = folder.roles()
    inputs = [ref for ref, _ in folder.finished() if roles.role(ref.cohort, ref.method) == INPUT]
    if not inputs:
        return ""
    names = ", ".join(str(r) for r in inputs[:8]) + (" ..." if len(inputs) > 8 else "")
    return (f"Not in these tables: {len(inputs)} input run(s), models of source cohorts that "
            f"transfer runs merged ({names})"
            + ("; results inferred: this runs folder predates requests.json" if roles.inferred
               else "") + ".")


def mean_sd_table(summary: pd.DataFrame, methods: Sequence[str] | None = None,
                  value: str = "c_index") -> pd.DataFrame:
    """The cells of the results table as strings: methods as rows (``methods`` first, in their
    order, then the summary's others), cohorts as columns, ``mean ± std (n=...)`` over folds
    ("–" where a method was not run; the sd of a single fold is "–"), plus ``Avg.`` (mean of
    the per-cohort means, only for methods evaluated on every cohort)."""
    cohorts = list(dict.fromkeys(summary["cohort"]))
    methods = method_order(summary, methods)
    stats = summary.groupby(["method", "cohort"])[value].agg(["mean", "std", "count"])
    n_rep = summary.groupby(["method", "cohort"])["repeat"].nunique() if "repeat" in summary else None
    rows = []
    for m in methods:
        cells, means = [], []
        for c in cohorts:
            if (m, c) in stats.index:
                s = stats.loc[(m, c)]
                std = "–" if int(s["count"]) < 2 or np.isnan(s["std"]) else f"{s['std']:.3f}"
                reps = int(n_rep.loc[(m, c)]) if n_rep is not None else 1
                n = (f"n={int(s['count'])}" if reps <= 1
                     else f"n={int(s['count'])}: {int(s['count']) // reps} folds x {reps} repeats")
                cells.append(f"{s['mean']:.4f} ± {std} ({n})")
                means.append(s["mean"])
            else:
                cells.append("–")
        avg = f"{np.mean(means):.4f}" if len(means) == len(cohorts) else "–"
        rows.append([*cells, avg])
    return pd.DataFrame(rows, index=pd.Index(methods, name="method"), columns=[*cohorts, "Avg."])


def markdown_table(summary: pd.DataFrame, methods: Sequence[str] | None = None,
                   value: str = "c_index") -> str:
    """:func:`mean_sd_table` as Markdown (like the paper's tables)."""
    if summary.empty:
        return "(no finished runs)\n"
    table = mean_sd_table(summary, methods, value)
    lines = ["| method | " + " | ".join(table.columns) + " |",
             "|---|" + "---|" * len(table.columns)]
    for m, row in table.iterrows():
        lines.append(f"| {m} | " + " | ".join(row) + " |")
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


def cindex_figure(summary: pd.DataFrame, methods: Sequence[str] | None = None):
    """Per-fold test C-index of each method, one panel per cohort with only the methods run
    on that cohort (methods as rows; a point per fold, a bar for mean +- sd; the oracle row,
    where there is one, is the ceiling). Returns a :class:`matplotlib.figure.Figure`."""
    from steph.utils.plotting import NothingToDraw, method_marker, new_figure, styled

    data = summary.dropna(subset=["c_index"])
    if data.empty:
        raise NothingToDraw("nothing to draw: no finished run with a test C-index")
    cohorts = list(dict.fromkeys(data["cohort"]))
    order = list(methods or dict.fromkeys(data["method"]))
    order += [m for m in dict.fromkeys(data["method"]) if m not in order]
    per_cohort = {c: [m for m in order if ((data["cohort"] == c) & (data["method"] == m)).any()]
                  for c in cohorts}
    ncols = 1 if len(cohorts) <= 3 else 2
    rows = [cohorts[i:i + ncols] for i in range(0, len(cohorts), ncols)]
    heights = [max(len(per_cohort[c]) for c in row) + 1.2 for row in rows]
    fig = new_figure(4.2 * ncols, 0.3 * sum(heights) + 0.5)
    spread = data.groupby(["cohort", "method"])["c_index"].agg(["mean", "std"]).fillna(0.0)
    lo = min(0.5, float(data["c_index"].min()), float((spread["mean"] - spread["std"]).min())) - 0.02
    hi = max(0.5, float(data["c_index"].max()), float((spread["mean"] + spread["std"]).max())) + 0.02
    with styled(fig):
        grid = fig.add_gridspec(len(rows), ncols, height_ratios=heights)
        for r, row in enumerate(rows):
            for col, cohort in enumerate(row):
                ax = fig.add_subplot(grid[r, col])
                names = per_cohort[cohort]
                sub = data[data["cohort"] == cohort]
                for y, m in enumerate(names):
                    vals = sub.loc[sub["method"] == m, "c_index"].to_numpy(float)
                    jitter = np.linspace(-0.15, 0.15, len(vals)) if len(vals) > 1 else np.zeros(1)
                    ax.scatter(vals, y + jitter, s=14, marker=method_marker(m),
                               facecolor="white" if m == ORACLE else "black",
                               edgecolor="black", linewidth=0.8, zorder=3)
                    sd = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
                    ax.errorbar(vals.mean(), y, xerr=sd, fmt="|", color="black", markersize=12,
                                capsize=3, linewidth=1.0, zorder=2)
                ax.set_yticks(range(len(names)), names)
                ax.set_ylim(len(names) - 0.5, -0.5)
                ax.set_xlim(lo, hi)  # the same scale in every panel
                ax.axvline(0.5, color="grey", linewidth=0.8, linestyle=":")
                ax.set_title(f"{cohort} ({sub['fold'].nunique()} fold(s))")
                ax.set_xlabel("test C-index (points: folds; bar: mean ± sd)")
                ax.set_ylabel("method")
    return fig


def plot_summary(summary: pd.DataFrame, path: str | Path) -> Path:
    """Write :func:`cindex_figure` to ``path`` (its suffix is the format)."""
    from steph.utils.plotting import figure_bytes

    path = Path(path)
    data = figure_bytes(cindex_figure(summary), path.suffix.lstrip(".") or "png", dpi=120)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
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
                  methods: Sequence[str] | None = None, plot: bool = True,
                  baseline: str = "abmil") -> pd.DataFrame:
    """Write summary.csv, comparisons.csv, timing.csv, summary.md and summary.png of every
    finished result run of the folder (whichever call made it); ``methods`` come first in the
    tables (e.g. those of the call that writes the summary)."""
    from steph.experiments.compare import compare_methods, comparison_markdown

    root = RunsFolder(runs_root)
    summary = collect(root.root)
    if not summary.empty:
        order = {name: i for i, name in enumerate(method_order(summary, methods))}
        summary = (summary.assign(_o=summary["method"].map(order))
                   .sort_values(["cohort", "_o", "repeat", "fold"], kind="stable")
                   .drop(columns="_o").reset_index(drop=True))
    if data_root is not None and not summary.empty:
        oracle = oracle_rows(root.root, data_root, summary)
        if not oracle.empty:
            summary = pd.concat([summary, oracle], ignore_index=True)
    summary = with_paired_difference(summary, baseline)
    write_csv(root / root.SUMMARY_CSV, summary)
    comparisons = compare_methods(summary, root.root, baseline=baseline)
    write_csv(root / root.COMPARISONS_CSV, comparisons)
    timing = collect_timing(root.root, summary)
    write_csv(root / root.TIMING_CSV, timing)
    inputs = input_runs_line(root.root)
    text = ["# Test C-index (cross-validation: mean ± std over folds)", "",
            markdown_table(summary, methods), *([inputs, ""] if inputs else []), "",
            f"## Compared with {baseline}", "",
            comparison_markdown(comparisons), "", "## Training time", "", timing_table(timing)]
    write_text(root / root.SUMMARY_MD, "\n".join(text))
    if plot and summary["c_index"].notna().any():
        plot_summary(summary, root / root.SUMMARY_PNG)
    return summary
