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
