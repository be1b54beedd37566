"""The discrete-time survival NLL against pycox's logistic-hazard NLL and hand arithmetic."""

from __future__ import annotations

import math

import pytest
import torch
from pycox.models.loss import nll_logistic_hazard

from steph.survival.loss import NLLSurvLoss, nll_survival_loss

N_BINS = 32


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _moderate_logits(batch: int, seed: int) -> torch.Tensor:
    """Logits around -3 (hazards ~0.05): over 32 bins S stays far above eps = 1e-7 and every
    hazard far above eps, so the clamping of the logs never triggers and the comparison with
    pycox's unclamped formula is exact up to rounding."""
    g = torch.Generator().manual_seed(seed)
    return -3.0 + torch.randn(batch, N_BINS, generator=g, dtype=torch.float64)


def _batch(batch: int, seed: int, event_rate: float = 0.5):
    g = torch.Generator().manual_seed(seed + 1000)
    bins = torch.randint(0, N_BINS, (batch,), generator=g)
    bins[0], bins[-1] = 0, N_BINS - 1  # always cover the first and the last bin
    events = (torch.rand(batch, generator=g) < event_rate).long()
    return _moderate_logits(batch, seed), bins, events


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("event_rate", [0.0, 0.4, 1.0])  # all censored, mixed, all events
def test_alpha_zero_equals_pycox_logistic_hazard(seed, event_rate):
    logits, bins, events = _batch(48, seed, event_rate)
    ours = nll_survival_loss(logits, bins, events, alpha=0.0)
    ref = nll_logistic_hazard(logits, bins, events.double(), reduction="mean")
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    ours_each = nll_survival_loss(logits, bins, events, alpha=0.0, reduction="none")
    ref_each = nll_logistic_hazard(logits, bins, events.double(), reduction="none")
    torch.testing.assert_close(ours_each, ref_each, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.25, 0.5, 1.0])
def test_alpha_reweights_only_censored_patients(alpha):
    # L = (1 - a)(U + C) + a U = U + (1 - a) C: an event patient (C = 0) keeps its NLL, a
    # censored one (U = 0) has it scaled by (1 - a). Checked against pycox's per-patient NLL.
    logits, bins, events = _batch(40, 7)
    ours = nll_survival_loss(logits, bins, events, alpha=alpha, reduction="none")
    ref = nll_logistic_hazard(logits, bins, events.double(), reduction="none")
    scale = events.double() + (1.0 - alpha) * (1.0 - events.double())
    torch.testing.assert_close(ours, ref * scale, rtol=1e-10, atol=1e-12)


def test_alpha_half_hand_computed_three_bins():
    # Hazards h = (0.5, 0.25, 0.2), so S = (0.5, 0.375, 0.3) and S_{-1} = 1.
    # alpha = 0.5: L = 0.5 * (U + C) + 0.5 * U.
    #  a) event in bin 1:    U = -(log S_0 + log h_1) = -(log 0.5 + log 0.25) = log 8, C = 0
    #                        L = 0.5 * log 8 + 0.5 * log 8 = log 8                 = 2.0794415
    #  b) censored in bin 2: U = 0, C = -log S_2 = -log 0.3
    #                        L = 0.5 * (-log 0.3)                                  = 0.6019864
    #  c) event in bin 0:    U = -(log S_{-1} + log h_0) = -(log 1 + log 0.5) = log 2, C = 0
    #                        L = log 2                                             = 0.6931472
    #  d) censored in bin 0: C = -log S_0 = log 2, L = 0.5 * log 2                 = 0.3465736
    expected = torch.tensor(
        [math.log(8), 0.5 * -math.log(0.3), math.log(2), 0.5 * math.log(2)], dtype=torch.float64
    )
    row = [_logit(0.5), _logit(0.25), _logit(0.2)]
    logits = torch.tensor([row] * 4, dtype=torch.float64)
    bins = torch.tensor([1, 2, 0, 0])
    events = torch.tensor([1, 0, 1, 0])
    each = nll_survival_loss(logits, bins, events, alpha=0.5, reduction="none")
    torch.testing.assert_close(each, expected)
    torch.testing.assert_close(nll_survival_loss(logits, bins, events, alpha=0.5), expected.mean())
    torch.testing.assert_close(
        nll_survival_loss(logits, bins, events, alpha=0.5, reduction="sum"), expected.sum()
    )
    # the module wrapper defaults to alpha = 0.5
    torch.testing.assert_close(NLLSurvLoss()(logits, bins, events), expected.mean())


def test_reductions_are_consistent():
    logits, bins, events = _batch(16, 3)
    each = nll_survival_loss(logits, bins, events, reduction="none")
    assert each.shape == (16,)
    torch.testing.assert_close(
        nll_survival_loss(logits, bins, events, reduction="mean"), each.mean()
    )
    torch.testing.assert_close(nll_survival_loss(logits, bins, events, reduction="sum"), each.sum())


def test_events_may_be_bool_or_float():
    logits, bins, events = _batch(8, 4)
    ref = nll_survival_loss(logits, bins, events)
    torch.testing.assert_close(nll_survival_loss(logits, bins, events.bool()), ref)
    torch.testing.assert_close(nll_survival_loss(logits, bins, events.float()), ref)


@pytest.mark.parametrize("value", [100.0, -100.0, 1e4, -1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_loss_and_gradient_at_extreme_logits(value, dtype):
    logits = torch.full((4, N_BINS), value, dtype=dtype, requires_grad=True)
    bins = torch.tensor([0, 5, N_BINS - 1, N_BINS - 1])
    events = torch.tensor([1, 0, 1, 0])
    loss = nll_survival_loss(logits, bins, events)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()
    # every log is clamped at eps, so no single term exceeds -log(eps) per log taken (2 logs)
    assert loss.item() <= 2 * -math.log(1e-7) + 1e-6


def test_clamping_bounds_the_loss_of_a_saturated_hazard():
    # h_0 = sigmoid(-200) underflows to 0 in float32: U = -(log 1 + log max(h_0, eps)) = -log eps
    logits = torch.full((1, 3), -200.0)
    loss = nll_survival_loss(logits, torch.tensor([0]), torch.tensor([1]), alpha=0.0)
    assert loss.item() == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_gradient_descends_the_loss():
    logits, bins, events = _batch(8, 5)
    logits = logits.clone().requires_grad_(True)
    loss = nll_survival_loss(logits, bins, events)
    loss.backward()
    with torch.no_grad():
        stepped = nll_survival_loss(logits - 1e-3 * logits.grad, bins, events)
    assert stepped < loss


def test_module_wrapper_matches_function_and_has_no_parameters():
    logits, bins, events = _batch(8, 6)
    m = NLLSurvLoss(alpha=0.3, reduction="sum")
    assert list(m.parameters()) == []
    torch.testing.assert_close(
        m(logits, bins, events), nll_survival_loss(logits, bins, events, alpha=0.3, reduction="sum")
    )
    assert "alpha=0.3" in repr(m)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bins=torch.tensor([0, N_BINS])), "bin indices"),
        (dict(bins=torch.tensor([-1, 0])), "bin indices"),
        (dict(bins=torch.tensor([0.0, 1.0])), "integer"),
        (dict(bins=torch.tensor([[0], [1]])), "bins must have shape"),
        (dict(events=torch.tensor([1, 0, 1])), "events must have shape"),
        (dict(events=torch.tensor([2, 0])), "events must be 0"),
        (dict(logits=torch.zeros(2, 3, 4)), "logits must have shape"),
        (dict(logits=torch.zeros(3, N_BINS)), "bins must have shape"),
        (dict(logits=torch.zeros(2, N_BINS, dtype=torch.long)), "floating-point"),
        (dict(reduction="avg"), "reduction"),
        (dict(alpha=1.5), "alpha"),
    ],
)
def test_validation_errors(kwargs, match):
    args = dict(
        logits=torch.zeros(2, N_BINS), bins=torch.tensor([0, 1]), events=torch.tensor([1, 0])
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        nll_survival_loss(**args)


def test_empty_batch_and_wrong_types():
    with pytest.raises(ValueError, match="empty"):
        nll_survival_loss(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0))
    with pytest.raises(TypeError):
        nll_survival_loss([[0.0, 0.0]], torch.tensor([0]), torch.tensor([1]))
    with pytest.raises(ValueError):
        NLLSurvLoss(reduction="avg")
