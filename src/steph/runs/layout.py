"""A runs folder on disk: the one owner of its file names, of how its run directories are found
and of how their records are read and written.

::

    RUNS/theta0.safetensors (+ .json)             ABMIL's shared initialisation theta_0
    RUNS/theta0-<arch>.safetensors (+ .json)      the other networks'
    RUNS/splits/<cohort>/[rep<r>/]                folds steph drew (when a cohort brings none)
    RUNS/graphs/<cohort>/                         patch graphs of graph networks (Patch-GCN)
    RUNS/<cohort>/<method>/[rep<r>/]fold<k>/      one run (a RunDir)
    RUNS/.<fold dir name>.lock (beside each run)  its lease while a process trains it
    RUNS/requests.json                            which runs are results, which only inputs
    RUNS/summary.csv, comparisons.csv, timing.csv, summary.md, summary.png
    RUNS/.cache/analysis/, RUNS/.cache/comparisons/

A run directory holds ``config.yaml`` (the settings that decide its result), ``log.jsonl`` (one
row per epoch) and the checkpoints while it trains, then ``model.safetensors`` + ``model.json``
(a self-contained artefact), ``predictions.csv``, ``run.json`` (time, host, software: what
differs between two runs of one command) and, written last, ``metrics.json``: a run is
finished when its metrics file exists. Every record carries a format version
(:mod:`steph.runs.migrations` reads older ones).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from steph.config import without_performance_keys
from steph.errors import RunError
from steph.runs import migrations
from steph.runs.requests import RunRoles, record_request, run_roles
from steph.utils.io import read_json, write_csv, write_json, write_text

_FOLD = re.compile(r"fold(\d+)$")
_REP = re.compile(r"rep(\d+)$")


@dataclass(frozen=True)
class RunRef:
    """One run of the grid: a method on a cohort's fold, in one repeat of the cross-validation
    (repeat r uses split seed ``data.split_seed + r``)."""

    cohort: str
    method: str
    fold: int
    repeat: int = 0

    def __str__(self) -> str:
        rep = f"rep{self.repeat}/" if self.repeat else ""
        return f"{self.cohort}/{self.method}/{rep}fold{self.fold}"

    def path(self, runs_root: str | Path) -> Path:
        """``RUNS/<cohort>/<method>/[rep<r>/]fold<k>``."""
        base = Path(runs_root) / self.cohort / self.method
        return (base / f"rep{self.repeat}" if self.repeat else base) / f"fold{self.fold}"


class RunDir:
    """The files of one run directory and their readers / writers."""

    CONFIG = "config.yaml"
    LOG = "log.jsonl"
    CHECKPOINT = "checkpoint.safetensors"
    CHECKPOINT_PREV = "checkpoint.prev.safetensors"  # the last good one before CHECKPOINT
    WEIGHTS = "model.safetensors"
    MANIFEST = "model.json"
    PREDICTIONS = "predictions.csv"
    RECORD = "run.json"
    METRICS = "metrics.json"
    ATTEMPTS = "attempts.json"
    SEARCH = "search"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # -- where ----------------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def log(self) -> Path:
        return self.path / self.LOG

    @property
    def checkpoint(self) -> Path:
        return self.path / self.CHECKPOINT

    @property
    def checkpoint_prev(self) -> Path:
        return self.path / self.CHECKPOINT_PREV

    @property
    def weights(self) -> Path:
        return self.path / self.WEIGHTS

    @property
    def manifest(self) -> Path:
        return self.path / self.MANIFEST

    @property
    def predictions(self) -> Path:
        return self.path / self.PREDICTIONS

    @property
    def record(self) -> Path:
        return self.path / self.RECORD

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def attempts(self) -> Path:
        return self.path / self.ATTEMPTS

    @property
    def search(self) -> Path:
        """The inner cross-validation of a hyper-parameter (``steph.experiments.search``)."""
        return self.path / self.SEARCH

    @property
    def lease(self) -> Path:
        """The lease file of the run (beside it, so the run directory stays clean)."""
        return self.path.parent / f".{self.path.name}.lock"

    def attempt_log(self, n: int) -> Path:
        """The log of attempt ``n`` that a restart ended (``log.attempt<n>.jsonl``)."""
        return self.path / f"log.attempt{n}.jsonl"

    def is_finished(self) -> bool:
        return self.metrics.exists()

    # -- records --------------------------------------------------------------------------------
    def read_log(self) -> list[dict[str, Any]]:
        """The per-epoch rows of ``log.jsonl`` ([] when there is none)."""
        return read_log_rows(self.log)

    def write_log(self, rows: list[dict[str, Any]]) -> None:
        write_text(self.log, "".join(json.dumps(row) + "\n" for row in rows))

    def read_settings(self) -> dict[str, Any]:
        """``config.yaml`` in today's format ({} when there is none)."""
        if not self.config.exists():
            return {}
        return migrations.upgrade_settings(yaml.safe_load(self.config.read_text()) or {})

    def check_or_write_settings(self, settings: dict[str, Any]) -> None:
        """Save the settings that decide the run's result; a run started with other settings
        is an error, not a mix (performance-only keys, e.g. train.threads, never differ)."""
        if self.config.exists():
            found = without_performance_keys(self.read_settings())
            settings = without_performance_keys(settings)
            if _canon(found) != _canon(settings):
                diff = sorted(_diff_keys(found, settings))
                raise RunError(f"{self.path} was started with other settings (differences: "
                               f"{', '.join(diff[:8])}); delete that run directory or use "
                               "another --out")
            return
        self.path.mkdir(parents=True, exist_ok=True)
        record = {"format": migrations.SETTINGS_FORMAT, **without_performance_keys(settings)}
        write_text(self.config, yaml.safe_dump(record, sort_keys=False))

    def read_metrics(self) -> dict[str, Any]:
        return migrations.upgrade_metrics(read_json(self.metrics))

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        """Written last: the run is finished."""
        write_json(self.metrics, {"format": migrations.METRICS_FORMAT, **metrics})

    def read_manifest(self) -> dict[str, Any]:
        return read_json(self.manifest)

    def read_record(self) -> dict[str, Any]:
        """``run.json`` in today's format, or {} when there is none (runs written before it)."""
        try:
            return migrations.upgrade_record(read_json(self.record))
        except (OSError, ValueError):
            return {}

    def write_record(self, record: dict[str, Any]) -> None:
        write_json(self.record, {"format": migrations.RECORD_FORMAT, **record})

    def read_predictions(self) -> pd.DataFrame:
        """``predictions.csv`` (patient_id, split, risk, time, event)."""
        if not self.predictions.exists():
            raise RunError(f"{self.predictions}: file not found (is the run finished?)")
        return pd.read_csv(self.predictions, dtype={"patient_id": str})

    def write_predictions(self, frame: pd.DataFrame) -> None:
        write_csv(self.predictions, frame)

    def read_attempts(self) -> list[dict[str, Any]]:
        """The restarts the run has made so far (``attempts.json``), oldest first."""
        return read_json(self.attempts) if self.attempts.exists() else []

    def write_attempts(self, attempts: list[dict[str, Any]]) -> None:
        write_json(self.attempts, attempts)


def _canon(d: Any) -> str:
    return json.dumps(d, sort_keys=True, default=str)


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in set(a) | set(b):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if _canon(a) == _canon(b) else [prefix.rstrip(".")]


def read_log_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines log ([] when the file does not exist)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


class RunsFolder:
    """The folder every run of an experiment lives in (see the module docstring)."""

    SPLITS = "splits"
    GRAPHS = "graphs"
    CACHE = ".cache"
    SUMMARY_CSV = "summary.csv"
    COMPARISONS_CSV = "comparisons.csv"
    TIMING_CSV = "timing.csv"
    SUMMARY_MD = "summary.md"
    SUMMARY_PNG = "summary.png"
    REQUESTS = "requests.json"
    # top-level folders that are not cohorts
    NOT_COHORTS = frozenset({SPLITS, GRAPHS, "analysis", "search", "report-figures"})

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunsFolder({str(self.root)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    def run(self, ref: RunRef) -> RunDir:
        return RunDir(ref.path(self.root))

    def theta0(self, arch: str = "abmil") -> Path:
        """``theta0.safetensors`` for ABMIL, ``theta0-<arch>.safetensors`` otherwise (its
        identity beside it, with the suffix ``.json``)."""
        return self.root / ("theta0.safetensors" if arch == "abmil" else f"theta0-{arch}.safetensors")

    def splits(self, cohort: str, repeat: int = 0) -> Path:
        out = self.root / self.SPLITS / cohort
        return out / f"rep{repeat}" if repeat else out

    def graphs(self, cohort: str) -> Path:
        """Where the patch graphs of a cohort are cached."""
        return self.root / self.GRAPHS / cohort

    def cache(self, kind: str) -> Path:
        """``RUNS/.cache/<kind>`` (e.g. analysis, comparisons)."""
        return self.root / self.CACHE / kind

    def walk(self) -> Iterator[tuple[RunRef, RunDir]]:
        """Every run directory (finished or not), by cohort, method, then folder name."""
        if not self.root.is_dir():
            return
        for cohort in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if cohort.name.startswith(".") or cohort.name in self.NOT_COHORTS:
                continue
            for method in sorted(p for p in cohort.iterdir() if p.is_dir()):
                if method.name.startswith("."):
                    continue
                for child in sorted(method.iterdir()):
                    if not child.is_dir():
                        continue
                    fold = _FOLD.match(child.name)
                    if fold:
                        yield (RunRef(cohort.name, method.name, int(fold.group(1))),
                               RunDir(child))
                    rep = _REP.match(child.name)
                    if rep:
                        for sub in sorted(child.iterdir()):
                            fold = _FOLD.match(sub.name)
                            if sub.is_dir() and fold:
                                yield (RunRef(cohort.name, method.name, int(fold.group(1)),
                                              int(rep.group(1))), RunDir(sub))

    def finished(self) -> Iterator[tuple[RunRef, RunDir]]:
        return ((ref, run) for ref, run in self.walk() if run.is_finished())

    # -- results and inputs (steph.runs.requests) ---------------------------------------------------
    def roles(self) -> RunRoles:
        """Which (cohort, method) pairs are results; every other run is an input (a source's
        model a transfer run needed). From ``requests.json``, else inferred from the runs."""
        return run_roles(self.root, self._run_tuples())

    def record_request(self, targets: Sequence[str], methods: Sequence[str],
                       results: Iterable[tuple[str, str]], folds: Sequence[int] | None = None,
                       repeats: int = 1, command: str = "cv") -> None:
        """Record a request's targets, methods and result pairs in ``requests.json``."""
        record_request(self.root, targets, methods, results, self._run_tuples(), folds,
                       repeats, command)

    def _run_tuples(self) -> Iterator[tuple[str, str, int, int, Path]]:
        """Every run directory (finished or not), as the inference of results reads it."""
        return ((ref.cohort, ref.method, ref.fold, ref.repeat, run.path)
                for ref, run in self.walk())
