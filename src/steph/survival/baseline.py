"""The baseline discrete hazard of a training split, used to initialise a fresh head's bias.

A freshly initialised head predicts a hazard of about 0.5 in every bin; early training then
spends itself on calibration (lowering every hazard), and in a merged model that gradient flows
into the merge weights instead of discrimination (see docs/method-notes.md). Starting the
head's bias at the logit of the empirical hazard removes that: ``h_j = d_j / n_j`` with ``d_j``
events in bin j and ``n_j`` patients at risk at its start, shrunk towards the pooled hazard by
``pseudo_count`` pseudo-observations (so empty late bins get the pooled hazard, not 0 or 1).
"""

from __future__ import annotations

import numpy as np
import torch


def baseline_hazard(bins, events, n_bins: int, pseudo_count: float = 1.0) -> np.ndarray:
    bins = np.asarray(bins, dtype=np.int64).reshape(-1)
    events = np.asarray(events).astype(bool).reshape(-1)
    if bins.shape != events.shape:
        raise ValueError(f"bins and events differ in length: {bins.shape} vs {events.shape}")
    if len(bins) == 0:
        raise ValueError("baseline hazard of an empty training set")
    if bins.min() < 0 or bins.max() >= n_bins:
        raise ValueError(f"bin indices must lie in [0, {n_bins})")
    at_risk = np.array([(bins >= j).sum() for j in range(n_bins)], dtype=float)
    deaths = np.bincount(bins[events], minlength=n_bins).astype(float)
    pooled = deaths.sum() / at_risk.sum()
    h = (deaths + pseudo_count * pooled) / (at_risk + pseudo_count)
    return np.clip(h, 1e-4, 1 - 1e-4)


def baseline_hazard_logits(bins, events, n_bins: int, pseudo_count: float = 1.0) -> torch.Tensor:
    h = baseline_hazard(bins, events, n_bins, pseudo_count)
    return torch.tensor(np.log(h / (1.0 - h)), dtype=torch.float32)
