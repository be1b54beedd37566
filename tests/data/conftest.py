"""Tiny cohorts generated on the fly in the layout users bring:

    <root>/<name>/labels.csv            one row per slide
    <root>/<name>/features/<slide>.h5   (or .pt, or CLAM's h5_files/ / pt_files/)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from steph.data.features import write_features_h5

REPO_ROOT = Path(__file__).resolve().parents[2]
TCGA_FIXTURES = REPO_ROOT / "tests" / "fixtures" / "tcga_cdr"


@dataclass
class PatientSpec:
    patient_id: str
    time: float
    event: int
    patches: Sequence[int]  # patches per slide, in label-table order


@dataclass
class WrittenCohort:
    root: Path  # the cohort folder
    patients: list[PatientSpec]
    features: dict[str, np.ndarray] = field(default_factory=dict)  # slide id -> float32 array
    slide_ids: dict[str, list[str]] = field(default_factory=dict)  # patient -> slides in order


def default_patients(n: int = 12, seed: int = 0, slides_max: int = 2) -> list[PatientSpec]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        n_slides = int(rng.integers(1, slides_max + 1))
        out.append(PatientSpec(
            patient_id=f"P{i:03d}",
            time=float(rng.integers(10, 4000)),
            event=int(rng.random() < 0.4),
            patches=[int(rng.integers(3, 12)) for _ in range(n_slides)],
        ))
    return out


def write_cohort(root: Path, name: str = "COH", patients: Sequence[PatientSpec] | None = None,
                 *, dim: int = 8, fmt: str = "h5", layout: str = "contiguous",
                 dtype=np.float16, subdirs: bool = False, slide_suffix: str = "",
                 seed: int = 0, write_labels: bool = True) -> WrittenCohort:
    """Write a cohort in the native label convention. Slide ids are
    ``<patient>-S<j>`` (j in reverse alphabetical order for the second slide onwards, so that
    label-table order differs from sorted order). ``slide_suffix`` (e.g. ``.svs``) is added to
    the ids in labels.csv only."""
    patients = list(patients if patients is not None else default_patients(seed=seed))
    cdir = Path(root) / name
    fdir = cdir / "features"
    fdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 1)
    out = WrittenCohort(cdir, patients)
    rows = []
    for p in patients:
        sids = [f"{p.patient_id}-S{chr(ord('Z') - j)}" for j in range(len(p.patches))]
        out.slide_ids[p.patient_id] = sids
        for sid, n in zip(sids, p.patches):
            x = rng.standard_normal((n, dim)).astype(dtype)
            out.features[sid] = x.astype(np.float32)
            if fmt == "h5":
                folder = fdir / "h5_files" if subdirs else fdir
                write_features_h5(folder / f"{sid}.h5", x, layout=layout)
            else:
                folder = fdir / "pt_files" if subdirs else fdir
                folder.mkdir(parents=True, exist_ok=True)
                torch.save(torch.from_numpy(x), folder / f"{sid}.pt")
            rows.append((p.patient_id, sid + slide_suffix, p.time, p.event))
    if write_labels:
        pd.DataFrame(rows, columns=["patient_id", "slide_id", "time", "event"]).to_csv(
            cdir / "labels.csv", index=False)
    return out


@pytest.fixture
def make_cohort(tmp_path):
    """Factory: ``make_cohort(name="COH", patients=None, **kw) -> WrittenCohort``."""

    def make(name: str = "COH", patients=None, **kw) -> WrittenCohort:
        return write_cohort(tmp_path / "DATA", name, patients, **kw)

    return make


@pytest.fixture
def write_csv(tmp_path):
    """Factory: write a small CSV from text lines and return its path."""

    def make(text: str, name: str = "labels.csv") -> Path:
        path = tmp_path / name
        path.write_text("\n".join(line.strip() for line in text.strip().splitlines()) + "\n")
        return path

    return make
