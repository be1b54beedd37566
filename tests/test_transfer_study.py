"""benchmarks/transfer_study.py's calibration table, from a hand-made zero-shot matrix (the
training and the zero-shot predictions are steph's own, tested elsewhere)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def study(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import transfer_study

    yield transfer_study
    sys.modules.pop("transfer_study", None)


def test_calibration_table_from_a_matrix(study):
    from steph.analysis.transferability import transfer_statistics

    names = ["BLCA", "HNSC", "LIHC", "SARC"]
    # BLCA-HNSC each other's best source (a real pair), LIHC's best is BLCA, SARC's is LIHC
    M = pd.DataFrame([[0.70, 0.60, 0.58, 0.50],
                      [0.62, 0.66, 0.52, 0.51],
                      [0.50, 0.50, 0.60, 0.57],
                      [0.49, 0.53, 0.55, 0.62]], index=names, columns=names)
    ev = pd.DataFrame({"n": [100, 100, 100, 100], "event_rate": [0.10, 0.20, 0.30, 0.48]},
                      index=names)
    synth = study.synthetic_statistics(transfer_statistics(M), ev)
    assert synth["real_mutual_pairs_found"] == 1
    assert synth["event_rate_overall"] == pytest.approx(0.27)
    table = study.calibration_table(synth).set_index("statistic")
    assert list(table.index) == list(study.REAL)
    assert table.loc["abmil_mean", "synthetic"] == pytest.approx(np.mean([0.70, 0.66, 0.60, 0.62]))
    assert table.loc["abmil_mean", "ok"]  # 0.645 vs 0.661 +/- 0.02
    assert not table.loc["abmil_min", "ok"] and not table.loc["abmil_max", "ok"]  # 0.60, 0.70
    assert table.loc["event_rate_max", "ok"] and not table.loc["real_mutual_pairs_found", "ok"]
    # a missing statistic is never within tolerance
    assert not study.calibration_table({})["ok"].any()


def test_default_config_loads(study):
    cfg = study.study_config(None, ["train.epochs=3"])
    assert cfg.model.options.abmil.hidden_dim == 128 and cfg.train.epochs == 3


def test_ranking_auc_against_a_hand_count(study):
    coef = pd.Series({"A": 0.9, "B": 0.2, "C": 0.5, "D": 0.2})
    # helpful A, B vs unhelpful C, D: pairs (A>C, A>D, B<C, B=D) -> (1 + 1 + 0 + 0.5) / 4
    assert study.ranking_auc(coef, ["A", "B"]) == pytest.approx(0.625)
    assert study.ranking_auc(coef, ["A"]) == 1.0
    assert np.isnan(study.ranking_auc(coef, []))
    assert np.isnan(study.ranking_auc(coef, list("ABCD")))
    # the same as scikit-learn's ROC AUC of the coefficients for the helpful labels
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    c = pd.Series(rng.normal(size=12).round(1), index=[f"s{i}" for i in range(12)])
    helpful = [f"s{i}" for i in range(12) if rng.random() < 0.5]
    assert study.ranking_auc(c, helpful) == pytest.approx(
        roc_auc_score(c.index.isin(helpful), c.to_numpy()))
