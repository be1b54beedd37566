"""Shared fixtures for the survival tests: overall-survival labels of the TCGA-CDR tables."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURE_DIR = REPO_ROOT / "tests" / "fixtures" / "tcga_cdr"
# The full tables live outside the repository; absent on most machines (tests then skip).
FULL_DIR = Path(
    os.environ.get(
        "STEPH_TCGA_CDR_LABELS", REPO_ROOT.parent / "shared" / "data" / "tcga-cdr-labels"
    )
)


def read_os_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(time in days, event) per patient of a TCGA-CDR table.

    ``os_censorship`` is 1 for a censored patient, so event = 1 - censorship. Rows with a
    blank label are dropped; the tables have one row per slide, so keep one per case_id."""
    df = pd.read_csv(path, usecols=["case_id", "os_survival_days", "os_censorship"])
    df = df.dropna(subset=["os_survival_days", "os_censorship"]).drop_duplicates("case_id")
    time = df["os_survival_days"].to_numpy(dtype=float)
    event = (1 - df["os_censorship"].to_numpy(dtype=int)).astype(int)
    return time, event


def _cohorts(directory: Path) -> list[str]:
    return sorted(p.name[: -len("_fold0_train.csv")] for p in directory.glob("*_fold0_train.csv"))


FIXTURE_COHORTS = _cohorts(FIXTURE_DIR)
FULL_COHORTS = _cohorts(FULL_DIR) if FULL_DIR.is_dir() else []


def load_split(directory: Path, cohort: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        split: read_os_labels(directory / f"{cohort}_fold0_{split}.csv")
        for split in ("train", "test")
    }


@pytest.fixture(params=FIXTURE_COHORTS)
def fixture_cohort(request) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """train/test (time, event) of one cohort of the small fixture excerpt."""
    return load_split(FIXTURE_DIR, request.param)


@pytest.fixture(params=FULL_COHORTS or [None])
def full_cohort(request) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """train/test (time, event) of one cohort of the full tables; skips where they are absent."""
    if request.param is None:
        pytest.skip(f"full TCGA-CDR label tables not found at {FULL_DIR}")
    return load_split(FULL_DIR, request.param)
