"""A cohort on disk: its label table joined to the feature files of its slides.

Layout::

    DATA/<cohort>/labels.csv              one row per slide (any convention of labels.py)
    DATA/<cohort>/features/<slide>.h5     (or .pt; CLAM's h5_files/ and pt_files/ too)
    DATA/<cohort>/splits/                 optional fold files (see splits.py)

Loading checks every slide's file from its metadata only (``check="shape"``: the file exists,
N > 0, rank 2, the same feature dimension for the whole cohort) or also reads the values
(``check="full"``: no NaN/inf). Bags are read lazily by :meth:`Cohort.load_bag`: from the
cohort's packed store (``DATA/<cohort>/.steph-pack``, see :mod:`steph.data.pack`) when one is
there and fresh, else from the slides' feature files; both give bit-identical bags.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from steph.config import DataConfig
from steph.data.features import (
    FeatureIndex,
    read_coords,
    read_feature_shape,
    read_features,
    read_features_stored,
)
from steph.data.labels import read_labels
from steph.data.pack import PackedStore, PackSource, SlideRecord, attach_pack
from steph.errors import DataError

logger = logging.getLogger("steph.data.cohort")

DEFAULT_LABELS = "labels.csv"
FEATURES_DIRNAME = "features"
SPLITS_DIRNAME = "splits"
ON_BAD_SLIDE = ("raise", "skip")
CHECKS = ("shape", "full")
_MAX_LISTED = 20

SKIPPED_COLUMNS = ["patient_id", "slide_id", "path", "reason"]


def discover_cohorts(data_root: str | os.PathLike, labels: str = DEFAULT_LABELS) -> list[str]:
    """Sorted names of the folders of `data_root` that hold a `labels` file."""
    root = Path(data_root)
    if not root.is_dir():
        raise DataError(f"data root not found or not a folder: {root}")
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / labels).is_file())


def require_data_root(data_root: str | os.PathLike, labels: str = DEFAULT_LABELS) -> list[str]:
    """The cohorts of ``data_root``; a DataError naming it when it is missing or holds none
    (e.g. ``--data`` given the runs folder)."""
    names = discover_cohorts(data_root, labels)  # DataError for a missing folder
    if not names:
        raise DataError(f"no cohort under data root {data_root} (expected <cohort>/{labels}); "
                        "give the folder that holds the cohorts")
    return names


@dataclass
class Cohort:
    """Patients of one cohort with their labels and feature files.

    ``patients``: one row per patient (sorted by id), columns ``patient_id, time, event,
    slides`` (tuple of slide ids, in label-table order = concatenation order) and
    ``n_patches`` (total over the slides). ``slides``: one row per slide with its file path,
    patch count and stored dtype. ``skipped``: slides left out with ``on_bad_slide="skip"``
    and why (empty otherwise). ``pack``: the fresh packed store bags are read from, or None
    (set it to None to read the source files)."""

    name: str
    root: Path
    features_dir: Path
    patients: pd.DataFrame
    slides: pd.DataFrame
    feature_dim: int
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SKIPPED_COLUMNS))
    labels_path: Path | None = None
    label_info: dict[str, Any] = field(default_factory=dict)
    pack: PackedStore | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._row = {p: i for i, p in enumerate(self.patients["patient_id"])}
        self._paths: dict[str, list[Path]] = {}
        for pid, path in zip(self.slides["patient_id"], self.slides["path"]):
            self._paths.setdefault(pid, []).append(Path(path))

    # ---------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cohort_dir: str | os.PathLike, data: DataConfig, **overrides: Any
                    ) -> Cohort:
        """:meth:`load` with the ``data`` section of an experiment's settings (labels file,
        convention, endpoint, time unit, what to do with a bad slide, how far to check);
        ``overrides``: keyword arguments of :meth:`load` that replace them."""
        kwargs: dict[str, Any] = {
            "labels": data.labels, "convention": data.convention, "endpoint": data.endpoint,
            "time_unit": data.time_unit, "on_bad_slide": data.on_bad_slide, "check": data.check}
        return cls.load(cohort_dir, **{**kwargs, **overrides})

    @classmethod
    def load(cls, cohort_dir: str | os.PathLike, *, labels: str | os.PathLike = DEFAULT_LABELS,
             convention: str | None = None, endpoint: str | None = None,
             columns: Mapping[str, str] | None = None, time_unit: str | None = None,
             on_bad_slide: str = "raise", check: str = "shape", use_pack: bool = True) -> Cohort:
        """Read ``<cohort_dir>/<labels>`` and check every slide's feature file.

        `labels` is relative to `cohort_dir` unless absolute. `convention`, `endpoint`,
        `columns`, `time_unit` go to :func:`steph.data.labels.read_labels`.
        ``on_bad_slide="raise"`` (default) raises one :class:`DataError` listing the problems
        found (capped); ``"skip"`` leaves bad slides out (listed in ``skipped`` and the log)
        and drops patients left without a slide. ``use_pack``: read bags from the cohort's
        packed store when it is fresh (checked with one ``stat`` per slide; a stale pack is
        ignored with a warning)."""
        if on_bad_slide not in ON_BAD_SLIDE:
            raise DataError(f"on_bad_slide must be one of {ON_BAD_SLIDE}, got {on_bad_slide!r}")
        if check not in CHECKS:
            raise DataError(f"check must be one of {CHECKS}, got {check!r}")
        root = Path(cohort_dir)
        if not root.is_dir():
            raise DataError(f"cohort folder not found: {root}")
        labels_path = Path(labels) if Path(labels).is_absolute() else root / labels
        if not labels_path.is_file():
            raise DataError(f"cohort {root.name!r}: no label file {labels_path}")
        features_dir = root / FEATURES_DIRNAME
        if not features_dir.is_dir():
            raise DataError(f"cohort {root.name!r}: no features folder {features_dir}")

        table = read_labels(labels_path, convention=convention, endpoint=endpoint,
                            columns=columns, time_unit=time_unit)
        index = FeatureIndex(features_dir)
        if len(index) == 0:  # one line, not one per slide
            raise DataError(f"cohort {root.name!r}: no feature file (.h5 / .pt) in "
                            f"{features_dir} (nor in its h5_files/, pt_files/ subfolders); "
                            f"{labels_path.name} names {len(table)} slide(s)")

        records: list[dict[str, Any]] = []
        problems: list[dict[str, Any]] = []
        for pid, sid in zip(table["patient_id"], table["slide_id"]):
            path = index.find(sid)
            if path is None:
                problems.append({"patient_id": pid, "slide_id": sid, "path": None,
                                 "reason": index.missing_message(sid)})
                continue
            try:
                n, d, dtype = read_feature_shape(path, slide_id=sid)
                if check == "full":
                    read_features(path, slide_id=sid)  # values: NaN / inf
            except DataError as e:
                problems.append({"patient_id": pid, "slide_id": sid, "path": str(path),
                                 "reason": str(e)})
                continue
            records.append({"slide_id": sid, "patient_id": pid, "path": str(path),
                            "n_patches": n, "dim": d, "dtype": str(dtype)})

        feature_dim = _majority_dim(records)
        if feature_dim is not None:
            keep = []
            for r in records:
                if r["dim"] != feature_dim:
                    problems.append({
                        "patient_id": r["patient_id"], "slide_id": r["slide_id"],
                        "path": r["path"],
                        "reason": (f"slide {r['slide_id']!r} ({r['path']}): feature dimension "
                                   f"{r['dim']} differs from the rest of the cohort "
                                   f"({feature_dim})")})
                else:
                    keep.append(r)
            records = keep

        name = root.name
        if not records and problems and all(p["path"] is None for p in problems):
            found = index.stems()
            raise DataError(
                f"cohort {name!r}: none of the {len(table)} slide(s) of {labels_path.name} has a "
                f"feature file in {features_dir} (looked for e.g. "
                f"{', '.join(repr(p['slide_id']) for p in problems[:3])}; the folder holds "
                f"{len(found)} file(s) such as {', '.join(repr(f) for f in found[:3])}): do "
                "the slide ids match the file names?")
        if problems and on_bad_slide == "raise":
            lines = [p["reason"] for p in problems[:_MAX_LISTED]]
            more = len(problems) - len(lines)
            raise DataError(
                f"cohort {name!r}: {len(problems)} of {len(table)} slide(s) have a problem "
                "(to leave them out: --set data.on_bad_slide=skip with steph cv / train, "
                "--skip-bad-slides with steph data pack):\n  - " + "\n  - ".join(lines)
                + (f"\n  ... and {more} more" if more else ""))
        skipped = pd.DataFrame(problems, columns=SKIPPED_COLUMNS)
        if problems:
            logger.warning("cohort %s: skipped %d slide(s) with a problem; first: %s", name,
                           len(problems), "; ".join(skipped["reason"].head(3)))

        if not records:
            raise DataError(f"cohort {name!r}: no usable slide (of {len(table)} in "
                            f"{labels_path})")
        slides = pd.DataFrame(records)
        labelled = table.drop_duplicates("patient_id").set_index("patient_id")
        all_patients = set(table["patient_id"])
        by_patient = slides.groupby("patient_id", sort=True)
        patients = pd.DataFrame({
            "patient_id": list(by_patient.groups),
        })
        patients["time"] = labelled.loc[patients["patient_id"], "time"].to_numpy(dtype=float)
        patients["event"] = labelled.loc[patients["patient_id"], "event"].to_numpy(
            dtype=np.int64)
        slide_lists = by_patient["slide_id"].agg(tuple)
        patients["slides"] = [slide_lists[p] for p in patients["patient_id"]]
        patients["n_patches"] = by_patient["n_patches"].sum().loc[
            patients["patient_id"]].to_numpy(dtype=np.int64)
        lost = sorted(all_patients - set(patients["patient_id"]))
        if lost:
            logger.warning("cohort %s: dropped %d patient(s) left with no usable slide: %s%s",
                           name, len(lost), ", ".join(lost[:5]), " ..." if len(lost) > 5 else "")
        logger.info("cohort %s: %d patient(s), %d slide(s), feature dim %d", name,
                    len(patients), len(slides), feature_dim)
        slides = slides[["slide_id", "patient_id", "path", "n_patches", "dtype"]]
        cohort = cls(name=name, root=root, features_dir=features_dir,
                     patients=patients.reset_index(drop=True),
                     slides=slides.reset_index(drop=True), feature_dim=int(feature_dim),
                     skipped=skipped, labels_path=labels_path,
                     label_info=dict(table.attrs, lost_patients=lost))
        if use_pack:
            cohort.pack = attach_pack(cohort.pack_source())
        return cohort

    # ---------------------------------------------------------------------------------------
    @property
    def patient_ids(self) -> list[str]:
        return self.patients["patient_id"].tolist()

    def __len__(self) -> int:
        return len(self.patients)

    def __contains__(self, patient_id: object) -> bool:
        return patient_id in self._row

    def __repr__(self) -> str:
        return (f"Cohort({self.name!r}, patients={len(self.patients)}, "
                f"slides={len(self.slides)}, feature_dim={self.feature_dim})")

    def _check_patient(self, patient_id: str) -> int:
        try:
            return self._row[patient_id]
        except KeyError:
            raise DataError(f"cohort {self.name!r}: unknown patient {patient_id!r}") from None

    def patient(self, patient_id: str) -> pd.Series:
        """The patient's row of ``patients``."""
        return self.patients.iloc[self._check_patient(patient_id)]

    def slide_paths(self, patient_id: str) -> list[Path]:
        """Feature files of the patient's slides, in concatenation order."""
        self._check_patient(patient_id)
        return list(self._paths[patient_id])

    def pack_source(self) -> PackSource:
        """The cohort's slides in concatenation order (patients sorted by id, each patient's
        slides in label-table order), as the packed store takes them."""
        info = {(pid, sid): (int(n), str(dt)) for pid, sid, n, dt in zip(
            self.slides["patient_id"], self.slides["slide_id"], self.slides["n_patches"],
            self.slides["dtype"])}
        records = []
        for pid, sids in zip(self.patients["patient_id"], self.patients["slides"]):
            for sid, path in zip(sids, self.slide_paths(pid)):
                n, dtype = info[(pid, sid)]
                records.append(SlideRecord(sid, pid, path, n, dtype))
        return PackSource(self.name, self.root, self.feature_dim, tuple(records))

    @property
    def splits_dir(self) -> Path:
        return self.root / SPLITS_DIRNAME

    def load_bag_array(self, patient_id: str, stored: bool = False) -> np.ndarray:
        """All slides of the patient concatenated, a ``(N, D)`` numpy array: float32, or with
        ``stored=True`` in the dtype the features are stored in (float16 for TRIDENT / CLAM
        features: half the bytes; float64 comes back as float32). Converting a stored bag
        to float32 gives exactly the float32 bag."""
        row = self._check_patient(patient_id)
        if self.pack is not None:
            return self.pack.read_bag(patient_id, dtype=None if stored else np.float32)
        read = read_features_stored if stored else read_features
        slide_ids = self.patients.at[row, "slides"]
        parts = []
        for sid, path in zip(slide_ids, self._paths[patient_id]):
            try:
                arr = read(path, slide_id=sid)
            except DataError as e:
                raise DataError(f"cohort {self.name!r}, patient {patient_id!r}: {e}") from e
            if arr.shape[1] != self.feature_dim:
                raise DataError(
                    f"cohort {self.name!r}, patient {patient_id!r}: slide {sid!r} ({path}) has "
                    f"feature dimension {arr.shape[1]}, the cohort has {self.feature_dim} "
                    "(the file changed since the cohort was loaded?)")
            parts.append(arr.astype(np.float32) if arr.dtype == np.float64 else arr)
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def load_bag(self, patient_id: str, stored: bool = False) -> torch.Tensor:
        """All slides of the patient concatenated: a float32 tensor ``(N, D)``, or in the
        stored dtype with ``stored=True`` (see :meth:`load_bag_array`)."""
        return torch.from_numpy(self.load_bag_array(patient_id, stored=stored))

    def load_coords(self, patient_id: str) -> list[np.ndarray | None]:
        """Patch coordinates of each of the patient's slides, in concatenation order (one
        ``(n_i, 2)`` array per slide, int64 or float64, None for a slide without coords), so
        row ``k`` of the bag belongs to the slide whose rows include it."""
        self._check_patient(patient_id)
        if self.pack is not None:
            return self.pack.read_coords(patient_id)
        out = []
        for sid, path in zip(self.patient(patient_id)["slides"], self._paths[patient_id]):
            try:
                out.append(read_coords(path, slide_id=sid))
            except DataError as e:
                raise DataError(f"cohort {self.name!r}, patient {patient_id!r}: {e}") from e
        return out


def _majority_dim(records: list[dict[str, Any]]) -> int | None:
    """The feature dimension most slides have (ties: the first seen)."""
    if not records:
        return None
    counts = Counter(r["dim"] for r in records)
    best = max(counts.values())
    for r in records:
        if counts[r["dim"]] == best:
            return int(r["dim"])
    return None  # pragma: no cover
