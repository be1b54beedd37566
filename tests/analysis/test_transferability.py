"""The zero-shot transfer matrix: against a direct computation, its statistics on hand-made
matrices, the probes and the command."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sksurv.metrics import concordance_index_censored

from steph.analysis import transferability as T
from steph.runs import RunRef


def test_zero_shot_matches_a_direct_computation(tiny_grid, tiny_data, one_thread):
    """Each source's fold-0 model applied to each target fold's test (and training) patients:
    the C-index equals scikit-survival's on risks computed here from the artefact."""
    from steph.data.cohort import Cohort
    from steph.inference import load_artefact, predict_bag

    table = T.zero_shot_table(tiny_grid, tiny_data, targets=["TGT"])
    assert set(table["source"]) == {"own", "RELA", "UNRB"}
    assert set(table["fold"]) == {0, 1} and set(table["split"]) == {"train", "test"}
    cohort = Cohort.load(tiny_data / "TGT")
    model, _ = load_artefact(RunRef("RELA", "abmil", 0).path(tiny_grid))
    for fold in (0, 1):
        pred = pd.read_csv(RunRef("TGT", "abmil", fold).path(tiny_grid) / "predictions.csv",
                           dtype={"patient_id": str})
        for split in ("train", "test"):
            part = pred[pred["split"] == split]
            risk = [predict_bag(model, cohort.load_bag(p))[0] for p in part["patient_id"]]
            expected = concordance_index_censored(part["event"].astype(bool), part["time"],
                                                  np.asarray(risk))[0]
            got = table.query("source == 'RELA' and fold == @fold and split == @split")
            assert got["c_index"].item() == pytest.approx(expected, abs=1e-9)
        own = table.query("source == 'own' and fold == @fold and split == 'test'")
        test = pred[pred["split"] == "test"]
        expected = concordance_index_censored(test["event"].astype(bool), test["time"],
                                              test["risk"])[0]
        assert own["c_index"].item() == pytest.approx(expected, abs=1e-9)
    # the matrix: mean over folds; the diagonal is the target's own model
    m = T.transfer_matrix(table)
    want = table.query("source == 'RELA' and split == 'test'")["c_index"].mean()
    assert m.loc["RELA", "TGT"] == pytest.approx(want)
    assert m.loc["TGT", "TGT"] == pytest.approx(
        table.query("source == 'own' and split == 'test'")["c_index"].mean())
    # cached: a second call reads the risks back
    again = T.zero_shot_table(tiny_grid, tiny_data, targets=["TGT"])
    pd.testing.assert_frame_equal(again, table)


def _matrix(values: dict[tuple[str, str], float], names: list[str]) -> pd.DataFrame:
    m = pd.DataFrame(np.nan, index=names, columns=names)
    for (s, t), v in values.items():
        m.loc[s, t] = v
    return m


def test_statistics_on_a_hand_made_matrix():
    names = ["A", "B", "C"]
    m = _matrix({("A", "A"): 0.70, ("B", "B"): 0.60, ("C", "C"): 0.80,
                 ("B", "A"): 0.65, ("C", "A"): 0.55,  # A's column
                 ("A", "B"): 0.62, ("C", "B"): 0.50,  # B's
                 ("A", "C"): 0.45, ("B", "C"): 0.52}, names)
    s = T.transfer_statistics(m)
    off = np.array([0.65, 0.55, 0.62, 0.50, 0.45, 0.52])
    assert s["pairs"] == 6 and s["zero_shot_mean"] == pytest.approx(off.mean())
    assert s["zero_shot_sd"] == pytest.approx(off.std(ddof=1))
    assert s["share_above_0.50"] == pytest.approx(4 / 6)  # 0.50 itself is not above
    assert s["share_above_0.60"] == pytest.approx(2 / 6)
    assert s["own_mean"] == pytest.approx(0.70) and s["own_min"] == 0.60
    # best sources: A <- B (0.65), B <- A (0.62), C <- B (0.52): A and B are each other's best
    assert s["best_source"] == {"A": "B", "B": "A", "C": "B"}
    assert s["mutual_best_pairs"] == [("A", "B")]
    gaps = np.array([0.65 - 0.70, 0.62 - 0.60, 0.52 - 0.80])
    assert s["best_source_gap_mean"] == pytest.approx(gaps.mean())
    assert s["best_source_beats_own"] == 1
    # eta squared of the split by target: between-target over total sum of squares
    by_t = {"A": [0.65, 0.55], "B": [0.62, 0.50], "C": [0.45, 0.52]}
    between = sum(len(v) * (np.mean(v) - off.mean()) ** 2 for v in by_t.values())
    assert s["variance_by_target"] == pytest.approx(between / ((off - off.mean()) ** 2).sum())
    # symmetry: pairs (A,B): (0.62, 0.65), (A,C): (0.45, 0.55), (B,C): (0.52, 0.50)
    x, y = np.array([0.62, 0.45, 0.52]), np.array([0.65, 0.55, 0.50])
    assert s["symmetry_corr"] == pytest.approx(np.corrcoef(x, y)[0, 1])


def test_a_target_explains_all_when_columns_are_constant():
    m = _matrix({("B", "A"): 0.6, ("C", "A"): 0.6, ("A", "B"): 0.5, ("C", "B"): 0.5,
                 ("A", "C"): 0.4, ("B", "C"): 0.4}, ["A", "B", "C"])
    s = T.transfer_statistics(m)
    assert s["variance_by_target"] == pytest.approx(1.0)
    assert s["variance_by_source"] < 0.5


def test_helpful_sources_use_training_patients_only():
    table = pd.DataFrame([
        {"target": "T", "source": "A", "fold": 0, "repeat": 0, "split": "train",
         "c_index": 0.6, "n": 10},
        {"target": "T", "source": "A", "fold": 0, "repeat": 0, "split": "test",
         "c_index": 0.3, "n": 5},
        {"target": "T", "source": "B", "fold": 0, "repeat": 0, "split": "train",
         "c_index": 0.4, "n": 10},
        {"target": "T", "source": "B", "fold": 0, "repeat": 0, "split": "test",
         "c_index": 0.9, "n": 5},
    ])
    assert T.helpful_sources(table, "T", 0) == ["A"]


def test_merge_probes_and_the_command(tiny_grid, tiny_data, tmp_path, one_thread):
    from steph.report.commands import analyze_transferability

    probes = T.merge_probes(tiny_grid, tiny_data, RunRef("TGT", "abmil", 0), ["RELA", "UNRB"])
    assert list(probes["source"]) == ["none", "RELA", "UNRB"]
    assert probes["c_index"].between(0, 1).all()
    out = analyze_transferability(tiny_grid, tiny_data, targets=["TGT"], probes=True,
                                  dest=tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"transferability.png", "transferability.svg", "transferability.csv",
            "transferability-matrix.csv", "transferability-statistics.csv",
            "transferability-probes.csv"} <= names
    assert any(line.startswith("TGT: own") for line in out.lines)
