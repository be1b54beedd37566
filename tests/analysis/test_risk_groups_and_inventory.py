"""Risk groups (the cut is the median of each fold's training risks) and the inventory of a
runs folder (finished, unfinished, missing runs), on run directories written by hand."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from steph.analysis.runs import MISSING, UNFINISHED, RunRef, run_inventory
from steph.analysis.survival import HIGH, LOW, group_summary, logrank_p, risk_groups
from steph.runs import RunRef


def _run(root, cohort, method, fold, train_risk, test, repeat=0, finished=True):
    d = RunRef(cohort, method, fold, repeat).path(root)
    d.mkdir(parents=True, exist_ok=True)
    rows = [{"patient_id": f"tr{fold}-{i}", "split": "train", "risk": r, "time": 100.0 + i,
             "event": 1} for i, r in enumerate(train_risk)]
    rows += [{"patient_id": pid, "split": "test", "risk": r, "time": t, "event": e}
             for pid, r, t, e in test]
    pd.DataFrame(rows).to_csv(d / "predictions.csv", index=False)
    if finished:
        (d / "metrics.json").write_text(json.dumps({"cohort": cohort, "method": method,
                                                    "fold": fold}))
    return d


def test_cut_is_the_median_of_the_training_risks(tmp_path):
    # fold 0: training risks 1..5 -> cut 3 (the test risks, all above 3.5, would give another
    # median); fold 1: training risks 10, 20 -> cut 15
    _run(tmp_path, "C", "m", 0, [1, 2, 3, 4, 5], [("a", 3.0, 50, 1), ("b", 3.5, 60, 0),
                                                 ("c", 9.0, 10, 1)])
    _run(tmp_path, "C", "m", 1, [10, 20], [("d", 14.0, 70, 0), ("e", 16.0, 20, 1)])
    g = risk_groups(tmp_path, [RunRef("C", "m", 0), RunRef("C", "m", 1)]).set_index("patient_id")
    assert g["cut"].to_dict() == {"a": 3.0, "b": 3.0, "c": 3.0, "d": 15.0, "e": 15.0}
    assert g["group"].to_dict() == {"a": LOW, "b": HIGH, "c": HIGH, "d": LOW, "e": HIGH}
    s = group_summary(g.reset_index()).iloc[0]
    assert (s["n_high"], s["events_high"], s["n_low"], s["events_low"]) == (3, 2, 2, 1)


def test_logrank_against_the_hand_computed_statistic():
    # high: events at 1 and 2; low: event at 3, censored at 4. At t=1: 4 at risk, 2 high, 1
    # event: E_high = 0.5, V = 2*2*1*3 / (16*3) = 0.25. At t=2: 3 at risk, 1 high: E = 1/3,
    # V = 1*2*1*2 / (9*2) = 2/9. At t=3: 2 at risk, 0 high: E = 0, V = 0.
    # O - E = 2 - 5/6 = 7/6; chi2 = (7/6)^2 / (0.25 + 2/9) = 2.8824 -> p = 0.0896.
    from scipy.stats import chi2

    g = pd.DataFrame({"group": [HIGH, HIGH, LOW, LOW], "time": [1.0, 2.0, 3.0, 4.0],
                      "event": [1, 1, 1, 0]})
    stat = (7 / 6) ** 2 / (0.25 + 2 / 9)
    assert logrank_p(g) == pytest.approx(float(chi2.sf(stat, 1)), rel=1e-9)
    assert np.isnan(logrank_p(g[g["group"] == HIGH]))


def test_inventory_finished_unfinished_missing(tmp_path):
    _run(tmp_path, "T", "abmil", 0, [1], [("a", 1.0, 1, 1)])
    _run(tmp_path, "T", "abmil", 1, [1], [("b", 1.0, 1, 1)])
    _run(tmp_path, "T", "abmil", 2, [1], [("c", 1.0, 1, 1)])
    _run(tmp_path, "T", "steph", 0, [1], [("a", 1.0, 1, 1)])
    unfinished = _run(tmp_path, "T", "steph", 1, [1], [("b", 1.0, 1, 1)], finished=False)
    (unfinished.parent / ".fold1.lock").write_text("{}")
    _run(tmp_path, "S", "abmil", 0, [1], [("z", 1.0, 1, 1)])
    (tmp_path / "splits" / "T").mkdir(parents=True)
    (tmp_path / "splits" / "T" / "fold_0.csv").write_text("patient_id,split\n")
    inv = run_inventory(tmp_path)
    states = {(r.cohort, r.method, r.fold): r.state for r in inv.itertuples()}
    assert states == {("S", "abmil", 0): "finished", ("T", "abmil", 0): "finished",
                      ("T", "abmil", 1): "finished", ("T", "abmil", 2): "finished",
                      ("T", "steph", 0): "finished", ("T", "steph", 1): UNFINISHED,
                      ("T", "steph", 2): MISSING}
    assert inv.set_index(["method", "fold"]).loc[("steph", 1), "lease"].item() is True
