"""Paired comparisons of every method with a baseline method (ABMIL by default).

For each cohort and method, over the test folds both were evaluated on (the same patients):

* the **per-fold difference** of the test C-index, mean +- sd over folds (and repeats);
* a **bootstrap 95 % interval** of the C-index difference on the pooled out-of-fold
  predictions: the test predictions of all folds of a repeat are pooled (each patient once),
  patients are resampled with replacement, and the difference of the two pooled C-indices is
  recomputed on each resample (averaged over repeats when there are several); the percentile
  interval of :func:`scipy.stats.bootstrap` (1,000 resamples, seeded). Results are cached in
  ``RUNS/.cache/comparisons`` under a hash of the predictions they come from;

and across cohorts, for each method: the mean of the per-cohort differences, wins / ties /
losses and the Wilcoxon signed-rank p-value of the per-cohort differences
(:func:`scipy.stats.wilcoxon`, two-sided). All three use each cohort's **mean of the per-fold
differences** (``mean_diff``), never the pooled difference (``pooled_diff``): on few folds the
two can differ in sign (e.g. -0.003 per fold, +0.025 pooled), and the paper counts wins per
dataset on its per-fold means ("on 11 of 13 datasets"). A tie is a mean per-fold difference
within 0.0005 of 0, i.e. equal at the three decimals the tables show.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from steph.runs import RunRef, RunsFolder
from steph.survival.metrics import concordance_index_or_nan
from steph.utils.io import write_json

TIE = 5e-4
ALL = "ALL"
# table headers: the across-cohort counts name what they count
PER_FOLD = "per-fold diff (mean ± sd)"
MEAN = "mean per-fold diff"
WTL = "wins / ties / losses (per-fold mean)"
COLUMNS = ["cohort", "method", "baseline", "n_folds", "n_repeats", "n_patients", "mean_diff",
           "sd_diff", "pooled_c_method", "pooled_c_baseline", "pooled_diff", "ci_low", "ci_high",
           "wins", "ties", "losses", "wilcoxon_p"]


def _pooled_test(runs_root: Path, cohort: str, method: str, keys: Sequence[tuple[int, int]]
                 ) -> dict[int, pd.DataFrame]:
    """repeat -> test predictions of the folds ``keys`` ((repeat, fold) pairs), pooled."""
    out: dict[int, list[pd.DataFrame]] = {}
    for repeat, fold in keys:
        pred = RunsFolder(runs_root).run(RunRef(cohort, method, fold, repeat)).read_predictions()
        out.setdefault(repeat, []).append(pred[pred["split"] == "test"])
    return {r: pd.concat(frames).set_index("patient_id").sort_index() for r, frames in out.items()}


def bootstrap_difference(method: dict[int, pd.DataFrame], baseline: dict[int, pd.DataFrame],
                         n_resamples: int = 1000, seed: int = 0,
                         confidence: float = 0.95) -> tuple[float, float, float, float, float]:
    """(C method, C baseline, difference, low, high) on the pooled predictions, patients
    resampled with replacement (the same patients for both methods and every repeat)."""
    repeats = sorted(set(method) & set(baseline))
    ids = method[repeats[0]].index
    for r in repeats:  # patients predicted by both methods in every repeat
        ids = ids.intersection(method[r].index).intersection(baseline[r].index)
    arrays = []
    for r in repeats:
        m, b = method[r].loc[ids], baseline[r].loc[ids]
        arrays.append((m["time"].to_numpy(float), m["event"].to_numpy(int),
                       m["risk"].to_numpy(float), b["risk"].to_numpy(float)))

    def pooled(idx: np.ndarray) -> tuple[float, float]:
        cm = [concordance_index_or_nan(t[idx], e[idx], rm[idx]) for t, e, rm, _ in arrays]
        cb = [concordance_index_or_nan(t[idx], e[idx], rb[idx]) for t, e, _, rb in arrays]
        return float(np.mean(cm)), float(np.mean(cb))

    def diff(idx: np.ndarray) -> float:
        cm, cb = pooled(np.asarray(idx, dtype=int))
        return cm - cb

    everyone = np.arange(len(ids))
    c_m, c_b = pooled(everyone)
    low = high = float("nan")
    if len(ids) >= 4:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # resamples without a comparable pair give NaN
            res = stats.bootstrap((everyone,), diff, vectorized=False, n_resamples=n_resamples,
                                  confidence_level=confidence, method="percentile",
                                  rng=np.random.default_rng(seed))
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return c_m, c_b, c_m - c_b, low, high


def _cache_key(method: dict[int, pd.DataFrame], baseline: dict[int, pd.DataFrame],
               n_resamples: int, seed: int) -> str:
    h = hashlib.sha256(f"{n_resamples}:{seed}".encode())
    for pooled in (method, baseline):
        for r in sorted(pooled):
            h.update(pd.util.hash_pandas_object(pooled[r].reset_index(), index=False).values.tobytes())
    return h.hexdigest()[:32]


def _cache_read(runs_root: Path, key: str) -> tuple | None:
    path = RunsFolder(runs_root).cache("comparisons") / f"{key}.json"
    try:
        return tuple(float(v) for v in json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _cache_write(runs_root: Path, key: str, values: tuple) -> None:
    write_json(RunsFolder(runs_root).cache("comparisons") / f"{key}.json",
               [float(v) for v in values])


def compare_methods(summary: pd.DataFrame, runs_root: str | Path, baseline: str = "abmil",
                    n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per (cohort, method) compared with ``baseline``, then one ``ALL`` row per method
    (across cohorts). Methods or cohorts without the baseline's runs are left out."""
    runs_root = Path(runs_root)
    rows = []
    real = summary[summary["method"] != "oracle"]
    for cohort, sub in real.groupby("cohort", sort=False):
        base = sub[sub["method"] == baseline].set_index(["repeat", "fold"])["c_index"]
        if base.empty:
            continue
        for method in dict.fromkeys(sub["method"]):
            if method == baseline:
                continue
            mine = sub[sub["method"] == method].set_index(["repeat", "fold"])["c_index"]
            keys = sorted(set(mine.index) & set(base.index))
            if not keys:
                continue
            d = (mine.loc[keys] - base.loc[keys]).to_numpy(float)
            pooled_base = _pooled_test(runs_root, cohort, baseline, keys)
            pooled_mine = _pooled_test(runs_root, cohort, method, keys)
            key = _cache_key(pooled_mine, pooled_base, n_resamples, seed)
            cached = _cache_read(runs_root, key)
            if cached is None:
                cached = bootstrap_difference(pooled_mine, pooled_base, n_resamples, seed)
                _cache_write(runs_root, key, cached)
            c_m, c_b, pooled, low, high = cached
            n_pat = len(next(iter(pooled_base.values())))
            rows.append({"cohort": cohort, "method": method, "baseline": baseline,
                         "n_folds": len({k[1] for k in keys}), "n_repeats": len({k[0] for k in keys}),
                         "n_patients": n_pat, "mean_diff": float(np.mean(d)),
                         "sd_diff": float(np.std(d, ddof=1)) if len(d) > 1 else 0.0,
                         "pooled_c_method": c_m, "pooled_c_baseline": c_b, "pooled_diff": pooled,
                         "ci_low": low, "ci_high": high})
    per_cohort = pd.DataFrame(rows, columns=COLUMNS)
    return pd.concat([per_cohort, across_cohorts(per_cohort)], ignore_index=True)[COLUMNS]


def across_cohorts(per_cohort: pd.DataFrame) -> pd.DataFrame:
    """Per method: the mean over cohorts of the per-cohort mean per-fold differences
    (``mean_diff``), wins / ties / losses and the Wilcoxon p of those same per-cohort
    differences (the pooled differences are not used here)."""
    rows = []
    for method, sub in per_cohort.groupby("method", sort=False):
        d = sub["mean_diff"].to_numpy(float)
        p = float("nan")
        if len(d) >= 2 and np.any(np.abs(d) > 0):
            p = float(stats.wilcoxon(d, zero_method="zsplit").pvalue)
        rows.append({"cohort": ALL, "method": method, "baseline": sub["baseline"].iloc[0],
                     "n_folds": int(sub["n_folds"].sum()), "n_repeats": int(sub["n_repeats"].max()),
                     "n_patients": int(sub["n_patients"].sum()), "mean_diff": float(np.mean(d)),
                     "sd_diff": float(np.std(d, ddof=1)) if len(d) > 1 else 0.0,
                     "wins": int((d > TIE).sum()), "ties": int((np.abs(d) <= TIE).sum()),
                     "losses": int((d < -TIE).sum()), "wilcoxon_p": p})
    return pd.DataFrame(rows, columns=COLUMNS)


def comparison_cells(comp: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The comparisons as two tables of strings: per cohort (cohort, method, folds x repeats,
    per-fold diff (mean ± sd), pooled diff [95 % CI]) and across cohorts (method, cohorts, mean
    of the per-cohort per-fold diffs, wins / ties / losses and Wilcoxon p of those)."""
    per = [{"cohort": r.cohort, "method": r.method,
            "folds x repeats": f"{r.n_folds} x {r.n_repeats}",
            PER_FOLD: f"{r.mean_diff:+.4f} ± {r.sd_diff:.3f}",
            "pooled diff [95 % CI]": f"{r.pooled_diff:+.4f} [{r.ci_low:+.4f}, {r.ci_high:+.4f}]"}
           for r in comp[comp["cohort"] != ALL].itertuples(index=False)]
    across = []
    for r in comp[comp["cohort"] == ALL].itertuples(index=False):
        n = int(r.wins + r.ties + r.losses)
        p = "–" if not np.isfinite(r.wilcoxon_p) else f"{r.wilcoxon_p:.3g}"
        across.append({"method": r.method, "cohorts": str(n), MEAN: f"{r.mean_diff:+.4f}",
                       WTL: f"{int(r.wins)} / {int(r.ties)} / {int(r.losses)}",
                       "Wilcoxon p": p})
    return (pd.DataFrame(per, columns=["cohort", "method", "folds x repeats", PER_FOLD,
                                       "pooled diff [95 % CI]"]),
            pd.DataFrame(across, columns=["method", "cohorts", MEAN, WTL, "Wilcoxon p"]))


def _markdown(table: pd.DataFrame) -> list[str]:
    return ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns),
            *("| " + " | ".join(row) + " |" for row in table.itertuples(index=False))]


def comparison_markdown(comp: pd.DataFrame) -> str:
    """The comparisons as Markdown: per cohort, then across cohorts."""
    if comp.empty:
        return "(no method to compare: the baseline has no finished run)\n"
    baseline = comp["baseline"].iloc[0]
    per, across = comparison_cells(comp)
    intro = (f"Paired comparison with `{baseline}` on the same test folds: per-fold difference "
             "of the test C-index (mean ± sd) and a patient-bootstrap 95 % interval of the "
             "difference of the pooled out-of-fold C-indices.")
    lines = [intro, "", *_markdown(per)]
    if len(across):
        across_intro = ("Across cohorts (mean of the per-cohort mean per-fold differences; "
                        "wins / ties / losses and the Wilcoxon signed-rank p count those per-fold "
                        "means, not the pooled differences):")
        lines += ["", across_intro, "", *_markdown(across)]
    return "\n".join(lines) + "\n"
