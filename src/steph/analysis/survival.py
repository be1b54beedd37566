"""Test patients split by predicted risk, as survival papers show a model's stratification.

For every fold of a (cohort, method), the cut is the median of that fold's *training* risks
(the test patients never decide it); a test patient whose risk is above its fold's cut is in the
high-risk group, else in the low-risk group. The test patients of all folds of one repeat are
then pooled (each patient is a test patient once per repeat). The groups' Kaplan-Meier curves
and the log-rank test come from lifelines (MIT).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from steph.analysis.runs import RunRef, read_predictions

HIGH, LOW = "high risk", "low risk"
GROUP_COLUMNS = ["cohort", "method", "repeat", "fold", "patient_id", "risk", "cut", "group",
                 "time", "event"]


def risk_groups(runs_root: str | Path, runs: Sequence[RunRef]) -> pd.DataFrame:
    """One row per test patient of ``runs`` with its fold's cut and its group."""
    frames = []
    for run in runs:
        pred = read_predictions(run.path(runs_root))
        train = pred.loc[pred["split"] == "train", "risk"].to_numpy(float)
        test = pred[pred["split"] == "test"].copy()
        if not len(train) or test.empty:
            continue
        cut = float(np.median(train))
        test["cut"] = cut
        test["group"] = np.where(test["risk"].to_numpy(float) > cut, HIGH, LOW)
        for col, value in (("cohort", run.cohort), ("method", run.method),
                           ("repeat", run.repeat), ("fold", run.fold)):
            test[col] = value
        frames.append(test[GROUP_COLUMNS])
    if not frames:
        return pd.DataFrame(columns=GROUP_COLUMNS)
    return pd.concat(frames, ignore_index=True)


def logrank_p(groups: pd.DataFrame) -> float:
    """Two-sided log-rank p-value of high vs low risk (NaN when a group is empty or no event
    was observed)."""
    from lifelines.statistics import logrank_test

    high, low = groups[groups["group"] == HIGH], groups[groups["group"] == LOW]
    if high.empty or low.empty or int(groups["event"].sum()) == 0:
        return float("nan")
    res = logrank_test(high["time"].to_numpy(float), low["time"].to_numpy(float),
                       high["event"].to_numpy(int), low["event"].to_numpy(int))
    return float(res.p_value)


def km_curve(times: np.ndarray, events: np.ndarray) -> pd.DataFrame:
    """Kaplan-Meier estimate with its 95 % interval: columns time (days; 0 first), survival,
    lower, upper, at_risk."""
    from lifelines import KaplanMeierFitter

    km = KaplanMeierFitter().fit(np.asarray(times, float), np.asarray(events, int))
    sf = km.survival_function_.iloc[:, 0]
    ci = km.confidence_interval_survival_function_
    table = km.event_table
    return pd.DataFrame({"time": sf.index.to_numpy(float), "survival": sf.to_numpy(float),
                         "lower": ci.iloc[:, 0].to_numpy(float),
                         "upper": ci.iloc[:, 1].to_numpy(float),
                         "at_risk": table["at_risk"].reindex(sf.index).to_numpy(float)})


def group_summary(groups: pd.DataFrame) -> pd.DataFrame:
    """Per (cohort, method): patients and events in each group, and the log-rank p."""
    rows = []
    for (cohort, method), sub in groups.groupby(["cohort", "method"], sort=False):
        hi, lo = sub[sub["group"] == HIGH], sub[sub["group"] == LOW]
        rows.append({"cohort": cohort, "method": method, "folds": sub["fold"].nunique(),
                     "n_high": len(hi), "events_high": int(hi["event"].sum()),
                     "n_low": len(lo), "events_low": int(lo["event"].sum()),
                     "logrank_p": logrank_p(sub)})
    return pd.DataFrame(rows, columns=["cohort", "method", "folds", "n_high", "events_high",
                                       "n_low", "events_low", "logrank_p"])
