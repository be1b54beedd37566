"""Survival metrics: Harrell's and Uno's concordance indices, the IPCW Brier score.

Pure numpy at run time (torch tensors are accepted and converted). The definitions are
those of scikit-survival (``concordance_index_censored``, ``concordance_index_ipcw``,
``brier_score``, ``integrated_brier_score``), which the tests use as oracles; scikit-survival
itself is GPL and is only a test dependency, so nothing here imports it.

Harrell's C (Harrell et al., Stat Med 1996), as in scikit-survival
-----------------------------------------------------------------
A pair (i, j) is *comparable* when i had an event and either ``t_i < t_j``, or
``t_i == t_j`` and j is censored (an event and a censoring at the same time: the censored
patient was still alive when i had the event). Two events at the same time, and any pair
whose earlier member is censored, are not comparable. For a comparable pair with
``d = r_j - r_i`` (risk of the longer-lived patient minus risk of i):

- concordant if ``d < -tied_tol`` (i, who failed first, has the higher risk);
- tied in risk if ``|d| <= tied_tol`` (counts 0.5);
- discordant if ``d > tied_tol``.

``C = (concordant + 0.5 * tied_risk) / comparable``.

Uno's C (Uno et al., Stat Med 2011), as in scikit-survival
----------------------------------------------------------
Same pairs, but each comparable pair whose first member is event i is weighted by
``G(t_i)^-2``, where ``G`` is the Kaplan-Meier estimate of the censoring survival function
fitted on the *training* labels (evaluated right-continuously at ``t_i``, as
scikit-survival does); with a truncation time ``tau`` only events with ``t_i < tau`` get a
non-zero weight.

Brier score (Graf et al., Stat Med 1999), as in scikit-survival
---------------------------------------------------------------
``BS(t) = mean_i [ S_i(t)^2 * 1(t_i <= t, e_i = 1) / G(t_i) + (1 - S_i(t))^2 * 1(t_i > t) / G(t) ]``
(a weight ``1/G`` with ``G = 0`` counts as 0), and the integrated Brier score is the
trapezoidal integral of ``BS`` over ``times`` divided by ``times[-1] - times[0]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "ConcordanceResult",
    "CensoringDistribution",
    "concordance_index",
    "concordance_index_details",
    "concordance_index_or_nan",
    "uno_concordance_index",
    "brier_score",
    "integrated_brier_score",
]


# --------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _float_array(x: Any, name: str, ndim: int = 1) -> np.ndarray:
    a = _to_numpy(x)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {a.shape}")
    try:
        a = a.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}") from exc
    bad = ~np.isfinite(a)
    if bad.any():
        raise ValueError(f"{name} contains {int(bad.sum())} NaN or infinite value(s)")
    return a


def _event_array(x: Any, name: str) -> np.ndarray:
    a = _to_numpy(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-dimensional, got shape {a.shape}")
    if a.dtype == np.bool_:
        return a.copy()
    try:
        f = a.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be 0/1 or boolean, got dtype {a.dtype}") from exc
    ok = (f == 0) | (f == 1)
    if not ok.all():
        bad = np.unique(f[~ok])[:5].tolist()
        raise ValueError(f"{name} must contain only 0 (censored) and 1 (event); found {bad}")
    return f == 1


def _check_lengths(**arrays: np.ndarray) -> int:
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"length mismatch: {lengths}")
    return next(iter(lengths.values()))


def _check_tol(tied_tol: float) -> float:
    tol = float(tied_tol)
    if not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"tied_tol must be a finite number >= 0, got {tied_tol}")
    return tol


# --------------------------------------------------------------------------------------
# counting comparable pairs in O(n log^2 n) without a Python loop over patients
# --------------------------------------------------------------------------------------


def _first_true(sorted_vals: np.ndarray, ref: np.ndarray, pred: Callable) -> np.ndarray:
    """For each ``ref[k]``: the first index ``q`` with ``pred(sorted_vals[q] - ref[k])`` true
    (``len(sorted_vals)`` if none). ``pred`` must be monotone (false then true) in q.

    A vectorised bisection rather than ``searchsorted(sorted_vals, ref +- tol)`` so that ties
    are decided on the rounded difference ``r_j - r_i`` exactly as scikit-survival does,
    also when ``|r_j - r_i|`` is within one ulp of ``tied_tol``."""
    m = len(sorted_vals)
    lo = np.zeros(len(ref), dtype=np.int64)
    hi = np.full(len(ref), m, dtype=np.int64)
    while True:
        active = lo < hi
        if not active.any():
            return lo
        mid = (lo + hi) // 2
        ok = pred(sorted_vals[np.minimum(mid, m - 1)] - ref)
        hi = np.where(active & ok, mid, hi)
        lo = np.where(active & ~ok, mid + 1, lo)


def _suffix_count_less(
    ranks: np.ndarray, n_ranks: int, starts: np.ndarray, thr: np.ndarray
) -> np.ndarray:
    """``out[k] = #{q >= starts[k] : ranks[q] < thr[k]}`` for integer ranks in [0, n_ranks).

    Suffix count = total count - prefix count. The prefix ``[0, s)`` is the disjoint union,
    over the set bits L of s, of the aligned block ``(s >> L) - 1`` of length 2^L (the
    Fenwick decomposition). Per level L, sorting the keys ``block * n_ranks + rank`` sorts
    every block internally, so one global ``searchsorted`` counts, for all queries at once,
    the entries of a block below a threshold. ``log2(n)`` levels of one sort each."""
    n = len(ranks)
    hist = np.bincount(ranks, minlength=n_ranks)
    below = np.concatenate(([0], np.cumsum(hist)))  # below[r] = #{q : ranks[q] < r}
    out = below[thr].astype(np.int64)
    pos = np.arange(n, dtype=np.int64)
    level = 0
    while (1 << level) <= n:
        sel = np.nonzero((starts >> level) & 1)[0]
        if sel.size:
            keys = np.sort((pos >> level) * n_ranks + ranks)
            block = (starts[sel] >> level) - 1
            # every block before `block` is full, so it contributes block << level keys
            out[sel] -= np.searchsorted(keys, block * n_ranks + thr[sel], side="left") - (
                block << level
            )
        level += 1
    return out


class _EventCounts(NamedTuple):
    """Per event patient i (in time order): counts over the patients comparable with i."""

    time: np.ndarray
    concordant: np.ndarray
    discordant: np.ndarray
    tied_risk: np.ndarray
    tied_time: np.ndarray
    comparable: np.ndarray


def _event_counts(
    time: np.ndarray, event: np.ndarray, risk: np.ndarray, tol: float
) -> _EventCounts:
    n = len(time)
    # time ascending; among equal times, events before censored patients. Then the patients
    # comparable with an event i are exactly the suffix starting at the first censored patient
    # of i's time group (or at the next time group if there is none).
    order = np.lexsort((~event, time))
    t, e, r = time[order], event[order], risk[order]
    uniq, ranks = np.unique(r, return_inverse=True)
    ranks = ranks.reshape(-1).astype(np.int64)

    ev = np.nonzero(e)[0]
    t_ev = t[ev]
    n_ev_same_time = np.searchsorted(t_ev, t_ev, side="right") - np.searchsorted(
        t_ev, t_ev, side="left"
    )
    start = np.searchsorted(t, t_ev, side="left") + n_ev_same_time
    group_end = np.searchsorted(t, t_ev, side="right")
    comparable = n - start
    tied_time = group_end - start

    r_ev = r[ev]
    # ranks below lo: r_j - r_i < -tol (concordant); ranks below hi: r_j - r_i <= tol
    lo = _first_true(uniq, r_ev, lambda d: d >= -tol)
    hi = _first_true(uniq, r_ev, lambda d: d > tol)
    k = len(ev)
    counts = _suffix_count_less(
        ranks, len(uniq), np.concatenate([start, start]), np.concatenate([lo, hi])
    )
    concordant, at_most_tied = counts[:k], counts[k:]
    return _EventCounts(
        time=t_ev,
        concordant=concordant,
        discordant=comparable - at_most_tied,
        tied_risk=at_most_tied - concordant,
        tied_time=tied_time,
        comparable=comparable,
    )


# --------------------------------------------------------------------------------------
# Harrell's C
# --------------------------------------------------------------------------------------


class ConcordanceResult(NamedTuple):
    """Harrell's C and its pair counts (``comparable = concordant + discordant + tied_risk``;
    ``tied_time`` = comparable pairs of an event and a censoring at the same time)."""

    cindex: float
    concordant: int
    discordant: int
    tied_risk: int
    tied_time: int
    comparable: int


def concordance_index_details(
    time: Any, event: Any, risk: Any, tied_tol: float = 1e-8
) -> ConcordanceResult:
    """Harrell's concordance index with its pair counts (definition in the module docstring;
    identical to scikit-survival's ``concordance_index_censored(event, time, risk, tied_tol)``,
    whose ``(cindex, concordant, discordant, tied_risk, tied_time)`` are the first five fields).

    Args:
        time: observed times (event or censoring), any unit, shape (n,).
        event: 1/True = event observed, 0/False = censored, shape (n,).
        risk: predicted risk scores, higher = shorter expected survival, shape (n,).
        tied_tol: risks with ``|r_i - r_j| <= tied_tol`` are tied and count 0.5.

    Raises ValueError on length mismatch, NaN/inf, events outside {0, 1}, no event, or no
    comparable pair. Runs in O(n log^2 n) time and O(n) memory."""
    time = _float_array(time, "time")
    event = _event_array(event, "event")
    risk = _float_array(risk, "risk")
    _check_lengths(time=time, event=event, risk=risk)
    tol = _check_tol(tied_tol)
    if not event.any():
        raise ValueError("all patients are censored: the C-index needs at least one event")
    c = _event_counts(time, event, risk, tol)
    comparable = int(c.comparable.sum())
    if comparable == 0:
        raise ValueError(
            "no comparable pairs: every event is at the largest observed time and no patient "
            "is censored at that time"
        )
    concordant = int(c.concordant.sum())
    tied_risk = int(c.tied_risk.sum())
    return ConcordanceResult(
        cindex=(concordant + 0.5 * tied_risk) / comparable,
        concordant=concordant,
        discordant=int(c.discordant.sum()),
        tied_risk=tied_risk,
        tied_time=int(c.tied_time.sum()),
        comparable=comparable,
    )


def concordance_index(time: Any, event: Any, risk: Any, tied_tol: float = 1e-8) -> float:
    """Harrell's concordance index of ``risk`` (higher = worse) against right-censored
    ``(time, event)``; see :func:`concordance_index_details`."""
    return concordance_index_details(time, event, risk, tied_tol).cindex


def concordance_index_or_nan(time: Any, event: Any, risk: Any) -> float:
    """:func:`concordance_index`, or NaN where it is undefined (no comparable pair, e.g. no
    event in a small split; inputs that cannot be scored): for tables and logs, where one
    such fold must not stop the rest."""
    try:
        return float(concordance_index(np.asarray(time), np.asarray(event), np.asarray(risk)))
    except ValueError:
        return float("nan")


# --------------------------------------------------------------------------------------
# Kaplan-Meier estimate of the censoring distribution
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CensoringDistribution:
    """Kaplan-Meier estimate ``G(t) = P(C > t)`` of the censoring survival function.

    The censorings are the "events"; at a time with both deaths and censorings the deaths
    are taken to happen first, so they leave the risk set of the censoring process:
    ``G(t) = prod_{u <= t} (1 - c_u / (n_u - d_u))`` with ``n_u`` patients at risk at u,
    ``d_u`` deaths and ``c_u`` censorings at u (scikit-survival's
    ``kaplan_meier_estimator(..., reverse=True)``; lifelines' ``KaplanMeierFitter`` on the
    flipped indicator keeps the deaths in the risk set and differs at such ties).

    ``G`` is a right-continuous step function; past the last training time it is 0 if the
    last value is 0 and undefined otherwise (evaluating there raises ValueError)."""

    times: np.ndarray  # unique training times, ascending
    survival: np.ndarray  # G at those times

    @classmethod
    def fit(cls, time: Any, event: Any) -> CensoringDistribution:
        time = _float_array(time, "train_time")
        event = _event_array(event, "train_event")
        _check_lengths(train_time=time, train_event=event)
        if len(time) == 0:
            raise ValueError("the censoring distribution needs at least one training patient")
        uniq, inv = np.unique(time, return_inverse=True)
        inv = inv.reshape(-1)
        n_total = np.bincount(inv, minlength=len(uniq))
        n_death = np.bincount(inv, weights=event.astype(np.float64), minlength=len(uniq)).astype(
            np.int64
        )
        n_cens = n_total - n_death
        at_risk = len(time) - np.concatenate(([0], np.cumsum(n_total)[:-1]))
        at_risk_cens = at_risk - n_death  # deaths at u leave before the censorings at u
        ratio = np.divide(n_cens, at_risk_cens, out=np.zeros(len(uniq)), where=n_cens > 0)
        return cls(times=uniq, survival=np.cumprod(1.0 - ratio))

    def __call__(self, t: Any) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        beyond = t > self.times[-1]
        if beyond.any() and self.survival[-1] > 0:
            raise ValueError(
                f"time {float(t[beyond].max())} is past the last training time "
                f"{float(self.times[-1])}, where the censoring distribution is unknown; "
                "restrict the test times (or use tau) to the training follow-up"
            )
        idx = np.searchsorted(self.times, t, side="right") - 1
        out = np.where(idx >= 0, self.survival[np.maximum(idx, 0)], 1.0)
        return np.where(beyond, 0.0, out)


# --------------------------------------------------------------------------------------
# Uno's C
# --------------------------------------------------------------------------------------


def uno_concordance_index(
    train_time: Any,
    train_event: Any,
    test_time: Any,
    test_event: Any,
    risk: Any,
    tau: float | None = None,
    tied_tol: float = 1e-8,
) -> float:
    """Uno's IPCW concordance index (Uno et al. 2011), as scikit-survival's
    ``concordance_index_ipcw(y_train, y_test, risk, tau, tied_tol)[0]``.

    Harrell's comparable pairs on the test set, each weighted by ``G(t_i)^-2`` of its event
    patient i, ``G`` the Kaplan-Meier censoring survival of the training labels; with ``tau``,
    events at ``t_i >= tau`` get weight 0 (they still serve as the later member of a pair).

    Raises ValueError where ``G(t_i)`` is needed but unknown (an event past the last training
    time: pass ``tau`` or restrict the test set) or zero."""
    test_time = _float_array(test_time, "test_time")
    test_event = _event_array(test_event, "test_event")
    risk = _float_array(risk, "risk")
    _check_lengths(test_time=test_time, test_event=test_event, risk=risk)
    tol = _check_tol(tied_tol)
    cens = CensoringDistribution.fit(train_time, train_event)
    if not test_event.any():
        raise ValueError("all test patients are censored: the C-index needs at least one event")

    c = _event_counts(test_time, test_event, risk, tol)
    used = np.ones(len(c.time), dtype=bool) if tau is None else c.time < float(tau)
    if not used.any():
        raise ValueError(f"no test event before tau = {tau}")
    g = cens(c.time[used])
    if (g == 0).any():
        raise ValueError("the censoring survival function is zero at a test event time")
    w = np.zeros(len(c.time))
    w[used] = np.square(1.0 / g)
    denominator = float(np.sum(w * c.comparable))
    if denominator == 0:
        raise ValueError("no comparable pairs among the test events before tau")
    return float(np.sum(w * (c.concordant + 0.5 * c.tied_risk))) / denominator


# --------------------------------------------------------------------------------------
# Brier score
# --------------------------------------------------------------------------------------


def _brier_inputs(train_time, train_event, test_time, test_event, survival, times):
    test_time = _float_array(test_time, "test_time")
    test_event = _event_array(test_event, "test_event")
    _check_lengths(test_time=test_time, test_event=test_event)
    times = _float_array(np.atleast_1d(_to_numpy(times)), "times")
    if len(times) == 0:
        raise ValueError("times is empty")
    if np.any(np.diff(times) <= 0):
        # scikit-survival sorts and de-duplicates times without reordering the estimate's
        # columns; refusing is safer than silently pairing columns with the wrong times.
        raise ValueError("times must be strictly increasing")
    if len(test_time) == 0:
        raise ValueError("the test set is empty")
    if times[0] < test_time.min() or times[-1] >= test_time.max():
        raise ValueError(
            f"all times must lie within the test follow-up [{test_time.min()}, {test_time.max()})"
        )
    surv = _to_numpy(survival)
    if surv.ndim == 1 and len(times) == 1:
        surv = surv.reshape(-1, 1)
    surv = _float_array(surv, "survival", ndim=2)
    if surv.shape != (len(test_time), len(times)):
        raise ValueError(
            f"survival must have shape (n_test, n_times) = ({len(test_time)}, {len(times)}), "
            f"got {surv.shape}"
        )
    if surv.min() < 0 or surv.max() > 1:
        raise ValueError("survival estimates must be probabilities in [0, 1]")
    cens = CensoringDistribution.fit(train_time, train_event)
    return test_time, test_event, surv, times, cens


def brier_score(
    train_time: Any,
    train_event: Any,
    test_time: Any,
    test_event: Any,
    survival: Any,
    times: Any,
) -> np.ndarray:
    """IPCW Brier score at each of ``times`` (Graf et al. 1999), shape ``(len(times),)``.

    ``survival[i, k]`` is the predicted ``S_i(times[k])`` of test patient i. Same values as
    scikit-survival's ``brier_score(y_train, y_test, survival, times)[1]``; ``times`` must be
    strictly increasing and within ``[min(test_time), max(test_time))``. The censoring
    distribution ``G`` is the Kaplan-Meier estimate on the training labels; a ``1/G`` weight
    with ``G = 0`` counts as 0."""
    test_time, test_event, surv, times, cens = _brier_inputs(
        train_time, train_event, test_time, test_event, survival, times
    )
    # G is only needed at the times and at the event times that are cases for some time;
    # scikit-survival also evaluates it (and may raise) at times it then never uses.
    g_t = cens(times)
    maybe_case = test_event & (test_time <= times[-1])
    g_y = np.ones(len(test_time))
    g_y[maybe_case] = cens(test_time[maybe_case])
    inv_g_t = np.divide(1.0, g_t, out=np.zeros_like(g_t), where=g_t > 0)
    inv_g_y = np.divide(1.0, g_y, out=np.zeros_like(g_y), where=g_y > 0)

    is_case = (test_time[:, None] <= times[None, :]) & test_event[:, None]
    is_control = test_time[:, None] > times[None, :]
    terms = (
        np.square(surv) * is_case * inv_g_y[:, None]
        + np.square(1.0 - surv) * is_control * inv_g_t[None, :]
    )
    return terms.mean(axis=0)


def integrated_brier_score(
    train_time: Any,
    train_event: Any,
    test_time: Any,
    test_event: Any,
    survival: Any,
    times: Any,
) -> float:
    """Integrated Brier score: the trapezoidal integral of :func:`brier_score` over ``times``
    divided by ``times[-1] - times[0]`` (scikit-survival's ``integrated_brier_score``).
    Needs at least two times."""
    times_arr = np.atleast_1d(_to_numpy(times))
    if times_arr.ndim != 1 or len(times_arr) < 2:
        raise ValueError("the integrated Brier score needs at least two time points")
    bs = brier_score(train_time, train_event, test_time, test_event, survival, times)
    t = times_arr.astype(np.float64)
    area = float(np.sum(np.diff(t) * (bs[1:] + bs[:-1]) / 2.0))
    return area / float(t[-1] - t[0])
