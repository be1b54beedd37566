"""Which runs of a runs folder are *results* and which are only *inputs*.

A transfer method's run on a target needs every source's cancer-specific model of fold 0
(:mod:`steph.experiments.plan`). Those source runs are inputs: they exist because a transfer
run needed them, not because anyone asked for the source's cross-validation, and a table that
mixed them in would average one fold of each source with the target's folds. So every
request (``steph cv``, ``steph train``, ``steph demo``) is recorded in
``RUNS/requests.json``::

    {"format": "steph-requests/1",
     "requests": [{"command": "cv", "targets": ["BLCA"], "methods": ["abmil", "steph"],
                   "folds": [0, 1, 2, 3, 4], "repeats": 1,
                   "results": [["BLCA", "abmil"], ["BLCA", "steph"]]}]}

``results`` are the (cohort, method) pairs the request made results of: each target with each
requested method, and with the cancer-specific network the transfer methods merged (the
target's own model is trained on the same folds: it is the baseline they are compared with).
A finished run is a result when its (cohort, method) pair is one of any request's; every
table (``steph cv`` / ``demo`` / ``summarize`` printouts, ``summary.csv`` / ``.md`` / ``.png``,
``comparisons.csv``, ``timing.csv``, ``steph report``) shows the results, and the report lists
the inputs separately. Requests accumulate over calls (several ``steph cv`` on one folder, at
the same time too: the record is rewritten atomically under a file lock); a request identical
to a recorded one is not recorded twice.

A runs folder written before this record existed has none: its results are inferred from the
runs (:func:`infer_results`) and said to be inferred; the first request recorded in such a
folder records the inferred results first, marked ``"inferred": true``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from steph.errors import RunError
from steph.runs import migrations
from steph.utils.io import read_json, write_json

REQUESTS_FILE = "requests.json"
RESULT, INPUT = "result", "input"

# a run directory (finished or not) as inference reads it: cohort, method, fold, repeat, path
SeenRun = tuple[str, str, int, int, Path]


@dataclass(frozen=True)
class RunRoles:
    """The result pairs (cohort, method) of a runs folder; every other run is an input.
    ``inferred``: there was no ``requests.json`` and the pairs were inferred from the runs."""

    results: frozenset[tuple[str, str]]
    inferred: bool = False
    targets: tuple[str, ...] = field(default=())
    methods: tuple[str, ...] = field(default=())  # in the order the requests named them

    def role(self, cohort: str, method: str) -> str:
        return RESULT if (cohort, method) in self.results else INPUT

    def is_result(self, cohort: str, method: str) -> bool:
        return (cohort, method) in self.results

    def describe(self) -> str:
        """One line: where the roles come from."""
        targets = ", ".join(self.targets) or "none"
        if self.inferred:
            return (f"no {REQUESTS_FILE} (a runs folder written before steph recorded its "
                    f"requests): results inferred from the runs, target cohort(s) {targets}")
        return f"results of the requests in {REQUESTS_FILE}: target cohort(s) {targets}"


def _lock(path: Path):
    """An exclusive lock on ``path`` for a read-modify-write (flock; a no-op where the file
    system has none: the write itself stays atomic)."""
    @contextlib.contextmanager
    def held() -> Iterator[None]:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX)
            except (ImportError, OSError):  # pragma: no cover (Windows, some NFS mounts)
                pass
            yield
        finally:
            os.close(fd)  # closing releases the lock
    return held()


def read_requests(root: str | Path) -> list[dict[str, Any]] | None:
    """The recorded requests of a runs folder (None: no record)."""
    path = Path(root) / REQUESTS_FILE
    if not path.exists():
        return None
    try:
        found = read_json(path)
        return migrations.upgrade_requests(found)["requests"]
    except (ValueError, KeyError, TypeError) as err:
        raise RunError(f"{path}: not a steph requests record ({err}); delete it to infer the "
                       "results from the runs again") from None


def record_request(root: str | Path, targets: Sequence[str], methods: Sequence[str],
                   results: Iterable[tuple[str, str]], seen: Iterable[SeenRun],
                   folds: Sequence[int] | None = None, repeats: int = 1,
                   command: str = "cv") -> None:
    """Add one request to ``RUNS/requests.json`` (created if needed; an identical request is
    not added twice). In a folder with runs but no record, the results inferred from its
    run directories (``seen``) go first."""
    root = Path(root)
    path = root / REQUESTS_FILE
    entry = {"command": command, "targets": list(targets), "methods": list(methods),
             "folds": None if folds is None else [int(f) for f in folds],
             "repeats": int(repeats),
             "results": sorted([list(p) for p in {tuple(p) for p in results}])}
    with _lock(root / f".{REQUESTS_FILE}.mutex"):
        requests = read_requests(root)
        if requests is None:
            requests = []
            inferred = infer_results(seen)
            if inferred.results:
                requests.append({"inferred": True, "targets": list(inferred.targets),
                                 "results": sorted([list(p) for p in inferred.results])})
        if entry in requests:
            return
        requests.append(entry)
        write_json(path, {"format": migrations.REQUESTS_FORMAT, "requests": requests})


def _is_transfer_run(path: Path) -> bool:
    """Whether a run merged other cohorts' models (its settings name sources)."""
    try:
        settings = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False
    run = settings.get("run") if isinstance(settings, dict) else None
    return bool(isinstance(run, dict) and run.get("sources"))


def infer_results(seen: Iterable[SeenRun]) -> RunRoles:
    """The results of a runs folder without ``requests.json``, from its run directories
    (finished or not: an interrupted fold 1 shows a method was asked for more than fold 0).

    A cohort is a target when it has a transfer run (one whose settings name sources) or a
    run of a fold other than 0 (or of a repeat other than 0): a source's input is fold 0 only.
    In a target cohort, a method is a result unless its only run is fold 0 while the cohort has
    other folds (a source model of another network). When no cohort is a target (every run is
    fold 0 of a cancer-specific method), every run is a result: nothing tells them apart."""
    by_pair: dict[tuple[str, str], list[tuple[int, int, Path]]] = {}
    for cohort, method, fold, repeat, path in seen:
        by_pair.setdefault((cohort, method), []).append((fold, repeat, path))
    beyond0 = {pair for pair, rs in by_pair.items() if any(f or r for f, r, _ in rs)}
    transfer = {pair for pair, rs in by_pair.items() if _is_transfer_run(rs[0][2])}
    targets = sorted({c for c, _ in beyond0 | transfer})
    if not targets:
        return RunRoles(frozenset(by_pair), inferred=True,
                        targets=tuple(sorted({c for c, _ in by_pair})))
    results = set()
    for cohort, method in by_pair:
        if cohort not in targets:
            continue
        cohort_beyond0 = any(c == cohort for c, _ in beyond0)
        if (cohort, method) in beyond0 | transfer or not cohort_beyond0:
            results.add((cohort, method))
    return RunRoles(frozenset(results), inferred=True, targets=tuple(targets))


def run_roles(root: str | Path, seen: Iterable[SeenRun]) -> RunRoles:
    """The results of a runs folder: from ``requests.json``, else inferred from its run
    directories (``seen``)."""
    requests = read_requests(root)
    if requests is None:
        return infer_results(seen)
    pairs = {(str(c), str(m)) for r in requests for c, m in r.get("results", [])}
    targets = tuple(dict.fromkeys(c for r in requests for c in r.get("targets", [])))
    methods = tuple(dict.fromkeys([*(m for r in requests for m in r.get("methods", [])),
                                   *(m for r in requests for _, m in r.get("results", []))]))
    return RunRoles(frozenset(pairs), inferred=False, targets=targets, methods=methods)
