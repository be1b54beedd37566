"""Patient-level cross-validation folds: creation (stratified by event and time), files, checks.

Native files (what :func:`write_splits` writes): ``DIR/fold_{k}.csv`` with columns
``patient_id,split`` and ``split`` in {train, test}.

:func:`read_splits` also reads the common external formats:

- MCAT / PORPOISE / SurvPath ``splits_{k}.csv``: columns ``train``, ``val`` and sometimes
  ``test`` of case ids (unequal lengths, so blank cells). ``val`` is the held-out set those
  code bases test on, unless a non-empty ``test`` column exists (then ``val`` is ignored).
- per-fold label tables ``<prefix>fold{k}_train.csv`` / ``<prefix>fold{k}_test.csv`` (as in the
  PANTHER / TCGA-CDR tables): patient column ``patient_id`` or ``case_id``, one row per slide
  (de-duplicated). A folder with several prefixes (cohorts) needs ``prefix=``.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from steph.errors import DataError
from steph.utils.io import read_json, read_user_table, write_csv, write_json

logger = logging.getLogger("steph.data.splits")

DEFAULT_K = 5
DEFAULT_TIME_STRATA = 4
META_FILE = "splits_meta.json"
_NATIVE_RE = re.compile(r"^fold_(\d+)\.csv$", re.IGNORECASE)
_MCAT_RE = re.compile(r"^splits_(\d+)\.csv$", re.IGNORECASE)
_PERFOLD_RE = re.compile(r"^(.*?)fold_?(\d+)_(train|test)\.csv$", re.IGNORECASE)
_MISSING = frozenset({"", "na", "nan", "n/a", "null", "none"})
_MAX_LISTED = 5


@dataclass(frozen=True)
class Split:
    """One fold: disjoint patient-id tuples (sorted)."""

    fold: int
    train_ids: tuple[str, ...]
    test_ids: tuple[str, ...]

    def __repr__(self) -> str:
        return f"Split(fold={self.fold}, train={len(self.train_ids)}, test={len(self.test_ids)})"


def _listing(ids: Sequence[str]) -> str:
    ids = list(ids)
    shown = ", ".join(map(repr, ids[:_MAX_LISTED]))
    return shown + (f" ... ({len(ids) - _MAX_LISTED} more)" if len(ids) > _MAX_LISTED else "")


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------


def check_split(split: Split, source: str | os.PathLike | None = None) -> None:
    """A fold must have train and test patients and no patient in both."""
    where = f" ({source})" if source is not None else ""
    check_split_overlap(split, source)
    if not split.test_ids:
        raise DataError(f"fold {split.fold}{where}: no test patient")
    if not split.train_ids:
        raise DataError(f"fold {split.fold}{where}: no train patient")


def check_splits(splits: Sequence[Split], patient_ids: Iterable[str] | None = None, *,
                 partition: bool = False, source: str | os.PathLike | None = None) -> None:
    """Check every fold; with ``partition=True`` also that each patient of `patient_ids` is in
    exactly one test fold and every fold covers exactly `patient_ids` (what
    :func:`create_splits` guarantees)."""
    if not splits:
        raise DataError(f"no fold{f' in {source}' if source else ''}")
    folds = [s.fold for s in splits]
    if len(set(folds)) != len(folds):
        raise DataError(f"repeated fold numbers {sorted(folds)}"
                        + (f" in {source}" if source else ""))
    for s in splits:
        check_split(s, source)
    if not partition:
        return
    where = f" ({source})" if source is not None else ""
    counts = Counter(p for s in splits for p in s.test_ids)
    twice = sorted(p for p, c in counts.items() if c > 1)
    if twice:
        raise DataError(f"splits{where}: {len(twice)} patient(s) in more than one test fold: "
                        f"{_listing(twice)}")
    if patient_ids is not None:
        expected = set(patient_ids)
        never = sorted(expected - set(counts))
        if never:
            raise DataError(f"splits{where}: {len(never)} patient(s) in no test fold: "
                            f"{_listing(never)}")
        for s in splits:
            covered = set(s.train_ids) | set(s.test_ids)
            if covered != expected:
                extra, lacking = sorted(covered - expected), sorted(expected - covered)
                raise DataError(f"fold {s.fold}{where}: train + test differ from the cohort "
                                f"(unknown: {_listing(extra)}; missing: {_listing(lacking)})")


# --------------------------------------------------------------------------------------------
# creation
# --------------------------------------------------------------------------------------------


def _patient_frame(patients: Any) -> pd.DataFrame:
    df = getattr(patients, "patients", patients)  # a Cohort or a frame
    if not isinstance(df, pd.DataFrame):
        raise TypeError("create_splits expects a Cohort or a DataFrame with patient_id, time, "
                        "event")
    missing = [c for c in ("patient_id", "time", "event") if c not in df.columns]
    if missing:
        raise DataError(f"create_splits: the patient frame lacks column(s) {missing}")
    df = df[["patient_id", "time", "event"]].drop_duplicates("patient_id")
    return df.assign(patient_id=df["patient_id"].astype(str)).sort_values(
        "patient_id", kind="stable").reset_index(drop=True)


def stratify_labels(times: np.ndarray, events: np.ndarray, k: int,
                    n_time_strata: int = DEFAULT_TIME_STRATA) -> np.ndarray:
    """Stratum label (str) per patient: event x time-quantile within the event group.

    Each event group gets ``min(n_time_strata, n_group // k)`` (at least one) time strata,
    so a stratum has at least k members whenever its event group does."""
    times = np.asarray(times, dtype=float)
    events = np.asarray(events).astype(int)
    labels = np.empty(len(times), dtype=object)
    for e in (0, 1):
        idx = np.flatnonzero(events == e)
        n_e = len(idx)
        if n_e == 0:
            continue
        q = max(1, min(n_time_strata, n_e // k))
        if q < n_time_strata:
            logger.info("stratification: %d patient(s) with event=%d -> %d time stratum/strata "
                        "(k=%d)", n_e, e, q, k)
        order = idx[np.argsort(times[idx], kind="stable")]
        ranks = np.empty(n_e, dtype=int)
        ranks[np.searchsorted(idx, order)] = np.arange(n_e)
        bins = (ranks * q) // n_e
        labels[idx] = [f"event{e}_t{b}" for b in bins]
    return labels


def create_splits(patients: Any, k: int = DEFAULT_K, seed: int = 0,
                  n_time_strata: int = DEFAULT_TIME_STRATA) -> list[Split]:
    """Patient-level k-fold, stratified by event and time quantile, deterministic for `seed`
    (independent of the row order of `patients`: ids are sorted first).

    `patients`: a :class:`~steph.data.cohort.Cohort` or a frame with ``patient_id, time,
    event`` (a slide-level frame works too: patients are de-duplicated)."""
    if k < 2:
        raise DataError(f"k must be at least 2, got {k}")
    df = _patient_frame(patients)
    n = len(df)
    if n < k:
        raise DataError(f"cannot make {k} folds from {n} patient(s)")
    strata = stratify_labels(df["time"].to_numpy(), df["event"].to_numpy(), k, n_time_strata)
    counts = Counter(strata)
    small = {s: c for s, c in counts.items() if c < k}
    if len(small) == len(counts):
        logger.warning("stratification impossible (every stratum has fewer than k=%d patients:"
                       " %s); using plain shuffled k-fold", k, dict(counts))
        strata = np.zeros(n, dtype=object)
    elif small:
        logger.info("strata smaller than k=%d (spread over folds as far as they go): %s", k,
                    small)
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    ids = df["patient_id"].to_numpy()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class",
                                category=UserWarning)
        folds = list(skf.split(np.zeros(n), strata.astype(str)))
    splits = [Split(i, tuple(sorted(ids[tr])), tuple(sorted(ids[te])))
              for i, (tr, te) in enumerate(folds)]
    check_splits(splits, ids, partition=True)
    return splits


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def _split_frame(s: Split) -> pd.DataFrame:
    return pd.DataFrame({
        "patient_id": list(s.train_ids) + list(s.test_ids),
        "split": ["train"] * len(s.train_ids) + ["test"] * len(s.test_ids),
    })


def write_splits(splits: Sequence[Split], out_dir: str | os.PathLike) -> list[Path]:
    """Write ``out_dir/fold_{k}.csv`` (``patient_id,split``) for each split, atomically."""
    out_dir = Path(out_dir)
    check_splits(splits, source=out_dir)
    paths = []
    for s in splits:
        path = out_dir / f"fold_{s.fold}.csv"
        write_csv(path, _split_frame(s))
        paths.append(path)
    return paths


def _interrupted_write(out_dir: Path, splits: Sequence[Split]) -> bool:
    """Whether ``out_dir`` holds part of what :func:`write_splits` writes for ``splits``, and
    nothing else: the fold files of a process that stopped before the last one (or before
    ``splits_meta.json``, written last), each with the content it would write again."""
    expected = {f"fold_{s.fold}.csv": _split_frame(s).to_csv(index=False).encode()
                for s in splits}
    found = [p for p in out_dir.iterdir() if p.is_file() and _is_split_file(p.name)]
    return all(p.name in expected and p.read_bytes() == expected[p.name] for p in found)


def _read_str_table(path: Path) -> pd.DataFrame:
    return read_user_table(path, "split file")


def _col(df: pd.DataFrame, path: Path, *names: str, required: bool = True) -> str | None:
    low = {c.lower(): c for c in df.columns}
    for n in names:
        if n in low:
            return low[n]
    if required:
        raise DataError(f"{path}: no column {' or '.join(map(repr, names))} (columns: "
                        f"{list(df.columns)})")
    return None


def _ids(values: Iterable[Any]) -> list[str]:
    """Non-blank stripped ids, de-duplicated, order kept."""
    out = (str(v).strip() for v in values)
    return list(dict.fromkeys(v for v in out if v.lower() not in _MISSING))


def _read_native(path: Path, fold: int) -> tuple[list[str], list[str]]:
    df = _read_str_table(path)
    pcol = _col(df, path, "patient_id")
    scol = _col(df, path, "split")
    kind = df[scol].str.strip().str.lower()
    bad = np.flatnonzero(~kind.isin(["train", "test"]).to_numpy())
    if len(bad):
        items = [f"line {i + 2}: {df[scol].iat[i]!r}" for i in bad[:_MAX_LISTED]]
        raise DataError(f"{path}: column {scol!r} must be 'train' or 'test'; got "
                        + "; ".join(items))
    blank = np.flatnonzero(df[pcol].str.strip().str.lower().isin(_MISSING).to_numpy())
    if len(blank):
        raise DataError(f"{path}: blank {pcol!r} on line(s) "
                        + ", ".join(str(i + 2) for i in blank[:_MAX_LISTED]))
    return _ids(df.loc[kind == "train", pcol]), _ids(df.loc[kind == "test", pcol])


def _read_mcat(path: Path, fold: int) -> tuple[list[str], list[str]]:
    df = _read_str_table(path)
    train = _ids(df[_col(df, path, "train")])
    val = _ids(df[_col(df, path, "val")])
    tcol = _col(df, path, "test", required=False)
    test = _ids(df[tcol]) if tcol is not None else []
    if test:
        if val:
            logger.info("%s: held-out set = 'test' column (%d); 'val' (%d) not used", path,
                        len(test), len(val))
        return train, test
    return train, val


def _read_perfold(train_path: Path, test_path: Path) -> tuple[list[str], list[str]]:
    out = []
    for path in (train_path, test_path):
        df = _read_str_table(path)
        out.append(_ids(df[_col(df, path, "patient_id", "case_id")]))
    return out[0], out[1]


def find_split_files(split_dir: str | os.PathLike, prefix: str | None = None
                     ) -> tuple[str, dict[int, Any]]:
    """``(format, {fold: file or (train_file, test_file)})`` of the split files in a folder;
    format is ``native``, ``mcat`` or ``perfold``."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DataError(f"split folder not found: {split_dir}")
    native: dict[int, Path] = {}
    mcat: dict[int, Path] = {}
    perfold: dict[str, dict[int, dict[str, Path]]] = {}
    def add(table: dict, key: Any, p: Path, fold: int) -> None:
        if key in table:  # fold_1.csv and fold_01.csv
            raise DataError(f"{split_dir}: {table[key].name} and {p.name} both hold fold "
                            f"{fold}; keep one")
        table[key] = p

    for p in sorted(split_dir.iterdir()):
        if not p.is_file():
            continue
        if m := _NATIVE_RE.match(p.name):
            add(native, int(m.group(1)), p, int(m.group(1)))
        elif m := _MCAT_RE.match(p.name):
            add(mcat, int(m.group(1)), p, int(m.group(1)))
        elif m := _PERFOLD_RE.match(p.name):
            pre, k, part = m.group(1), int(m.group(2)), m.group(3).lower()
            add(perfold.setdefault(pre, {}).setdefault(k, {}), part, p, k)
    if prefix is not None:
        perfold = {prefix: perfold[prefix]} if prefix in perfold else {}
        if not perfold:
            raise DataError(f"{split_dir}: no <prefix>fold<k>_train/test.csv files with prefix "
                            f"{prefix!r}")
    found = [name for name, d in (("native", native), ("mcat", mcat), ("perfold", perfold))
             if d]
    if not found:
        listing = ", ".join(p.name for p in sorted(split_dir.iterdir())[:10]) or "(empty)"
        raise DataError(
            f"{split_dir}: no split files found (contents: {listing}). Known formats: "
            "fold_{k}.csv (patient_id, split), splits_{k}.csv (MCAT: train, val[, test]), "
            "<prefix>fold{k}_train.csv / <prefix>fold{k}_test.csv (patient_id or case_id)")
    if len(found) > 1:
        raise DataError(f"{split_dir}: split files in several formats ({', '.join(found)}); "
                        "keep one")
    if found[0] == "native":
        return "native", native
    if found[0] == "mcat":
        return "mcat", mcat
    if len(perfold) > 1:
        raise DataError(f"{split_dir}: per-fold tables with several prefixes "
                        f"{sorted(perfold)}; pass prefix= to choose one")
    (pre, folds), = perfold.items()
    out: dict[int, Any] = {}
    for k, parts in sorted(folds.items()):
        if set(parts) != {"train", "test"}:
            have = next(iter(parts.values()))
            lacking = ({"train", "test"} - set(parts)).pop()
            raise DataError(f"{split_dir}: fold {k} has {have.name} but no {lacking} file "
                            f"({pre}fold{k}_{lacking}.csv)")
        out[k] = (parts["train"], parts["test"])
    return "perfold", out


def read_splits(split_dir: str | os.PathLike, patient_ids: Iterable[str] | None = None, *,
                prefix: str | None = None) -> list[Split]:
    """Read the folds of a folder (native, MCAT or per-fold tables), sorted by fold number.

    With `patient_ids` (the cohort's), ids not in the cohort are dropped with a count in the
    log; a fold left with no test (or train) patient is an error. A patient in both train and
    test of a fold is always an error."""
    split_dir = Path(split_dir)
    fmt, files = find_split_files(split_dir, prefix)
    known = set(map(str, patient_ids)) if patient_ids is not None else None
    splits: list[Split] = []
    dropped: dict[int, list[str]] = {}
    for k, f in sorted(files.items()):
        if fmt == "native":
            train, test = _read_native(f, k)
            source = f
        elif fmt == "mcat":
            train, test = _read_mcat(f, k)
            source = f
        else:
            train, test = _read_perfold(*f)
            source = f"{f[0]} / {f[1].name}"
        raw = Split(k, tuple(sorted(train)), tuple(sorted(test)))
        check_split_overlap(raw, source)
        if known is not None:
            gone = [p for p in train + test if p not in known]
            if gone:
                dropped[k] = gone
            train = [p for p in train if p in known]
            test = [p for p in test if p in known]
        split = Split(k, tuple(sorted(train)), tuple(sorted(test)))
        if not split.test_ids or not split.train_ids:
            part = "test" if not split.test_ids else "train"
            extra = (f" after dropping {len(dropped.get(k, []))} id(s) not in the cohort"
                     if dropped.get(k) else "")
            raise DataError(f"fold {k} ({source}): no {part} patient{extra}")
        check_split(split, source)
        if known is not None:
            unused = len(known) - len(split.train_ids) - len(split.test_ids)
            if unused:
                logger.info("fold %d (%s): %d cohort patient(s) in neither train nor test", k,
                            source, unused)
        splits.append(split)
    if dropped:
        first = list(dict.fromkeys(p for ids in dropped.values() for p in ids))[:_MAX_LISTED]
        logger.warning("%s: dropped %d id(s) not in the cohort (%s); first: %s", split_dir,
                       sum(map(len, dropped.values())),
                       ", ".join(f"fold {k}: {len(v)}" for k, v in dropped.items()),
                       ", ".join(first))
    logger.info("%s: %d fold(s) read (%s format)", split_dir, len(splits), fmt)
    return splits


def check_split_overlap(split: Split, source: Any = None) -> None:
    """Only the train/test overlap part of :func:`check_split`."""
    both = sorted(set(split.train_ids) & set(split.test_ids))
    if both:
        where = f" ({source})" if source is not None else ""
        raise DataError(f"fold {split.fold}{where}: {len(both)} patient(s) in both train and "
                        f"test: {_listing(both)}")


def _is_split_file(name: str) -> bool:
    """Whether a file of this name is a split file steph can read."""
    return bool(_NATIVE_RE.match(name) or _MCAT_RE.match(name) or _PERFOLD_RE.match(name))


def has_split_files(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds split files steph can read (a cohort's own ``splits/``)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    return any(_is_split_file(p.name) for p in folder.iterdir() if p.is_file())


def load_or_create_splits(cohort: Any, out_dir: str | os.PathLike, k: int = DEFAULT_K,
                          seed: int = 0) -> list[Split]:
    """The cohort's folds.

    1. The cohort's own ``splits/`` folder when it holds split files (read against the
       cohort's patients; its fold count wins over `k`, with a warning if they differ).
    2. Else ``out_dir/fold_*.csv`` written by an earlier call (re-read; they must have been
       made for the same `k` and `seed` and cover the cohort's patients exactly). Fold files
       without ``splits_meta.json`` (written last) that hold what this call would write are
       those of a process that stopped while writing them: they are written again.
    3. Else create them (:func:`create_splits`), write them to `out_dir` with a small
       ``splits_meta.json``, and return what was written, re-read."""
    ids = list(cohort.patient_ids)
    own = cohort.splits_dir
    if has_split_files(own):
        splits = read_splits(own, ids)
        if len(splits) != k:
            logger.warning("cohort %s: using its own %d fold(s) from %s (k=%d ignored)",
                           cohort.name, len(splits), own, k)
        else:
            logger.info("cohort %s: using its own splits from %s", cohort.name, own)
        return splits
    elif own.is_dir():
        logger.info("cohort %s: %s holds no split file; creating folds", cohort.name, own)

    out_dir = Path(out_dir)
    meta_path = out_dir / META_FILE
    splits = None
    if has_split_files(out_dir):
        if not meta_path.is_file():
            fresh = create_splits(cohort, k=k, seed=seed)
            if _interrupted_write(out_dir, fresh):
                logger.warning("cohort %s: %s holds the folds of a write that stopped before "
                               "it finished; writing them again", cohort.name, out_dir)
                splits = fresh
        if splits is None:
            return _reuse_splits(cohort, out_dir, ids, k, seed)
    splits = splits or create_splits(cohort, k=k, seed=seed)
    write_splits(splits, out_dir)
    write_json(meta_path, {"cohort": cohort.name, "k": k, "seed": seed,
                           "n_patients": len(ids), "stratified_by": "event x time quantile"})
    logger.info("cohort %s: created %d stratified fold(s) (seed %d) in %s", cohort.name, k,
                seed, out_dir)
    return read_splits(out_dir, ids)


def _reuse_splits(cohort: Any, out_dir: Path, ids: list[str], k: int, seed: int
                  ) -> list[Split]:
    """The folds an earlier call wrote to ``out_dir``, checked against the request."""
    meta_path = out_dir / META_FILE
    meta = read_json(meta_path) if meta_path.is_file() else {}
    if meta and (meta.get("k") != k or meta.get("seed") != seed):
        raise DataError(f"{out_dir}: holds splits made with k={meta.get('k')}, "
                        f"seed={meta.get('seed')}; asked for k={k}, seed={seed}. Delete "
                        "the folder or choose another one")
    splits = read_splits(out_dir, ids)
    if len(splits) != k:
        raise DataError(f"{out_dir}: holds {len(splits)} fold(s), asked for k={k}; delete "
                        "the folder or choose another one")
    try:
        check_splits(splits, ids, partition=True, source=out_dir)
    except DataError as e:
        raise DataError(f"{e}. The splits in {out_dir} do not match cohort "
                        f"{cohort.name!r} any more; delete them to recreate") from e
    logger.info("cohort %s: re-using the %d fold(s) in %s", cohort.name, k, out_dir)
    return splits
