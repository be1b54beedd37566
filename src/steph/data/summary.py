"""Cohort characteristics in the spirit of Table S1 of the STEPH appendix.

``patches_mean`` / ``patches_max`` are per patient (the bag: all slides concatenated);
Table S1 does not say whether its counts are per patient or per WSI, so the per-slide values
are given too (``slide_patches_mean`` / ``slide_patches_max``). All from file metadata only.
"Share censored" is the percentage of patients whose event was not observed (what the paper
calls the survival rate). The median follow-up is the plain median of the observed times of
all patients (censored or not), in days.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

SUMMARY_COLUMNS = [
    "cohort", "patients", "slides", "patches_mean", "patches_max", "censored_pct", "events",
    "median_followup_days", "feature_dim", "slide_patches_mean", "slide_patches_max",
]


def summarize_cohort(cohort: Any) -> dict[str, Any]:
    """One row of characteristics for a :class:`~steph.data.cohort.Cohort`."""
    p = cohort.patients
    n = len(p)
    patches = p["n_patches"].to_numpy(dtype=float)
    events = p["event"].to_numpy(dtype=int)
    times = p["time"].to_numpy(dtype=float)
    per_slide = cohort.slides["n_patches"].to_numpy(dtype=float)
    return {
        "cohort": cohort.name,
        "patients": int(n),
        "slides": int(sum(len(s) for s in p["slides"])),
        "patches_mean": float(patches.mean()) if n else float("nan"),
        "patches_max": int(patches.max()) if n else 0,
        "censored_pct": float(100.0 * (events == 0).mean()) if n else float("nan"),
        "events": int(events.sum()),
        "median_followup_days": float(np.median(times)) if n else float("nan"),
        "feature_dim": int(cohort.feature_dim),
        "slide_patches_mean": float(per_slide.mean()) if len(per_slide) else float("nan"),
        "slide_patches_max": int(per_slide.max()) if len(per_slide) else 0,
    }


def summarize_cohorts(cohorts: Iterable[Any]) -> pd.DataFrame:
    """One row per cohort (in the given order), columns :data:`SUMMARY_COLUMNS`."""
    rows = [summarize_cohort(c) for c in cohorts]
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def format_summary(df: pd.DataFrame) -> str:
    """A plain-text table with Table S1's rounding (thousands separators, one decimal %)."""
    out = df.copy()
    for c in ("patients", "slides", "patches_max", "events", "feature_dim",
              "slide_patches_max"):
        out[c] = out[c].map(lambda v: f"{int(v):,}")
    for c in ("patches_mean", "slide_patches_mean"):
        out[c] = out[c].map(lambda v: f"{v:,.0f}")
    out["censored_pct"] = out["censored_pct"].map(lambda v: f"{v:.1f}%")
    out["median_followup_days"] = out["median_followup_days"].map(lambda v: f"{v:,.0f}")
    return out.to_string(index=False)
