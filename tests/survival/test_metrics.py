"""C-index, Uno's C and the IPCW Brier score against scikit-survival, lifelines and hand cases.

Oracle conventions:
- scikit-survival ``concordance_index_censored(event, time, estimate)`` takes a *risk*
  (higher = worse) and returns (cindex, concordant, discordant, tied_risk, tied_time).
- lifelines ``concordance_index(times, scores, events)`` takes a score where higher means
  *longer* survival, so it gets ``-risk``. Its pairs are the same as scikit-survival's (two
  events at the same time: not comparable; an event and a censoring at the same time:
  comparable), but it treats two predictions as tied only when they are exactly equal,
  whereas scikit-survival (and steph) tie them when ``|r_i - r_j| <= tied_tol`` (1e-8). They
  can therefore differ only when some comparable pair has ``0 < |r_i - r_j| <= 1e-8``; the
  inputs below avoid that (continuous risks, or exactly equal ties) and
  ``test_lifelines_ties_only_exact_equality`` pins the difference down.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lifelines.utils import concordance_index as lifelines_cindex
from sksurv.metrics import (
    brier_score as sk_brier_score,
)
from sksurv.metrics import (
    concordance_index_censored,
    concordance_index_ipcw,
)
from sksurv.metrics import (
    integrated_brier_score as sk_integrated_brier_score,
)
from sksurv.nonparametric import CensoringDistributionEstimator
from sksurv.util import Surv

from steph.survival.metrics import (
    CensoringDistribution,
    brier_score,
    concordance_index,
    concordance_index_details,
    integrated_brier_score,
    uno_concordance_index,
)

# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _check_against_oracles(time, event, risk, use_lifelines=True):
    """Our counts equal scikit-survival's; our C equals lifelines' C."""
    ours = concordance_index_details(time, event, risk)
    sk = concordance_index_censored(np.asarray(event, dtype=bool), time, risk)
    assert ours.cindex == pytest.approx(sk[0], rel=1e-12, abs=1e-15)
    assert (ours.concordant, ours.discordant, ours.tied_risk, ours.tied_time) == tuple(sk[1:])
    assert ours.comparable == ours.concordant + ours.discordant + ours.tied_risk
    assert concordance_index(time, event, risk) == ours.cindex
    if use_lifelines:
        assert ours.cindex == pytest.approx(lifelines_cindex(time, -risk, event), rel=1e-12)
    return ours


def _pooled(cohort):
    (t1, e1), (t2, e2) = cohort["train"], cohort["test"]
    return np.concatenate([t1, t2]), np.concatenate([e1, e2])


# --------------------------------------------------------------------------------------
# Harrell's C: hand cases
# --------------------------------------------------------------------------------------


def test_hand_case_no_ties():
    # patient  time event risk
    #   A        1    1     4
    #   B        2    0     3
    #   C        3    1     1
    #   D        4    0     2
    # Comparable pairs (the first member must have the event and the shorter time):
    #   A-B (4 > 3, concordant), A-C (4 > 1, concordant), A-D (4 > 2, concordant),
    #   C-D (1 < 2, discordant). B and D are censored, so they never come first.
    # C = 3 / 4.
    r = concordance_index_details([1, 2, 3, 4], [1, 0, 1, 0], [4.0, 3.0, 1.0, 2.0])
    assert r.cindex == 0.75
    assert (r.concordant, r.discordant, r.tied_risk, r.tied_time, r.comparable) == (3, 1, 0, 0, 4)


def test_hand_case_tied_times_and_tied_risks():
    # patient  time event risk
    #   A        2    1    0.5
    #   B        2    1    0.9
    #   C        2    0    0.5
    #   D        5    1    0.2
    # A-B: two events at the same time -> not comparable.
    # A-C: event vs censoring at the same time -> comparable (tied time); risks equal -> 0.5.
    # B-C: comparable (tied time); 0.9 > 0.5 -> concordant.
    # A-D: 0.5 > 0.2 concordant. B-D: 0.9 > 0.2 concordant. C-D: C censored -> no.
    # D: event at the largest time, nothing after it.
    # comparable = 4, concordant = 3, tied_risk = 1, tied_time = 2, C = 3.5 / 4 = 0.875.
    time = np.array([2.0, 2.0, 2.0, 5.0])
    event = np.array([1, 1, 0, 1])
    risk = np.array([0.5, 0.9, 0.5, 0.2])
    r = concordance_index_details(time, event, risk)
    assert (r.concordant, r.discordant, r.tied_risk, r.tied_time, r.comparable) == (3, 0, 1, 2, 4)
    assert r.cindex == 0.875
    _check_against_oracles(time, event, risk)


def test_hand_case_all_events():
    # times 1 < 2 < 3, all events, risks 1, 3, 2:
    # (1,2): 1 < 3 discordant; (1,3): 1 < 2 discordant; (2,3): 3 > 2 concordant -> C = 1/3.
    assert concordance_index([1, 2, 3], [1, 1, 1], [1.0, 3.0, 2.0]) == pytest.approx(1 / 3)


def test_tied_tol():
    # one comparable pair (event at t=1 vs censored at t=2)
    assert concordance_index([1, 2], [1, 0], [1.0, 1.0 - 1e-9]) == 0.5  # |diff| <= 1e-8: tie
    assert concordance_index([1, 2], [1, 0], [1.0, 1.0 - 1e-6]) == 1.0
    assert concordance_index([1, 2], [1, 0], [1.0, 1.0 - 1e-6], tied_tol=1e-5) == 0.5
    assert concordance_index([1, 2], [1, 0], [1.0, 1.0 + 1e-6]) == 0.0
    assert concordance_index([1, 2], [1, 0], [1.0, 1.0], tied_tol=0.0) == 0.5


def test_lifelines_ties_only_exact_equality():
    # The documented definitional difference: risks 1e-9 apart are a tie for scikit-survival
    # and steph (tied_tol = 1e-8) but an ordered pair for lifelines.
    time, event, risk = np.array([1.0, 2.0]), np.array([1, 0]), np.array([1.0, 1.0 - 1e-9])
    assert concordance_index(time, event, risk) == 0.5
    assert concordance_index_censored(event.astype(bool), time, risk)[0] == 0.5
    assert lifelines_cindex(time, -risk, event) == 1.0
    assert concordance_index(time, event, risk, tied_tol=0.0) == 1.0


# --------------------------------------------------------------------------------------
# Harrell's C: validation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "time, event, risk, match",
    [
        ([1, 2, 3], [1, 0], [1, 2, 3], "length mismatch"),
        ([1, np.nan, 3], [1, 0, 1], [1, 2, 3], "time contains"),
        ([1, 2, 3], [1, 0, 1], [1, np.inf, 3], "risk contains"),
        ([1, 2, 3], [1, 0, 1], [1, np.nan, 3], "risk contains"),
        ([1, 2, 3], [1, 2, 0], [1, 2, 3], "only 0"),
        ([1, 2, 3], [1, -1, 0], [1, 2, 3], "only 0"),
        ([1, 2, 3], [0, 0, 0], [1, 2, 3], "all patients are censored"),
        ([1, 2], [0, 1], [1, 2], "no comparable pairs"),  # censored first, event last
        ([3, 3], [1, 1], [1, 2], "no comparable pairs"),  # two events at the same time
        ([1], [1], [1], "no comparable pairs"),
        ([[1, 2]], [1, 0], [1, 2], "1-dimensional"),
    ],
)
def test_validation(time, event, risk, match):
    with pytest.raises(ValueError, match=match):
        concordance_index(time, event, risk)


def test_negative_tied_tol_rejected():
    with pytest.raises(ValueError, match="tied_tol"):
        concordance_index([1, 2], [1, 0], [1, 2], tied_tol=-1.0)


def test_accepts_torch_bool_and_float_inputs():
    time, event, risk = [1.0, 2.0, 3.0, 4.0], [1, 0, 1, 0], [4.0, 3.0, 1.0, 2.0]
    expected = concordance_index(time, event, risk)
    assert (
        concordance_index(
            torch.tensor(time),
            torch.tensor(event, dtype=torch.bool),
            torch.tensor(risk, requires_grad=True),
        )
        == expected
    )
    assert (
        concordance_index(
            np.array(time), np.array(event, dtype=float), np.array(risk, dtype=np.float32)
        )
        == expected
    )


# --------------------------------------------------------------------------------------
# Harrell's C: oracles on real labels and synthetic data
# --------------------------------------------------------------------------------------


def test_fixture_tables_continuous_risk(fixture_cohort):
    rng = np.random.default_rng(0)
    for time, event in (fixture_cohort["train"], fixture_cohort["test"], _pooled(fixture_cohort)):
        if event.sum() == 0:
            continue
        _check_against_oracles(time, event, rng.normal(size=len(time)))
        # an informative risk too (not only C ~ 0.5): noisy negative time
        _check_against_oracles(time, event, -time + rng.normal(scale=500, size=len(time)))


def test_fixture_tables_heavily_tied_risk(fixture_cohort):
    rng = np.random.default_rng(1)
    time, event = _pooled(fixture_cohort)
    risk = rng.integers(0, 3, size=len(time)).astype(float)  # 3 levels: many exact ties
    r = _check_against_oracles(time, event, risk)
    assert r.tied_risk > 0


def test_fixture_tables_tied_times(fixture_cohort):
    rng = np.random.default_rng(2)
    time, event = _pooled(fixture_cohort)
    coarse = np.floor(time / 180.0) * 180.0  # half-year grid: many tied times of both kinds
    for risk in (rng.normal(size=len(time)), rng.integers(0, 3, size=len(time)).astype(float)):
        r = _check_against_oracles(coarse, event, risk)
    assert r.tied_time > 0


def test_full_tables(full_cohort):
    rng = np.random.default_rng(3)
    time, event = _pooled(full_cohort)
    _check_against_oracles(time, event, rng.normal(size=len(time)))
    _check_against_oracles(time, event, np.round(rng.normal(size=len(time))))  # ~7 levels


@pytest.mark.parametrize("seed", range(40))
def test_random_small_cases_against_sksurv(seed):
    # Small random cases stress the block decomposition at many sizes, including ties of
    # every kind and risks that differ by less than tied_tol (scikit-survival only here).
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(2, 70))
    time = rng.integers(0, 12, size=n).astype(float)
    event = rng.random(n) < rng.uniform(0.1, 1.0)
    event[rng.integers(n)] = True
    risk = rng.integers(0, 4, size=n) + rng.choice([0.0, 1e-9, 1e-3], size=n)
    try:
        sk = concordance_index_censored(event, time, risk)
    except ValueError:  # scikit-survival's NoComparablePairException is a ValueError
        with pytest.raises(ValueError):
            concordance_index_details(time, event, risk)
        return
    if np.isnan(sk[0]):  # scikit-survival returns 0/0 when every comparable set is empty
        with pytest.raises(ValueError):
            concordance_index_details(time, event, risk)
        return
    ours = concordance_index_details(time, event, risk)
    assert ours.cindex == pytest.approx(sk[0], rel=1e-12)
    assert (ours.concordant, ours.discordant, ours.tied_risk, ours.tied_time) == tuple(sk[1:])


def test_larger_synthetic_against_oracles():
    rng = np.random.default_rng(4)
    n = 3000
    time = np.round(rng.exponential(800, size=n))  # integer days: tied times
    event = rng.random(n) < 0.4
    _check_against_oracles(time, event.astype(int), rng.normal(size=n) - time / 1000)


# --------------------------------------------------------------------------------------
# Harrell's C: invariants
# --------------------------------------------------------------------------------------


def test_invariant_under_monotone_transforms(fixture_cohort):
    rng = np.random.default_rng(5)
    time, event = _pooled(fixture_cohort)
    for risk in (rng.normal(size=len(time)), rng.integers(0, 3, size=len(time)).astype(float)):
        c = concordance_index(time, event, risk)
        assert concordance_index(time, event, 3.0 * risk + 7.0) == pytest.approx(c, abs=1e-15)
        assert concordance_index(time, event, np.exp(risk)) == pytest.approx(c, abs=1e-15)
        # a monotone transform of the times changes nothing either
        assert concordance_index(np.sqrt(time), event, risk) == pytest.approx(c, abs=1e-15)


def test_negated_risk_gives_one_minus_c(fixture_cohort):
    rng = np.random.default_rng(6)
    time, event = _pooled(fixture_cohort)
    # without risk ties concordant and discordant swap; with ties the 0.5s stay 0.5s, so the
    # identity holds in both cases
    for risk in (rng.normal(size=len(time)), rng.integers(0, 3, size=len(time)).astype(float)):
        c = concordance_index_details(time, event, risk)
        neg = concordance_index_details(time, event, -risk)
        assert neg.cindex == pytest.approx(1.0 - c.cindex, abs=1e-12)
        assert (neg.concordant, neg.discordant) == (c.discordant, c.concordant)


def test_perfect_and_reversed_predictions():
    time = np.array([5.0, 1.0, 3.0, 9.0, 7.0])
    event = np.array([1, 1, 0, 1, 1])
    assert concordance_index(time, event, -time) == 1.0
    assert concordance_index(time, event, time) == 0.0
    assert concordance_index(time, event, np.zeros(5)) == 0.5


# --------------------------------------------------------------------------------------
# Kaplan-Meier censoring distribution
# --------------------------------------------------------------------------------------


def test_censoring_km_hand_case():
    # times 1 2 2 3 4, events 1 0 1 0 1. Censorings at t=2 (one) and t=3 (one).
    # t=2: 4 at risk, 1 death first -> 3 at risk for the censoring: G = 1 - 1/3 = 2/3.
    # t=3: 2 at risk, no death -> G = 2/3 * (1 - 1/2) = 1/3. t=4: a death only, G stays 1/3.
    # (lifelines' KaplanMeierFitter on 1 - event would use 4 at risk at t=2: 3/4.)
    g = CensoringDistribution.fit([1, 2, 2, 3, 4], [1, 0, 1, 0, 1])
    np.testing.assert_allclose(
        g([0.5, 1, 1.9, 2, 2.5, 3, 3.9, 4]), [1, 1, 1, 2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3]
    )
    with pytest.raises(ValueError, match="past the last training time"):
        g([4.5])


def test_censoring_km_zero_tail_and_all_events():
    g = CensoringDistribution.fit([1, 2, 3], [1, 1, 0])  # last patient censored: G(3) = 0
    np.testing.assert_allclose(g([2.5, 3, 100]), [1, 0, 0])
    g = CensoringDistribution.fit([1, 2, 3], [1, 1, 1])  # no censoring: G = 1
    np.testing.assert_allclose(g([0, 3]), [1, 1])
    with pytest.raises(ValueError):
        g([3.5])


def test_censoring_km_against_sksurv(fixture_cohort):
    time, event = _pooled(fixture_cohort)
    ref = CensoringDistributionEstimator().fit(Surv.from_arrays(event.astype(bool), time))
    grid = np.concatenate([np.unique(time), np.linspace(0, time.max(), 97)])
    np.testing.assert_allclose(
        CensoringDistribution.fit(time, event)(grid), ref.predict_proba(grid), rtol=1e-13
    )


# --------------------------------------------------------------------------------------
# Uno's C
# --------------------------------------------------------------------------------------


def test_uno_hand_case():
    # Training labels as in test_censoring_km_hand_case: G(1) = 1, G(2) = 2/3, G(3.5) = 1/3.
    # Test: times 1, 2, 3, 3.5, events 1, 1, 0, 1, risks 3, 1, 2, 0.
    #   i = t1 (weight 1/G(1)^2 = 1): pairs with t2 (3>1), t3 (3>2), t3.5 (3>0): 3 concordant.
    #   i = t2 (weight 1/G(2)^2 = 9/4): with t3 (1<2 discordant), t3.5 (1>0 concordant).
    #   i = t3.5 (weight 9): no later patient, no pair.
    # Uno = (1*3 + 9/4*1) / (1*3 + 9/4*2) = 5.25 / 7.5 = 0.7   (Harrell: 4/5)
    train_t, train_e = [1, 2, 2, 3, 4], [1, 0, 1, 0, 1]
    test_t, test_e, risk = [1, 2, 3, 3.5], [1, 1, 0, 1], [3.0, 1.0, 2.0, 0.0]
    assert uno_concordance_index(train_t, train_e, test_t, test_e, risk) == pytest.approx(0.7)
    assert concordance_index(test_t, test_e, risk) == pytest.approx(0.8)
    # tau = 1.5: only the event at t=1 keeps its weight -> 3/3
    assert uno_concordance_index(train_t, train_e, test_t, test_e, risk, tau=1.5) == 1.0
    # no censoring in training: all weights 1 -> Harrell's C
    assert uno_concordance_index([1, 2, 5], [1, 1, 1], test_t, test_e, risk) == pytest.approx(0.8)


def test_uno_errors():
    train_t, train_e = [1, 2, 2, 3, 4], [1, 0, 1, 0, 1]
    with pytest.raises(ValueError, match="past the last training time"):
        uno_concordance_index(train_t, train_e, [1, 5], [1, 1], [1.0, 0.0])
    with pytest.raises(ValueError, match="censored"):
        uno_concordance_index(train_t, train_e, [1, 2], [0, 0], [1.0, 0.0])
    with pytest.raises(ValueError, match="before tau"):
        uno_concordance_index(train_t, train_e, [2, 3], [1, 0], [1.0, 0.0], tau=1.0)
    with pytest.raises(ValueError, match="zero"):
        # last training patient censored: G = 0 from t = 3 on
        uno_concordance_index([1, 2, 3], [1, 1, 0], [1, 3, 4], [1, 1, 0], [1.0, 2.0, 3.0])


def _uno_both(train, test, risk, tau):
    """Our Uno C and scikit-survival's, or the fact that both refuse the input."""
    (tr_t, tr_e), (te_t, te_e) = train, test
    try:
        ref = concordance_index_ipcw(
            Surv.from_arrays(tr_e.astype(bool), tr_t),
            Surv.from_arrays(te_e.astype(bool), te_t),
            risk,
            tau=tau,
        )[0]
    except ValueError:
        with pytest.raises(ValueError):
            uno_concordance_index(tr_t, tr_e, te_t, te_e, risk, tau=tau)
        return None
    ours = uno_concordance_index(tr_t, tr_e, te_t, te_e, risk, tau=tau)
    assert ours == pytest.approx(ref, rel=1e-12)
    return ours


def test_uno_against_sksurv_on_fixture_tables(fixture_cohort):
    rng = np.random.default_rng(7)
    train, (te_t, te_e) = fixture_cohort["train"], fixture_cohort["test"]
    # scikit-survival needs the test event times inside the training follow-up: either drop
    # the later test patients or truncate at tau
    keep = te_t <= train[0].max()
    test_in = (te_t[keep], te_e[keep])
    n_checked = 0
    for risk_kind in ("continuous", "tied"):
        risk_in = (
            rng.normal(size=keep.sum())
            if risk_kind == "continuous"
            else rng.integers(0, 3, keep.sum()) * 1.0
        )
        risk_all = (
            rng.normal(size=len(te_t))
            if risk_kind == "continuous"
            else rng.integers(0, 3, len(te_t)) * 1.0
        )
        for test, risk, tau in (
            (test_in, risk_in, None),
            ((te_t, te_e), risk_all, float(np.quantile(train[0], 0.8))),
        ):
            n_checked += _uno_both(train, test, risk, tau) is not None
    # the train split is large enough for the reverse direction too
    big = fixture_cohort["train"]
    other = _pooled(fixture_cohort)
    n_checked += _uno_both(other, big, rng.normal(size=len(big[0])), None) is not None
    assert n_checked >= 1


def test_uno_against_sksurv_synthetic():
    rng = np.random.default_rng(8)
    n_tr, n_te = 400, 300
    tr_t, te_t = np.round(rng.exponential(500, n_tr)), np.round(rng.exponential(500, n_te))
    tr_e, te_e = (rng.random(n_tr) < 0.5).astype(int), (rng.random(n_te) < 0.5).astype(int)
    tr_t[0], tr_e[0] = te_t.max() + 1, 0  # training follow-up covers the test times
    risk = -te_t / 300 + rng.normal(size=n_te)
    for tau in (None, 300.0, 1000.0):
        assert _uno_both((tr_t, tr_e), (te_t, te_e), risk, tau) is not None
        assert _uno_both((tr_t, tr_e), (te_t, te_e), np.round(risk), tau) is not None


def test_uno_full_tables(full_cohort):
    rng = np.random.default_rng(9)
    train, (te_t, te_e) = full_cohort["train"], full_cohort["test"]
    tau = float(np.quantile(train[0], 0.9))
    assert _uno_both(train, (te_t, te_e), rng.normal(size=len(te_t)), tau) is not None


# --------------------------------------------------------------------------------------
# Brier score
# --------------------------------------------------------------------------------------


def test_brier_hand_case():
    # Training labels as in test_censoring_km_hand_case: G(1) = G(1.5) = 1, G(2.5) = 2/3.
    # Test: times 1, 2, 3, events 1, 0, 1.
    # t = 2.5, S = (0.2, 0.6, 0.7):
    #   patient 1 (t=1 <= 2.5, event): case,    0.2^2 / G(1)   = 0.04
    #   patient 2 (t=2 <= 2.5, censored): contributes 0
    #   patient 3 (t=3 > 2.5): control, (1 - 0.7)^2 / G(2.5) = 0.09 * 3/2 = 0.135
    #   BS(2.5) = (0.04 + 0 + 0.135) / 3 = 0.175 / 3
    # t = 1.5, S = (0.1, 0.9, 0.8):
    #   case 0.1^2 / 1 = 0.01; controls (1-0.9)^2 / 1 = 0.01 and (1-0.8)^2 / 1 = 0.04
    #   BS(1.5) = 0.06 / 3 = 0.02
    # IBS over [1.5, 2.5] = trapezoid = (0.02 + 0.175/3) / 2 * 1.0 / (2.5 - 1.5)
    train_t, train_e = [1, 2, 2, 3, 4], [1, 0, 1, 0, 1]
    test_t, test_e = [1, 2, 3], [1, 0, 1]
    surv = np.array([[0.1, 0.2], [0.9, 0.6], [0.8, 0.7]])
    bs = brier_score(train_t, train_e, test_t, test_e, surv, [1.5, 2.5])
    np.testing.assert_allclose(bs, [0.02, 0.175 / 3])
    ibs = integrated_brier_score(train_t, train_e, test_t, test_e, surv, [1.5, 2.5])
    assert ibs == pytest.approx((0.02 + 0.175 / 3) / 2)
    # a single time point with a 1-D estimate
    np.testing.assert_allclose(
        brier_score(train_t, train_e, test_t, test_e, surv[:, 1], [2.5]), [0.175 / 3]
    )


@pytest.mark.parametrize(
    "surv, times, match",
    [
        (np.full((3, 2), 0.5), [2.5, 1.5], "strictly increasing"),
        (np.full((3, 2), 0.5), [1.5, 1.5], "strictly increasing"),
        (np.full((3, 2), 0.5), [0.5, 2.5], "within the test follow-up"),
        (np.full((3, 2), 0.5), [1.5, 3.0], "within the test follow-up"),
        (np.full((3, 3), 0.5), [1.5, 2.5], "shape"),
        (np.full((3, 2), 1.5), [1.5, 2.5], r"\[0, 1\]"),
        (np.full((3, 2), np.nan), [1.5, 2.5], "NaN"),
    ],
)
def test_brier_validation(surv, times, match):
    with pytest.raises(ValueError, match=match):
        brier_score([1, 2, 2, 3, 4], [1, 0, 1, 0, 1], [1, 2, 3], [1, 0, 1], surv, times)


def test_ibs_needs_two_times():
    with pytest.raises(ValueError, match="two time points"):
        integrated_brier_score(
            [1, 2, 3, 4], [1, 0, 1, 0], [1, 2, 3], [1, 0, 1], np.full((3, 1), 0.5), [2.0]
        )


def _survival_estimates(rng, n, times, kind):
    if kind == "exponential":  # proper curves: S_i(t) = exp(-t / scale_i), decreasing in t
        scale = rng.uniform(200, 4000, size=n)
        return np.exp(-np.asarray(times)[None, :] / scale[:, None])
    return rng.random((n, len(times)))  # arbitrary probabilities


def _brier_both(train, test, surv, times):
    (tr_t, tr_e), (te_t, te_e) = train, test
    y_tr, y_te = (
        Surv.from_arrays(tr_e.astype(bool), tr_t),
        Surv.from_arrays(te_e.astype(bool), te_t),
    )
    _, ref_bs = sk_brier_score(y_tr, y_te, surv, times)
    ref_ibs = sk_integrated_brier_score(y_tr, y_te, surv, times)
    np.testing.assert_allclose(brier_score(tr_t, tr_e, te_t, te_e, surv, times), ref_bs, rtol=1e-12)
    assert integrated_brier_score(tr_t, tr_e, te_t, te_e, surv, times) == pytest.approx(
        ref_ibs, rel=1e-12
    )


@pytest.mark.parametrize("kind", ["exponential", "uniform"])
def test_brier_against_sksurv_on_fixture_tables(fixture_cohort, kind):
    rng = np.random.default_rng(10)
    train, (te_t, te_e) = fixture_cohort["train"], fixture_cohort["test"]
    # scikit-survival evaluates G at every test time: keep the test patients inside the
    # training follow-up
    keep = te_t <= train[0].max()
    te_t, te_e = te_t[keep], te_e[keep]
    times = np.unique(np.quantile(te_t, [0.1, 0.3, 0.5, 0.7, 0.85]))
    times = times[(times >= te_t.min()) & (times < te_t.max())]
    surv = _survival_estimates(rng, len(te_t), times, kind)
    _brier_both(train, (te_t, te_e), surv, times)
    # also train <- pooled, test <- train (more patients, tied times)
    pooled, (tr_t, tr_e) = _pooled(fixture_cohort), fixture_cohort["train"]
    times = np.linspace(tr_t.min(), tr_t.max(), 12)[:-1]
    _brier_both(pooled, (tr_t, tr_e), _survival_estimates(rng, len(tr_t), times, kind), times)


def test_brier_against_sksurv_synthetic():
    rng = np.random.default_rng(11)
    n_tr, n_te = 500, 300
    tr_t, te_t = np.round(rng.exponential(600, n_tr)), np.round(rng.exponential(600, n_te))
    tr_e, te_e = (rng.random(n_tr) < 0.6).astype(int), (rng.random(n_te) < 0.6).astype(int)
    tr_t[0], tr_e[0] = te_t.max() + 10, 0
    times = np.arange(50.0, np.quantile(te_t, 0.9), 25.0)
    _brier_both(
        (tr_t, tr_e), (te_t, te_e), _survival_estimates(rng, n_te, times, "exponential"), times
    )
    # torch inputs are accepted
    surv = _survival_estimates(rng, n_te, times, "uniform")
    ours = brier_score(
        torch.tensor(tr_t),
        torch.tensor(tr_e),
        torch.tensor(te_t),
        torch.tensor(te_e),
        torch.tensor(surv),
        torch.tensor(times),
    )
    np.testing.assert_allclose(ours, brier_score(tr_t, tr_e, te_t, te_e, surv, times))


def test_brier_full_tables(full_cohort):
    rng = np.random.default_rng(12)
    train, (te_t, te_e) = full_cohort["train"], full_cohort["test"]
    keep = te_t <= train[0].max()
    te_t, te_e = te_t[keep], te_e[keep]
    times = np.arange(365.0, min(np.quantile(te_t, 0.9), 5 * 365.0), 365.0)
    if len(times) < 2:
        pytest.skip("follow-up too short for two yearly time points")
    _brier_both(
        train, (te_t, te_e), _survival_estimates(rng, len(te_t), times, "exponential"), times
    )


def test_risk_differences_at_the_tolerance_boundary():
    # Risks placed at fl(r +- tied_tol): whether such a pair is a tie depends on how
    # |r_j - r_i| <= tied_tol rounds. scikit-survival decides on the rounded difference; a
    # searchsorted on fl(r_i - tied_tol) would disagree for some of these pairs.
    base = np.array([0.1, 1.0, 3.0, 7.3, 123.456, -2.5])
    risk = np.concatenate(
        [base, base - 1e-8, base + 1e-8, base - 2e-8, np.nextafter(base - 1e-8, 0)]
    )
    n = len(risk)
    time = np.arange(n, dtype=float)
    rng = np.random.default_rng(13)
    for _ in range(5):
        perm = rng.permutation(n)
        event = np.ones(n, dtype=bool)
        sk = concordance_index_censored(event, time, risk[perm])
        ours = concordance_index_details(time, event, risk[perm])
        assert (ours.concordant, ours.discordant, ours.tied_risk) == tuple(sk[1:4])
