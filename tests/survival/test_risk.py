"""Hazards, survival and risk from logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from steph.survival.risk import hazards_from_logits, risk_from_logits, survival_from_logits


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def test_hazards_are_sigmoid():
    x = torch.tensor([[-2.0, 0.0, 3.0]])
    torch.testing.assert_close(hazards_from_logits(x), 1.0 / (1.0 + torch.exp(-x)))


def test_survival_hand_case():
    # h = (0.5, 0.25, 0.2): S = (0.5, 0.5 * 0.75, 0.375 * 0.8) = (0.5, 0.375, 0.3)
    logits = torch.tensor([[_logit(0.5), _logit(0.25), _logit(0.2)]], dtype=torch.float64)
    torch.testing.assert_close(
        survival_from_logits(logits), torch.tensor([[0.5, 0.375, 0.3]], dtype=torch.float64)
    )
    # risk = -(0.5 + 0.375 + 0.3) = -1.175
    torch.testing.assert_close(
        risk_from_logits(logits), torch.tensor([-1.175], dtype=torch.float64)
    )


def test_risk_ordering_hand_case():
    # Patient A: h = (0.5, 0.5) -> S = (0.5, 0.25) -> risk = -0.75.
    # Patient B: h = (0.1, 0.1) -> S = (0.9, 0.81) -> risk = -1.71.
    # Patient C: h = (0.1, 0.9) -> S = (0.9, 0.09) -> risk = -0.99.
    # A fails earliest in expectation, then C, then B: risk(A) > risk(C) > risk(B).
    logits = torch.tensor(
        [[_logit(0.5), _logit(0.5)], [_logit(0.1), _logit(0.1)], [_logit(0.1), _logit(0.9)]],
        dtype=torch.float64,
    )
    risk = risk_from_logits(logits)
    torch.testing.assert_close(risk, torch.tensor([-0.75, -1.71, -0.99], dtype=torch.float64))
    assert risk[0] > risk[2] > risk[1]


def test_survival_is_non_increasing_and_in_unit_interval():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 32, generator=g) * 6.0
    logits[0] = 80.0  # saturated hazards: S drops to exactly 0
    logits[1] = -80.0  # hazards ~ 0: S stays at 1
    s = survival_from_logits(logits)
    assert s.shape == (64, 32)
    assert torch.all(s >= 0) and torch.all(s <= 1)
    assert torch.all(s[:, 1:] <= s[:, :-1])
    assert torch.all(s[0] == 0)
    assert torch.allclose(s[1], torch.ones(32))


def test_risk_shapes_and_range():
    logits = torch.zeros(2, 3, 32)
    r = risk_from_logits(logits)
    assert r.shape == (2, 3)
    # risk = -sum_j S_j lies in [-n_bins, 0]
    g = torch.Generator().manual_seed(1)
    r = risk_from_logits(torch.randn(100, 32, generator=g) * 4)
    assert torch.all(r <= 0) and torch.all(r >= -32)


def test_raising_any_logit_raises_the_risk():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(1, 8, generator=g, dtype=torch.float64)
    for j in range(8):
        bumped = base.clone()
        bumped[0, j] += 0.5
        assert risk_from_logits(bumped)[0] > risk_from_logits(base)[0]


def test_gradients_flow():
    logits = torch.randn(4, 32, requires_grad=True)
    risk_from_logits(logits).sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_rejects_non_tensors_and_scalars():
    with pytest.raises(TypeError):
        risk_from_logits(np.zeros((2, 3)))
    with pytest.raises(ValueError):
        survival_from_logits(torch.tensor(1.0))
