"""Tests of steph.merging.analysis: the subspace alignment ratio (STEPH appendix A).

Expected values are worked out by hand in the comments (diagonal matrices) or hold by definition
(a matrix inside / orthogonal to the subspace); none was obtained by running the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from steph.errors import ConfigError, DataError
from steph.merging.analysis import (
    dominant_rank,
    subspace_alignment_ratio,
    subspace_alignment_ratios,
)


def _d(*values) -> torch.Tensor:
    return torch.diag(torch.tensor(values, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# the rank R_alpha
# ---------------------------------------------------------------------------------------------


def test_dominant_rank_hand_worked():
    # s = (10, 3, 1, 0.1): s^2 = (100, 9, 1, 0.01), total 110.01
    # tail(1) = 10.01 / 110.01 = 0.0910, tail(2) = 1.01 / 110.01 = 0.00918,
    # tail(3) = 0.01 / 110.01 = 0.0000909, tail(4) = 0
    s = torch.tensor([10.0, 3.0, 1.0, 0.1], dtype=torch.float64)
    # alpha 0.95 -> (0.05)^2 = 0.0025: tail(2) > 0.0025 >= tail(3) -> R = 3
    assert dominant_rank(s, 0.95) == 3
    # alpha 0.7 -> 0.09: tail(1) = 0.0910 > 0.09 >= tail(2) -> R = 2
    assert dominant_rank(s, 0.7) == 2
    # alpha 0.65 -> 0.1225 >= tail(1) -> R = 1
    assert dominant_rank(s, 0.65) == 1
    # alpha 1 -> 0: only the full rank has an exactly zero tail -> R = 4
    assert dominant_rank(s, 1.0) == 4
    # alpha 0 -> 1: tail(0) = 1 <= 1 -> R = 0 (empty subspace)
    assert dominant_rank(s, 0.0) == 0


def test_dominant_rank_boundary_is_inclusive():
    # s = (2, 2, 2, 2): s^2 = 4 each, total 16; tail(3) = 4 / 16 = 0.25 exactly
    s = torch.tensor([2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    # alpha 0.5 -> (1 - 0.5)^2 = 0.25: tail(3) = 0.25 <= 0.25 -> R = 3 (tail(2) = 0.5 > 0.25)
    assert dominant_rank(s, 0.5) == 3
    # alpha 0.95 -> 0.0025 < 0.25 -> R = 4
    assert dominant_rank(s, 0.95) == 4


def test_dominant_rank_zero_and_unsorted():
    assert dominant_rank(torch.zeros(3), 0.95) == 0
    with pytest.raises(ConfigError, match="descending"):
        dominant_rank(torch.tensor([1.0, 2.0]), 0.95)


# ---------------------------------------------------------------------------------------------
# SAR of one matrix
# ---------------------------------------------------------------------------------------------


def test_sar_hand_worked_diagonal():
    # tau_new = diag(10, 3, 1, 0.1): U = I (columns e1..e4, signs irrelevant to U U^T);
    # alpha 0.95 -> R = 3 (see test_dominant_rank_hand_worked): subspace span(e1, e2, e3).
    tau_new = _d(10.0, 3.0, 1.0, 0.1)
    # tau_t = diag(1, 2, 2, 4): ||tau_t||^2 = 1 + 4 + 4 + 16 = 25; projection keeps the first
    # three rows: ||P||^2 = 1 + 4 + 4 = 9 -> SAR = 3 / 5 = 0.6
    tau_t = _d(1.0, 2.0, 2.0, 4.0)
    assert subspace_alignment_ratio(tau_t, tau_new, 0.95) == pytest.approx(0.6, abs=1e-12)
    # alpha 0.7 -> R = 2: ||P||^2 = 1 + 4 = 5 -> SAR = sqrt(5) / 5
    assert subspace_alignment_ratio(tau_t, tau_new, 0.7) == pytest.approx(
        math.sqrt(5) / 5, abs=1e-12
    )
    # alpha 0.65 -> R = 1: ||P|| = 1 -> SAR = 1 / 5
    assert subspace_alignment_ratio(tau_t, tau_new, 0.65) == pytest.approx(0.2, abs=1e-12)


def test_sar_uses_left_singular_vectors_rows_permuted():
    # tau_new with its large singular value on row 3: diag-like with rows permuted.
    # tau_new = [[0, 0], [0, 0.01], [5, 0]] (3 x 2): s = (5, 0.01), u1 = e3, u2 = e2;
    # alpha 0.95: tail(1) = 1e-4 / 25.0001 < 0.0025 -> R = 1, subspace span(e3).
    tau_new = torch.tensor([[0.0, 0.0], [0.0, 0.01], [5.0, 0.0]], dtype=torch.float64)
    # tau_t rows (1, 1), (0, 0), (1, -1): ||tau_t||^2 = 4, row 3 has energy 2 -> SAR = sqrt(2)/2
    tau_t = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    assert subspace_alignment_ratio(tau_t, tau_new) == pytest.approx(math.sqrt(0.5), abs=1e-12)
    # tau_t's column count may differ from tau_new's: only the rows must match
    wide = torch.cat([tau_t, tau_t], dim=1)
    assert subspace_alignment_ratio(wide, tau_new) == pytest.approx(math.sqrt(0.5), abs=1e-12)


def _orthonormal(m: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    return q


def test_sar_inside_span_is_one_and_orthogonal_is_zero():
    q = _orthonormal(40, 8, 0)
    g = torch.Generator().manual_seed(1)
    # tau_new of exact rank 3 on q[:, :3] with singular values (5, 4, 3): tail(2) = 9 / 50
    # = 0.18 > 0.0025, tail(3) = 0 -> R = 3, the subspace is span(q[:, :3])
    w = _orthonormal(24, 3, 2)
    tau_new = q[:, :3] @ torch.diag(torch.tensor([5.0, 4.0, 3.0], dtype=torch.float64)) @ w.T
    inside = q[:, :3] @ torch.randn(3, 24, generator=g, dtype=torch.float64)
    orthogonal = q[:, 3:6] @ torch.randn(3, 24, generator=g, dtype=torch.float64)
    assert subspace_alignment_ratio(inside, tau_new) == pytest.approx(1.0, abs=1e-9)
    assert subspace_alignment_ratio(orthogonal, tau_new) == pytest.approx(0.0, abs=1e-9)
    # a matrix with itself: SAR^2 = head energy ratio = 1 - tail(R) >= 1 - (1 - alpha)^2
    tau = torch.randn(30, 20, generator=g, dtype=torch.float64)
    assert math.sqrt(1 - 0.05**2) <= subspace_alignment_ratio(tau, tau) <= 1.0 + 1e-12


def test_sar_degenerate_inputs():
    tau = _d(1.0, 2.0)
    assert math.isnan(subspace_alignment_ratio(torch.zeros(2, 2), tau))  # 0 / 0
    assert subspace_alignment_ratio(tau, torch.zeros(2, 2)) == 0.0  # empty subspace
    with pytest.raises(DataError, match="rows"):
        subspace_alignment_ratio(torch.zeros(3, 2), torch.ones(2, 2))
    with pytest.raises(DataError, match="2-D"):
        subspace_alignment_ratio(torch.zeros(3), torch.ones(3, 2))
    with pytest.raises(ConfigError, match="alpha"):
        subspace_alignment_ratio(tau, tau, alpha=1.5)


def test_sar_float32_input():
    tau_t = _d(1.0, 2.0, 2.0, 4.0).float()
    tau_new = _d(10.0, 3.0, 1.0, 0.1).float()
    assert subspace_alignment_ratio(tau_t, tau_new) == pytest.approx(0.6, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# SAR over a task vector
# ---------------------------------------------------------------------------------------------


def test_sar_dict_skips_1d_and_leaves_inputs_unchanged():
    tau_t = {"w": _d(1.0, 2.0, 2.0, 4.0), "b": torch.ones(4), "s": torch.ones(1, 4)}
    tau_new = {"w": _d(10.0, 3.0, 1.0, 0.1), "b": torch.ones(4), "s": 2 * torch.ones(1, 4)}
    before_t = {k: v.clone() for k, v in tau_t.items()}
    before_new = {k: v.clone() for k, v in tau_new.items()}
    out = subspace_alignment_ratios(tau_t, tau_new)
    assert list(out) == ["w", "s"]
    assert out["w"] == pytest.approx(0.6, abs=1e-12)
    # 1 x 4: the single row spans R^1 -> SAR 1
    assert out["s"] == pytest.approx(1.0, abs=1e-12)
    for k, v in tau_t.items():
        assert torch.equal(v, before_t[k]) and torch.equal(tau_new[k], before_new[k])
    with pytest.raises(DataError, match="'w'"):
        subspace_alignment_ratios(tau_t, {"b": torch.ones(4)})


def test_sar_requires_grad_inputs():
    tau_t = _d(1.0, 2.0, 2.0, 4.0).requires_grad_()
    tau_new = _d(10.0, 3.0, 1.0, 0.1).requires_grad_()
    assert subspace_alignment_ratio(tau_t, tau_new) == pytest.approx(0.6, abs=1e-12)
