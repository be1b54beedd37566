"""Results of long analyses kept under ``RUNS/.cache/analysis/<kind>/``: one JSON file per unit
of work (a source-target pair, a run, a slide) holding the key of what it was computed from and
the result. A file whose key differs (a model retrained, other patients, other settings) is
computed again and replaced; writes are atomic, so an interrupted analysis leaves complete
files only and resumes with the units it has not done."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from steph.utils.io import write_json

CACHE = Path(".cache") / "analysis"


def cache_path(runs_root: str | Path, kind: str, *parts: str) -> Path:
    """``RUNS/.cache/analysis/<kind>/<part>/.../<last part>.json``."""
    *folders, name = parts
    return Path(runs_root).joinpath(CACHE, kind, *folders, f"{name}.json")


def run_cache_path(runs_root: str | Path, kind: str, run: Any, *more: str) -> Path:
    """The cache file of an analysis of one run (a ``RunRef``):
    ``<kind>/<cohort>/<method>/[rep<r>/]fold<k>[/<more>...].json``."""
    parts = [run.cohort, run.method, *([f"rep{run.repeat}"] if run.repeat else []),
             f"fold{run.fold}", *more]
    return cache_path(runs_root, kind, *parts)


def cache_key(*parts: Any) -> str:
    """A digest of ``parts`` (anything JSON can write; other objects by ``str``)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def read_cached(path: Path, key: str) -> Any | None:
    """The result stored at ``path`` when it was computed for ``key``, else None."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("key") != key:
        return None
    return stored.get("result")


def write_cached(path: Path, key: str, result: Any) -> None:
    write_json(path, {"key": key, "result": result})
