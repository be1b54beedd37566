"""TimeBins: the 32 yearly bins of method.md section 2, quantile bins, validation, round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from steph.survival import TimeBins


def test_default_uniform_bins_are_32_years_of_365_days():
    b = TimeBins.uniform()
    assert b.n_bins == 32
    assert b.kind == "uniform"
    assert b.edges[0] == 0.0 and b.edges[-1] == 11680.0
    np.testing.assert_allclose(np.diff(b.edges), 365.0)
    np.testing.assert_allclose(b.end_times, 365.0 * np.arange(1, 33))


@pytest.mark.parametrize(
    "days, expected",
    [
        (0.0, 0),  # the first bin is closed on the left
        (364.9, 0),
        (365.0, 1),  # a cut point belongs to the bin it starts
        (729.999, 1),
        (730.0, 2),
        (11314.9, 30),
        (11315.0, 31),  # 31 x 365: start of the last bin
        (11679.9, 31),
        (11680.0, 31),  # the last bin is open to +inf
        (1e6, 31),
    ],
)
def test_uniform_to_bins_hand_cases(days, expected):
    out = TimeBins.uniform().to_bins([days])
    assert out.dtype == np.int64
    assert out.tolist() == [expected]


def test_to_bins_vector_keeps_order_and_shape():
    out = TimeBins.uniform().to_bins(np.array([1e6, 0.0, 400.0, 365.0 * 5 + 1]))
    assert out.tolist() == [31, 0, 1, 5]


def test_custom_uniform():
    b = TimeBins.uniform(n_bins=4, max_time=100.0)
    assert b.edges == (0.0, 25.0, 50.0, 75.0, 100.0)
    assert b.to_bins([0, 24.99, 25, 99, 1000]).tolist() == [0, 0, 1, 3, 3]


def test_single_bin_puts_everything_in_bin_zero():
    b = TimeBins.uniform(n_bins=1, max_time=10.0)
    assert b.to_bins([0.0, 5.0, 1e9]).tolist() == [0, 0, 0]


@pytest.mark.parametrize("bad", [[-1.0], [0.0, -0.001], [np.nan], [np.inf], [10.0, -np.inf]])
def test_to_bins_rejects_negative_and_non_finite(bad):
    with pytest.raises(ValueError):
        TimeBins.uniform().to_bins(bad)


def test_quantile_bins_hand_case():
    # Observed (event) times 10, 20, ..., 80 (n = 8). np.quantile's linear rule puts the
    # q-quantile at position q * (n - 1): 0.25 -> 1.75 -> 20 + 0.75 * 10 = 27.5;
    # 0.5 -> 3.5 -> 45; 0.75 -> 5.25 -> 62.5. The nominal end is max(all times) = 80.
    times = np.array([10, 20, 30, 40, 50, 60, 70, 80], dtype=float)
    b = TimeBins.quantile(times, np.ones(8), n_bins=4)
    assert b.kind == "quantile"
    np.testing.assert_allclose(b.edges, [0.0, 27.5, 45.0, 62.5, 80.0])
    assert b.to_bins([0, 27.4, 27.5, 44.9, 45, 62.5, 500]).tolist() == [0, 0, 1, 1, 2, 3, 3]


def test_quantile_bins_use_only_event_times_for_cut_points():
    # Censored times (here the large ones) must not move the cut points, only the end.
    times = np.array([10, 20, 30, 40, 1000, 2000], dtype=float)
    events = np.array([1, 1, 1, 1, 0, 0])
    b = TimeBins.quantile(times, events, n_bins=2)
    # median of 10, 20, 30, 40 = 25
    np.testing.assert_allclose(b.edges, [0.0, 25.0, 2000.0])


def test_quantile_bins_errors():
    with pytest.raises(ValueError, match="at least 4 observed events"):
        TimeBins.quantile([1.0, 2.0, 3.0, 4.0], [1, 1, 1, 0], n_bins=4)
    with pytest.raises(ValueError, match="collapse"):
        TimeBins.quantile([5.0] * 6 + [9.0], np.ones(7), n_bins=4)


@pytest.mark.parametrize("edges", [(0.0,), (1.0, 2.0), (0.0, 2.0, 2.0), (0.0, 3.0, 1.0)])
def test_invalid_edges(edges):
    with pytest.raises(ValueError):
        TimeBins(edges)


def test_invalid_uniform_arguments():
    with pytest.raises(ValueError):
        TimeBins.uniform(n_bins=0)
    with pytest.raises(ValueError):
        TimeBins.uniform(max_time=0.0)


@pytest.mark.parametrize(
    "bins",
    [
        TimeBins.uniform(),
        TimeBins.uniform(n_bins=5, max_time=12.5),
        TimeBins.quantile(np.arange(1.0, 41.0), np.ones(40), n_bins=4),
    ],
)
def test_to_dict_from_dict_round_trip(bins):
    d = bins.to_dict()
    back = TimeBins.from_dict(json.loads(json.dumps(d)))  # survives a JSON file
    assert back == bins
    assert back.kind == bins.kind
    times = np.array([0.0, 3.0, 17.5, 400.0, 5000.0, 1e7])
    np.testing.assert_array_equal(back.to_bins(times), bins.to_bins(times))


def test_from_dict_without_kind_is_custom():
    b = TimeBins.from_dict({"edges": [0, 1, 2]})
    assert b.kind == "custom" and b.n_bins == 2
