"""Survival label tables in the conventions users bring, read into one slide-level frame.

The result (the contract of ``docs/architecture.md``) has one row per slide and the columns
``patient_id`` (str), ``slide_id`` (str, WSI extension stripped), ``time`` (float, days) and
``event`` (int, 1 = event observed).

Conventions (detected from the column names, case-insensitively; override with
``convention=``):

=============  ================================================================================
``native``     ``patient_id, slide_id, time`` (days) ``, event`` (1 = event)
``mcat``       ``case_id, slide_id, survival_months, censorship`` (1 = censored); MCAT,
               PORPOISE, SurvPath. Months -> days by x 365.25/12.
``tcga_cdr``   ``case_id, slide_id, <ep>_survival_days, <ep>_censorship`` for ep in
               os/dss/pfi/dfi (1 = censored, blank = missing); ``endpoint=`` picks one, DSS by
               default when present, else OS. The ``*_cr_*`` columns (-1 coded) are ignored.
``steph``      ``patient_id, pathology_id, t`` (days) ``, e`` (1 = event): the STEPH release.
=============  ================================================================================

``columns=`` maps ``patient_id``, ``slide_id``, ``time`` and one of ``event`` / ``censorship``
to the table's own column names, with ``time_unit`` ("days" or "months"), for any other
table.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from steph.data.features import slide_id_problem, strip_wsi_extension
from steph.errors import DataError
from steph.utils.io import read_user_table

logger = logging.getLogger("steph.data.labels")

DAYS_PER_MONTH = 365.25 / 12
TIME_UNITS = {"days": 1.0, "months": DAYS_PER_MONTH}
ENDPOINTS = ("os", "dss", "pfi", "dfi")
LABEL_COLUMNS = ["patient_id", "slide_id", "time", "event"]
# cell values read as "missing" (compared case-insensitively after stripping blanks)
MISSING_TOKENS = frozenset({"", "na", "nan", "n/a", "null", "none"})
_MAX_LISTED = 5


@dataclass(frozen=True)
class _Spec:
    """Resolved column names of one table."""

    convention: str
    patient: str
    slide: str
    time: str
    flag: str
    flag_is_censorship: bool
    time_unit: str
    endpoint: str | None = None


CONVENTIONS: dict[str, str] = {
    "native": "patient_id, slide_id, time (days), event (1 = event)",
    "mcat": "case_id, slide_id, survival_months, censorship (1 = censored)",
    "tcga_cdr": "case_id, slide_id, {os,dss,pfi,dfi}_survival_days, {os,dss,pfi,dfi}_censorship",
    "steph": "patient_id, pathology_id, t (days), e (1 = event)",
}

_REQUIRED = {
    "native": ("patient_id", "slide_id", "time", "event"),
    "mcat": ("case_id", "slide_id", "survival_months", "censorship"),
    "steph": ("patient_id", "pathology_id", "t", "e"),
}


def _lookup(columns: list[str]) -> dict[str, str]:
    """lower-case stripped name -> actual column name (first occurrence wins)."""
    out: dict[str, str] = {}
    for c in columns:
        out.setdefault(str(c).strip().lower(), c)
    return out


def _tcga_endpoints(low: Mapping[str, str]) -> list[str]:
    return [ep for ep in ENDPOINTS
            if f"{ep}_survival_days" in low and f"{ep}_censorship" in low]


def _matches(low: Mapping[str, str]) -> list[str]:
    found = [name for name, req in _REQUIRED.items() if all(c in low for c in req)]
    if "case_id" in low and "slide_id" in low and _tcga_endpoints(low):
        found.append("tcga_cdr")
    return found


def _known_conventions() -> str:
    return "; ".join(f"{k}: {v}" for k, v in CONVENTIONS.items())


def _missing_columns(low: Mapping[str, str]) -> dict[str, list[str]]:
    """Per convention, the required columns the table lacks."""
    out = {name: [c for c in req if c not in low] for name, req in _REQUIRED.items()}
    tcga = [c for c in ("case_id", "slide_id") if c not in low]
    if not _tcga_endpoints(low):
        tcga.append("<endpoint>_survival_days + <endpoint>_censorship (endpoint: "
                    f"{' / '.join(ENDPOINTS)})")
    out["tcga_cdr"] = tcga
    return out


def detect_convention(columns: list[str], path: str | os.PathLike = "<table>") -> str:
    """Name of the one convention whose required columns are all present."""
    low = _lookup(columns)
    found = _matches(low)
    if len(found) == 1:
        return found[0]
    cols = ", ".join(map(str, columns))
    if not found:
        missing = _missing_columns(low)
        order = list(CONVENTIONS)
        closest = min(missing, key=lambda n: (len(missing[n]), order.index(n)))
        lacks = ", ".join(repr(c) if not c.startswith("<") else c for c in missing[closest])
        raise DataError(
            f"{path}: the columns match no known label convention; the closest, {closest} "
            f"({CONVENTIONS[closest]}), lacks column(s) {lacks}. Columns found: [{cols}]. "
            f"Known conventions: {_known_conventions()}. Rename the column(s), or read the "
            "table as one convention with --set data.convention=NAME (and "
            "--set data.time_unit=days|months; in a --config file: data: {convention: NAME})."
        )
    raise DataError(
        f"{path}: the columns match several label conventions ({', '.join(found)}); choose one "
        f"with --set data.convention=NAME. Columns found: [{cols}]."
    )


def _resolve(path: Path, columns_found: list[str], convention: str | None,
             endpoint: str | None, columns: Mapping[str, str] | None,
             time_unit: str | None) -> _Spec:
    low = _lookup(columns_found)
    cols_txt = ", ".join(map(str, columns_found))

    def col(name: str) -> str:
        if name in columns_found:
            return name
        key = name.strip().lower()
        if key not in low:
            raise DataError(f"{path}: column {name!r} not found (columns: [{cols_txt}])")
        return low[key]

    if time_unit is not None and time_unit not in TIME_UNITS:
        raise DataError(f"time_unit must be one of {sorted(TIME_UNITS)}, got {time_unit!r}")

    if columns is not None:
        if convention not in (None, "custom"):
            raise DataError(f"{path}: give either convention={convention!r} or columns=, "
                            "not both")
        allowed = {"patient_id", "slide_id", "time", "event", "censorship"}
        unknown = sorted(set(columns) - allowed)
        if unknown:
            raise DataError(f"columns=: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        missing = [k for k in ("patient_id", "slide_id", "time") if k not in columns]
        if missing:
            raise DataError(f"columns=: missing key(s) {missing} (need patient_id, slide_id, "
                            "time and one of event / censorship)")
        if ("event" in columns) == ("censorship" in columns):
            raise DataError("columns=: give exactly one of 'event' (1 = event) or "
                            "'censorship' (1 = censored)")
        if time_unit is None:
            raise DataError(f"{path}: columns= needs time_unit ('days' or 'months')")
        is_cens = "censorship" in columns
        return _Spec("custom", col(columns["patient_id"]), col(columns["slide_id"]),
                     col(columns["time"]), col(columns["censorship" if is_cens else "event"]),
                     is_cens, time_unit)

    if convention is None:
        convention = detect_convention(columns_found, path)
    elif convention not in CONVENTIONS:
        raise DataError(f"unknown label convention {convention!r}; known: "
                        f"{', '.join(CONVENTIONS)}")

    if endpoint is not None and convention != "tcga_cdr":
        raise DataError(f"{path}: endpoint={endpoint!r} only applies to tcga_cdr tables; this "
                        f"table is read as {convention!r}")

    if convention == "tcga_cdr":
        for c in ("case_id", "slide_id"):
            col(c)
        available = _tcga_endpoints(low)
        if not available:
            raise DataError(f"{path}: no <endpoint>_survival_days / <endpoint>_censorship "
                            f"column pair for any of {ENDPOINTS} (columns: [{cols_txt}])")
        if endpoint is None:
            endpoint = "dss" if "dss" in available else "os" if "os" in available else None
            if endpoint is None:
                raise DataError(f"{path}: no DSS or OS columns; choose the endpoint with "
                                f"--set data.endpoint=NAME among {available}")
        else:
            endpoint = endpoint.strip().lower()
            if endpoint not in ENDPOINTS:
                raise DataError(f"unknown endpoint {endpoint!r}; known: {', '.join(ENDPOINTS)}")
            if endpoint not in available:
                raise DataError(f"{path}: endpoint {endpoint!r} requested but the table has no "
                                f"{endpoint}_survival_days / {endpoint}_censorship columns "
                                f"(endpoints present: {available})")
        return _Spec("tcga_cdr", col("case_id"), col("slide_id"),
                     col(f"{endpoint}_survival_days"), col(f"{endpoint}_censorship"), True,
                     time_unit or "days", endpoint)

    req = _REQUIRED[convention]
    for c in req:
        col(c)
    default_unit = "months" if convention == "mcat" else "days"
    if time_unit is not None and time_unit != default_unit:
        logger.warning("%s: times read in %s as asked (convention %s uses %s)", path,
                       time_unit, convention, default_unit)
    return _Spec(convention, col(req[0]), col(req[1]), col(req[2]), col(req[3]),
                 convention == "mcat", time_unit or default_unit)


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"label file not found: {path}")
    sep = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    return read_user_table(path, "label table", sep=sep, skipinitialspace=True)


def _listing(items: list[str], n: int | None = None) -> str:
    n = len(items) if n is None else n
    shown = "; ".join(items[:_MAX_LISTED])
    return shown + (f"; ... ({n - _MAX_LISTED} more)" if n > _MAX_LISTED else "")


def _line(i: int) -> int:
    """File line of data row i (line 1 is the header)."""
    return i + 2


def _parse_numbers(raw: pd.Series, path: Path, column: str, ids: pd.Series,
                   booleans: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(values, missing mask); non-numeric, non-blank cells are an error. With `booleans`,
    true/false (any case) read as 1/0."""
    s = raw.astype(str).str.strip()
    low = s.str.lower()
    missing = low.isin(MISSING_TOKENS).to_numpy()
    if booleans:
        s = s.mask(low == "true", "1").mask(low == "false", "0")
    values = pd.to_numeric(s.where(~missing), errors="coerce").to_numpy(dtype=float)
    bad = np.flatnonzero(~missing & np.isnan(values))
    if len(bad):
        items = [f"line {_line(i)} (patient {ids.iat[i]!r}): {raw.iat[i]!r}" for i in bad]
        raise DataError(f"{path}: column {column!r} has non-numeric values: "
                        f"{_listing(items)}")
    return values, missing


def read_labels(path: str | os.PathLike, convention: str | None = None,
                endpoint: str | None = None, columns: Mapping[str, str] | None = None,
                time_unit: str | None = None) -> pd.DataFrame:
    """Read a label table into the slide-level frame ``patient_id, slide_id, time, event``.

    Patients whose label is missing (blank time or event / censorship) are dropped and counted
    in a log warning. Raises :class:`DataError` naming the file, line / patient and column for
    negative or non-finite times, event / censorship values other than 0/1, non-numeric values,
    a patient with conflicting labels across rows, and a slide listed under two patients.
    Exact duplicate rows are removed (logged).

    The frame's ``attrs`` hold ``convention``, ``endpoint``, ``time_unit``, ``source`` and
    ``dropped_patients`` (ids dropped for a missing label).
    """
    path = Path(path)
    table = _read_table(path)
    spec = _resolve(path, list(table.columns), convention, endpoint, columns, time_unit)

    pid = table[spec.patient].astype(str).str.strip()
    sid_raw = table[spec.slide].astype(str).str.strip()
    for name, col, s in (("patient", spec.patient, pid), ("slide", spec.slide, sid_raw)):
        blank = np.flatnonzero(s.str.lower().isin(MISSING_TOKENS).to_numpy())
        if len(blank):
            items = [f"line {_line(i)}" for i in blank]
            raise DataError(f"{path}: column {col!r} has blank {name} ids: {_listing(items)}")
    sid = sid_raw.map(strip_wsi_extension)
    # slide ids become file names: none may point outside the cohort's features folder
    unsafe = [(i, p) for i, p in enumerate(map(slide_id_problem, sid)) if p is not None]
    if unsafe:
        items = [f"line {_line(i)} (patient {pid.iat[i]!r}): {sid_raw.iat[i]!r} {p}"
                 for i, p in unsafe]
        raise DataError(f"{path}: column {spec.slide!r} has slide ids that are not file names "
                        f"inside the features folder (refused, nothing read): "
                        f"{_listing(items)}")

    time, t_missing = _parse_numbers(table[spec.time], path, spec.time, pid)
    flag, f_missing = _parse_numbers(table[spec.flag], path, spec.flag, pid, booleans=True)

    bad = np.flatnonzero(~t_missing & ~np.isfinite(time))
    if len(bad):
        items = [f"line {_line(i)} (patient {pid.iat[i]!r}): {time[i]}" for i in bad]
        raise DataError(f"{path}: column {spec.time!r} has non-finite times: {_listing(items)}")
    bad = np.flatnonzero(~t_missing & (time < 0))
    if len(bad):
        items = [f"line {_line(i)} (patient {pid.iat[i]!r}): {time[i]:g}" for i in bad]
        raise DataError(f"{path}: column {spec.time!r} has negative times: {_listing(items)}")
    bad = np.flatnonzero(~f_missing & ~np.isin(flag, (0.0, 1.0)))
    if len(bad):
        what = "censorship (1 = censored)" if spec.flag_is_censorship else "event (1 = event)"
        items = [f"line {_line(i)} (patient {pid.iat[i]!r}): {table[spec.flag].iat[i]!r}"
                 for i in bad]
        raise DataError(f"{path}: column {spec.flag!r} must be 0 or 1 ({what}); got "
                        f"{_listing(items)}")

    missing = t_missing | f_missing
    event = np.where(missing, -1, (1 - flag) if spec.flag_is_censorship else flag)
    with np.errstate(over="ignore"):
        days = time * TIME_UNITS[spec.time_unit]
    bad = np.flatnonzero(~t_missing & ~np.isfinite(days))
    if len(bad):  # finite months, too many days for a float
        items = [f"line {_line(i)} (patient {pid.iat[i]!r}): {time[i]:g}" for i in bad]
        raise DataError(f"{path}: column {spec.time!r} has times too large to convert to days: "
                        f"{_listing(items)}")

    frame = pd.DataFrame({
        "patient_id": pid.to_numpy(dtype=object),
        "slide_id": sid.to_numpy(dtype=object),
        "time": days,
        "event": event.astype(np.int64),
        "_missing": missing,
        "_line": np.arange(len(table)) + 2,
    })

    # exact duplicate rows (same slide, patient and label): keep the first
    dup = frame.duplicated(subset=["patient_id", "slide_id", "time", "event", "_missing"])
    if dup.any():
        lines = frame.loc[dup, "_line"].tolist()
        logger.info("%s: removed %d duplicate row(s) (lines %s)", path, len(lines),
                    ", ".join(map(str, lines[:_MAX_LISTED])) + (" ..." if len(lines) > 5 else ""))
        frame = frame.loc[~dup].reset_index(drop=True)

    # a slide under two patients
    owners = frame.groupby("slide_id", sort=False)["patient_id"].nunique()
    shared = owners[owners > 1]
    if len(shared):
        items = []
        for s in shared.index[:_MAX_LISTED]:
            rows = frame[frame.slide_id == s]
            items.append(f"slide {s!r} under patients "
                         + ", ".join(f"{p!r} (line {ln})" for p, ln in
                                     zip(rows.patient_id, rows._line)))
        raise DataError(f"{path}: column {spec.slide!r}: slides listed under more than one "
                        f"patient ({spec.patient!r}): {_listing(items, len(shared))}")

    # conflicting labels within a patient (a blank on some rows counts as a conflict)
    g = frame.groupby("patient_id", sort=False)["_missing"].agg(["sum", "size"])
    partial = set(g.index[(g["sum"] > 0) & (g["sum"] < g["size"])])
    labelled = frame.loc[~frame._missing].groupby("patient_id", sort=False)
    conflict_t = labelled["time"].nunique()
    conflict_e = labelled["event"].nunique()
    differing = set(conflict_t.index[conflict_t > 1]) | set(conflict_e.index[conflict_e > 1])
    conflicted = [p for p in frame.patient_id.unique() if p in partial or p in differing]
    if conflicted:
        items = []
        for p in conflicted[:_MAX_LISTED]:
            rows = frame[frame.patient_id == p]
            if p in partial:
                what = f"{spec.time!r}/{spec.flag!r} blank on some rows only"
            elif conflict_t.get(p, 1) > 1:
                what = f"{spec.time!r} differs"
            else:
                what = f"{spec.flag!r} differs"
            vals = ", ".join(
                f"line {ln}: " + ("missing" if m else f"time={t:g} event={e}")
                for ln, t, e, m in zip(rows._line, rows.time, rows.event, rows._missing))
            items.append(f"patient {p!r}: {what} ({vals})")
        raise DataError(f"{path}: patients with conflicting labels across their rows: "
                        f"{_listing(items, len(conflicted))}")

    # drop patients with a missing label, loudly
    dropped = list(dict.fromkeys(frame.loc[frame._missing, "patient_id"]))
    if dropped:
        logger.warning(
            "%s: dropped %d patient(s) (%d slide row(s)) with a missing label in %r/%r: %s%s",
            path, len(dropped), int(frame._missing.sum()), spec.time, spec.flag,
            ", ".join(dropped[:_MAX_LISTED]), " ..." if len(dropped) > _MAX_LISTED else "")
        frame = frame.loc[~frame._missing].reset_index(drop=True)

    out = frame[LABEL_COLUMNS].copy()
    out["patient_id"] = out["patient_id"].astype(str)
    out["slide_id"] = out["slide_id"].astype(str)
    out["time"] = out["time"].astype(float)
    out["event"] = out["event"].astype(np.int64)
    out.attrs.update({
        "source": str(path),
        "convention": spec.convention,
        "endpoint": spec.endpoint,
        "time_unit": spec.time_unit,
        "dropped_patients": dropped,
    })
    if out.empty:
        raise DataError(f"{path}: no labelled slide left (all {len(dropped)} patient(s) have a "
                        f"missing label in {spec.time!r}/{spec.flag!r})" if dropped
                        else f"{path}: the label table has no rows")
    logger.info("%s: %d slide(s) of %d patient(s) read as %s%s", path, len(out),
                out.patient_id.nunique(), spec.convention,
                f" (endpoint {spec.endpoint})" if spec.endpoint else "")
    return out
