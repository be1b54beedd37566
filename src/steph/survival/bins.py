"""Discretisation of continuous survival times into the bins of a discrete-time hazard model.

The default follows method.md section 2: 32 uniform yearly bins on [0, 11680) days, the last
bin open to +inf (a time past the last cut point falls in the last bin).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_N_BINS = 32
DEFAULT_MAX_TIME = 11680.0  # 32 x 365 days


@dataclass(frozen=True)
class TimeBins:
    """Bin boundaries ``edges[0] = 0 < edges[1] < ... < edges[n_bins]``.

    Bin ``j`` covers ``[edges[j], edges[j+1])``; the last bin is open to +inf, so
    ``edges[-1]`` is only the nominal end used to draw survival curves.
    """

    edges: tuple[float, ...]
    kind: str = "uniform"

    def __post_init__(self) -> None:
        e = np.asarray(self.edges, dtype=float)
        if e.ndim != 1 or len(e) < 2:
            raise ValueError("TimeBins needs at least two edges")
        if e[0] != 0.0:
            raise ValueError(f"the first bin edge must be 0, got {e[0]}")
        if not np.all(np.diff(e) > 0):
            raise ValueError(f"bin edges must be strictly increasing: {e.tolist()}")

    @property
    def n_bins(self) -> int:
        return len(self.edges) - 1

    @classmethod
    def uniform(cls, n_bins: int = DEFAULT_N_BINS, max_time: float = DEFAULT_MAX_TIME) -> "TimeBins":
        if n_bins < 1 or max_time <= 0:
            raise ValueError(f"need n_bins >= 1 and max_time > 0, got {n_bins}, {max_time}")
        return cls(tuple(np.linspace(0.0, max_time, n_bins + 1).tolist()), kind="uniform")

    @classmethod
    def quantile(cls, times: Any, events: Any, n_bins: int = 4) -> "TimeBins":
        """Cut points at the quantiles of the *uncensored* times (the MCAT / PORPOISE habit).

        Fit on training patients only; duplicated quantiles (heavy ties) are an error because
        they would produce empty bins."""
        times = np.asarray(times, dtype=float)
        events = np.asarray(events).astype(bool)
        observed = times[events]
        if len(observed) < n_bins:
            raise ValueError(
                f"quantile bins need at least {n_bins} observed events, got {len(observed)}"
            )
        inner = np.quantile(observed, np.linspace(0, 1, n_bins + 1)[1:-1])
        end = max(float(times.max()), float(inner[-1]) + 1.0) if len(inner) else float(times.max())
        edges = np.concatenate([[0.0], inner, [end]])
        if not np.all(np.diff(edges) > 0):
            raise ValueError(
                f"quantile bins collapse (tied event times); use fewer bins than {n_bins}"
            )
        return cls(tuple(edges.tolist()), kind="quantile")

    def to_bins(self, times: Any) -> np.ndarray:
        """Bin index (int64) of each time in days."""
        t = np.asarray(times, dtype=float)
        if np.any(~np.isfinite(t)):
            raise ValueError("survival times must be finite")
        if np.any(t < 0):
            raise ValueError(f"survival times must be >= 0, got min {t.min()}")
        inner = np.asarray(self.edges[1:-1], dtype=float)
        return np.searchsorted(inner, t, side="right").astype(np.int64)

    @property
    def end_times(self) -> np.ndarray:
        """Time at which each S_j is read: the end of bin j (the nominal end for the last)."""
        return np.asarray(self.edges[1:], dtype=float)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "edges": list(self.edges)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TimeBins":
        return cls(tuple(float(x) for x in d["edges"]), kind=str(d.get("kind", "custom")))
