"""Survival core: time bins, the discrete-time NLL loss, risk scores and metrics."""

from steph.survival.bins import TimeBins

__all__ = ["TimeBins"]
