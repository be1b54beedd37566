"""Hazards, survival curves and risk scores from the logits of a discrete-time hazard model.

Definitions (method.md section 2): for logits ``phi`` of shape ``(..., n_bins)``,

- hazard of bin j: ``h_j = sigmoid(phi_j)``, the probability of the event in bin j given
  survival to its start;
- survival to the end of bin j: ``S_j = prod_{k<=j} (1 - h_k)``;
- ranking score: ``risk = -sum_j S_j`` (higher = worse prognosis). ``sum_j S_j`` is the
  expected number of bins survived (a restricted mean survival time in bin units), so its
  negation orders patients from long to short expected survival.

All functions take and return ``torch.Tensor`` and are differentiable.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["hazards_from_logits", "survival_from_logits", "risk_from_logits"]


def _check_logits(logits: Tensor) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(
            f"logits must have a last dimension of n_bins >= 1, got shape {tuple(logits.shape)}"
        )


def hazards_from_logits(logits: Tensor) -> Tensor:
    """Per-bin hazards ``h = sigmoid(logits)``, same shape as ``logits``."""
    _check_logits(logits)
    return torch.sigmoid(logits)


def survival_from_logits(logits: Tensor) -> Tensor:
    """Survival ``S_j = prod_{k<=j} (1 - h_k)`` along the last dimension (same shape).

    ``S`` is non-increasing along the last dimension and lies in [0, 1]."""
    h = hazards_from_logits(logits)
    return torch.cumprod(1.0 - h, dim=-1)


def risk_from_logits(logits: Tensor) -> Tensor:
    """Risk score ``-sum_j S_j`` over the last dimension: shape ``logits.shape[:-1]``.

    Higher risk = shorter expected survival; this is the score fed to the C-index."""
    return -survival_from_logits(logits).sum(dim=-1)
