"""Paired comparisons: per-fold differences, pooled bootstrap intervals, across-cohort counts.

Run directories are written by hand here (predictions.csv only), so every expected value is
computed independently: the pooled C-index with scikit-survival's concordance_index_censored.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sksurv.metrics import concordance_index_censored

from steph.experiments.compare import (
    ALL,
    across_cohorts,
    compare_methods,
    comparison_cells,
    comparison_markdown,
)
from steph.runs import RunRef
from steph.experiments.summary import with_paired_difference


def _write_runs(root, cohort, method, risks, times, events, folds=3, repeat=0):
    """predictions.csv for folds of ``method``: patient i is in test fold i % folds."""
    rows = []
    n = len(risks)
    for k in range(folds):
        test = np.arange(n) % folds == k
        pred = pd.DataFrame({"patient_id": [f"P{i:03d}" for i in range(n)],
                             "split": np.where(test, "test", "train"), "risk": risks,
                             "time": times, "event": events})
        d = RunRef(cohort, method, k, repeat).path(root)
        d.mkdir(parents=True, exist_ok=True)
        pred.to_csv(d / "predictions.csv", index=False)
        c = concordance_index_censored(events[test].astype(bool), times[test], risks[test])[0]
        rows.append({"cohort": cohort, "method": method, "repeat": repeat, "fold": k, "c_index": c})
    return rows


@pytest.fixture
def world(tmp_path):
    rng = np.random.default_rng(0)
    n = 90
    truth = rng.normal(size=n)
    times = np.round(np.exp(-truth + rng.normal(scale=0.5, size=n)) * 1000) + 1
    events = (rng.random(n) < 0.6).astype(int)
    rows = []
    rows += _write_runs(tmp_path, "A", "abmil", rng.normal(size=n), times, events)  # noise
    rows += _write_runs(tmp_path, "A", "good", truth, times, events)  # the truth
    summary = pd.DataFrame(rows)
    return tmp_path, summary, times, events, truth


def test_pooled_difference_and_interval(world):
    root, summary, times, events, truth = world
    comp = compare_methods(summary, root, n_resamples=300)
    good = comp[(comp["cohort"] == "A") & (comp["method"] == "good")].iloc[0]
    base_risk = pd.read_csv(RunRef("A", "abmil", 0).path(root) / "predictions.csv")["risk"].to_numpy()
    expect = (concordance_index_censored(events.astype(bool), times, truth)[0]
              - concordance_index_censored(events.astype(bool), times, base_risk)[0])
    assert good["pooled_diff"] == pytest.approx(expect, abs=1e-12)
    assert good["ci_low"] > 0 and good["ci_low"] < good["pooled_diff"] < good["ci_high"]
    per_fold = (summary.query("method == 'good'")["c_index"].to_numpy()
                - summary.query("method == 'abmil'")["c_index"].to_numpy())
    assert good["mean_diff"] == pytest.approx(per_fold.mean())
    assert good["sd_diff"] == pytest.approx(per_fold.std(ddof=1))
    assert good["n_folds"] == 3 and good["n_repeats"] == 1 and good["n_patients"] == 90


def test_identical_predictions_give_a_zero_interval(tmp_path):
    rng = np.random.default_rng(1)
    n = 40
    times, events, risk = rng.integers(1, 500, n).astype(float), rng.integers(0, 2, n), rng.normal(size=n)
    rows = _write_runs(tmp_path, "A", "abmil", risk, times, events, folds=2)
    rows += _write_runs(tmp_path, "A", "copy", risk, times, events, folds=2)
    comp = compare_methods(pd.DataFrame(rows), tmp_path, n_resamples=100)
    row = comp[comp["method"] == "copy"].iloc[0]
    assert row["pooled_diff"] == 0 and row["ci_low"] == 0 and row["ci_high"] == 0


def test_across_cohorts_counts_and_wilcoxon(tmp_path):
    from scipy.stats import wilcoxon

    rows = []
    diffs = {"A": 0.1, "B": 0.05, "C": -0.02, "D": 0.0}
    for cohort, d in diffs.items():
        for k in range(2):
            rows.append({"cohort": cohort, "method": "abmil", "repeat": 0, "fold": k, "c_index": 0.6})
            rows.append({"cohort": cohort, "method": "m", "repeat": 0, "fold": k, "c_index": 0.6 + d})
    summary = pd.DataFrame(rows)
    rng = np.random.default_rng(0)
    for cohort in diffs:  # predictions are needed for the pooled part only
        for method in ("abmil", "m"):
            _write_runs(tmp_path, cohort, method, rng.normal(size=20),
                        rng.integers(1, 99, 20).astype(float), rng.integers(0, 2, 20), folds=2)
    comp = compare_methods(summary, tmp_path, n_resamples=50)
    allrow = comp[comp["cohort"] == ALL].iloc[0]
    assert (allrow["wins"], allrow["ties"], allrow["losses"]) == (2, 1, 1)
    assert allrow["mean_diff"] == pytest.approx(np.mean(list(diffs.values())))
    assert allrow["wilcoxon_p"] == pytest.approx(
        wilcoxon(list(diffs.values()), zero_method="zsplit").pvalue)


def test_per_fold_difference_column(world):
    _, summary, *_ = world
    out = with_paired_difference(summary, "abmil")
    good = out[out["method"] == "good"].sort_values("fold")
    base = out[out["method"] == "abmil"].sort_values("fold")
    np.testing.assert_allclose(good["c_index_diff"], good["c_index"].to_numpy() - base["c_index"].to_numpy())
    assert base["c_index_diff"].isna().all() and (out["baseline"] == "abmil").all()


def test_repeats_are_paired_by_repeat(tmp_path):
    rng = np.random.default_rng(2)
    n = 30
    times, events = rng.integers(1, 500, n).astype(float), rng.integers(0, 2, n)
    rows = []
    for r in range(2):
        rows += _write_runs(tmp_path, "A", "abmil", rng.normal(size=n), times, events, 2, r)
        rows += _write_runs(tmp_path, "A", "m", rng.normal(size=n), times, events, 2, r)
    comp = compare_methods(pd.DataFrame(rows), tmp_path, n_resamples=50)
    row = comp[comp["method"] == "m"].iloc[0]
    assert row["n_repeats"] == 2 and row["n_folds"] == 2
    expect = []
    for r in range(2):
        cm = pd.concat(pd.read_csv(RunRef("A", "m", k, r).path(tmp_path) / "predictions.csv").query("split == 'test'") for k in range(2)).sort_values("patient_id")
        cb = pd.concat(pd.read_csv(RunRef("A", "abmil", k, r).path(tmp_path) / "predictions.csv").query("split == 'test'") for k in range(2)).sort_values("patient_id")
        ev = cm["event"].astype(bool).to_numpy()
        expect.append(concordance_index_censored(ev, cm["time"].to_numpy(), cm["risk"].to_numpy())[0]
                      - concordance_index_censored(ev, cb["time"].to_numpy(), cb["risk"].to_numpy())[0])
    assert row["pooled_diff"] == pytest.approx(np.mean(expect), abs=1e-12)


def test_wins_count_the_per_fold_means_not_the_pooled_differences_and_say_so():
    # A: per-fold mean -0.003 (a loss) although the pooled difference is +0.025; C: per-fold
    # mean +0.02 (a win) although pooled -0.01 (issue 19, item 9)
    pooled = [0.025, 0.012, -0.01]
    per = pd.DataFrame({"cohort": ["A", "B", "C"], "method": "steph", "baseline": "abmil",
                        "n_folds": 3, "n_repeats": 1, "n_patients": 90,
                        "mean_diff": [-0.003, 0.01, 0.02], "sd_diff": [0.01, 0.02, 0.015],
                        "pooled_c_method": 0.6, "pooled_c_baseline": 0.6, "pooled_diff": pooled,
                        "ci_low": [p - 0.03 for p in pooled], "ci_high": [p + 0.03 for p in pooled]})
    comp = pd.concat([per, across_cohorts(per)], ignore_index=True)
    row = comp[comp["cohort"] == ALL].iloc[0]
    assert (row["wins"], row["ties"], row["losses"]) == (2, 0, 1)
    assert row["mean_diff"] == pytest.approx(np.mean([-0.003, 0.01, 0.02]))
    per_table, across = comparison_cells(comp)
    assert list(across.columns) == ["method", "cohorts", "mean per-fold diff",
                                    "wins / ties / losses (per-fold mean)", "Wilcoxon p"]
    assert "per-fold diff (mean ± sd)" in per_table.columns
    assert across.iloc[0]["wins / ties / losses (per-fold mean)"] == "2 / 0 / 1"
    assert "not the pooled differences" in comparison_markdown(comp)
