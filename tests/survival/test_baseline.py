import numpy as np
import pytest
import torch

from steph.survival.baseline import baseline_hazard, baseline_hazard_logits


def test_hand_case_without_shrinkage():
    # bins 0,0,1,2 with events 1,0,1,0 over 3 bins:
    # bin 0: 4 at risk, 1 event -> 1/4; bin 1: 2 at risk, 1 event -> 1/2; bin 2: 1 at risk, 0 -> 0
    h = baseline_hazard([0, 0, 1, 2], [1, 0, 1, 0], 3, pseudo_count=0.0)
    np.testing.assert_allclose(h, [0.25, 0.5, 1e-4])


def test_shrinkage_towards_pooled_and_empty_bins():
    # pooled hazard = 2 events / 7 patient-bins at risk
    h = baseline_hazard([0, 0, 1, 2], [1, 0, 1, 0], 5, pseudo_count=1.0)
    pooled = 2 / 7
    np.testing.assert_allclose(h[:3], [(1 + pooled) / 5, (1 + pooled) / 3, pooled / 2])
    np.testing.assert_allclose(h[3:], [pooled, pooled])  # nobody at risk: the pooled hazard


def test_logits_reproduce_the_hazard_through_sigmoid():
    rng = np.random.default_rng(0)
    bins, events = rng.integers(0, 8, 100), rng.integers(0, 2, 100)
    logits = baseline_hazard_logits(bins, events, 8)
    torch.testing.assert_close(torch.sigmoid(logits).double(), torch.tensor(baseline_hazard(bins, events, 8)),
                               rtol=1e-5, atol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="differ in length"):
        baseline_hazard([0, 1], [1], 3)
    with pytest.raises(ValueError, match="empty"):
        baseline_hazard([], [], 3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        baseline_hazard([0, 3], [1, 1], 3)
