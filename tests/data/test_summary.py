from __future__ import annotations

import numpy as np
import pytest

from steph.data.cohort import Cohort
from steph.data.summary import SUMMARY_COLUMNS, format_summary, summarize_cohort, summarize_cohorts

from .conftest import default_patients


def test_summary_against_independent_computation(make_cohort):
    specs = default_patients(n=17, seed=4, slides_max=3)
    w = make_cohort("BRCA", specs, dim=12)
    s = summarize_cohort(Cohort.load(w.root))
    per_patient = np.array([sum(p.patches) for p in specs])
    per_slide = np.array([n for p in specs for n in p.patches])
    events = np.array([p.event for p in specs])
    assert s == {
        "cohort": "BRCA",
        "patients": 17,
        "slides": len(per_slide),
        "patches_mean": pytest.approx(per_patient.mean()),
        "patches_max": int(per_patient.max()),
        "censored_pct": pytest.approx(100 * (1 - events.mean())),
        "events": int(events.sum()),
        "median_followup_days": pytest.approx(np.median([p.time for p in specs])),
        "feature_dim": 12,
        "slide_patches_mean": pytest.approx(per_slide.mean()),
        "slide_patches_max": int(per_slide.max()),
    }
    assert s["slides"] > s["patients"]  # multi-slide patients present


def test_summarize_cohorts_table(make_cohort):
    a = Cohort.load(make_cohort("A", default_patients(n=6, seed=1)).root)
    b = Cohort.load(make_cohort("B", default_patients(n=9, seed=2)).root)
    df = summarize_cohorts([b, a])
    assert list(df.columns) == SUMMARY_COLUMNS
    assert df["cohort"].tolist() == ["B", "A"] and df["patients"].tolist() == [9, 6]
    text = format_summary(df)
    assert "censored_pct" in text and "%" in text
