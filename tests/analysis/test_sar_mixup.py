"""SAR of task-vector mixtures (steph.analysis.sar) on hand-made task vectors whose ratios are
worked out by hand below (none was obtained by running the code under test)."""

from __future__ import annotations

import math

import pytest
import torch

from steph.analysis.sar import mixup_sar, sar_layers


def _e(i: int, j: int, shape=(4, 3)) -> torch.Tensor:
    m = torch.zeros(shape, dtype=torch.float64)
    m[i, j] = 1.0
    return m


def test_tau_t_with_itself_is_one_and_an_orthogonal_source_zero():
    # tau_t has rank 2 (rows 0 and 1), so its dominant subspace holds all of it: SAR = 1 at
    # lambda = 1. tau_s lives on rows 2 and 3 only: its left singular vectors are orthogonal to
    # tau_t's columns, SAR = 0 at lambda = 0.
    tau_t = {"w": 2 * _e(0, 0) + _e(1, 2)}
    tau_s = {"w": 3 * _e(2, 1) + _e(3, 0)}
    table = mixup_sar(tau_t, tau_s, [0.0, 1.0]).set_index("lambda")["sar"]
    assert table[1.0] == pytest.approx(1.0, abs=1e-12)
    assert table[0.0] == pytest.approx(0.0, abs=1e-12)


def test_threshold_of_the_dominant_rank_along_lambda():
    # tau_t = E00, tau_s = E11: tau_mix = lambda E00 + (1 - lambda) E11 has singular values
    # lambda and 1 - lambda with left vectors e0, e1. alpha = 0.95 keeps rank 1 when the smaller
    # energy share is <= 0.0025, i.e. r^2 / (1 + r^2) <= 0.0025 with r the ratio of the two:
    # r <= 0.050063. So lambda <= 0.04767: rank 1, the subspace e1, SAR 0; lambda >= 0.95233:
    # rank 1, e0, SAR 1; in between rank 2, SAR 1.
    tau_t, tau_s = {"w": _e(0, 0)}, {"w": _e(1, 1)}
    lambdas = [0.0, 0.02, 0.047, 0.048, 0.5, 0.952, 0.97, 1.0]
    got = mixup_sar(tau_t, tau_s, lambdas)["sar"].tolist()
    assert got == pytest.approx([0, 0, 0, 1, 1, 1, 1, 1], abs=1e-12)


def test_a_partial_alignment():
    # tau_t = E00 + E10 (the column (1, 1, 0, 0)), tau_s = E00: at lambda = 0 the subspace is
    # e0; the projection of tau_t keeps 1 of its squared norm 2: SAR = 1 / sqrt(2). At
    # lambda = 0.5, tau_mix = E00 + 0.5 E10 = column (1, 0.5): rank 1 and its span is
    # (1, 0.5) / |(1, 0.5)|; tau_t's column (1, 1) projects to length (1 + 0.5) / sqrt(1.25):
    # SAR = 1.5 / sqrt(1.25) / sqrt(2) = 0.9487.
    tau_t, tau_s = {"w": _e(0, 0) + _e(1, 0)}, {"w": _e(0, 0)}
    got = mixup_sar(tau_t, tau_s, [0.0, 0.5]).set_index("lambda")["sar"]
    assert got[0.0] == pytest.approx(1 / math.sqrt(2), abs=1e-12)
    assert got[0.5] == pytest.approx(1.5 / math.sqrt(1.25) / math.sqrt(2), abs=1e-12)


def test_only_informative_matrices():
    tensors = {"feat_proj.0.weight": torch.zeros(8, 4), "feat_proj.0.bias": torch.zeros(8),
               "attention.score.weight": torch.zeros(1, 8), "x.weight": torch.zeros(8, 1),
               "attention.a.0.weight": torch.zeros(3, 8)}
    assert sar_layers(tensors) == ["feat_proj.0.weight", "attention.a.0.weight"]
