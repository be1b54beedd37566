"""What a runs folder holds: every run directory with its state, the runs a report cannot find,
and readers of a run's log, settings, artefact and predictions.

A run is *finished* when its ``metrics.json`` exists; *unfinished* when its directory exists
without it (training, interrupted or failed; ``lease`` says whether a lease file is there);
*missing* when no directory exists although other methods of the same cohort and repeat have
that fold (the grid's shape is read from what is there: a method run on folds 0-4 of a cohort
where another method has folds 0-1 has three missing runs). Each run's *role* says whether it
is a result of the runs folder or only an input (a source's model that transfer runs merged;
:mod:`steph.runs.requests`); only results can be missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from steph.config import ExperimentConfig, build_config
from steph.errors import RunError
from steph.runs import RESULT, RunDir, RunRef, RunsFolder

FINISHED, UNFINISHED, MISSING = "finished", "unfinished", "missing"
INVENTORY_COLUMNS = ["cohort", "method", "repeat", "fold", "state", "lease", "path", "role"]


def run_inventory(runs_root: str | Path) -> pd.DataFrame:
    """One row per run directory (finished or not) and per missing run (see the module
    docstring), sorted by cohort, method, repeat and fold."""
    root = Path(runs_root)
    if not root.is_dir():
        raise RunError(f"runs folder not found: {root}")
    folder = RunsFolder(root)
    roles = folder.roles()
    rows = []
    for ref, run in folder.walk():
        state = FINISHED if run.is_finished() else UNFINISHED
        rows.append({"cohort": ref.cohort, "method": ref.method, "repeat": ref.repeat,
                     "fold": ref.fold, "state": state, "lease": run.lease.exists(),
                     "path": str(run.path), "role": roles.role(ref.cohort, ref.method)})
    found = pd.DataFrame(rows, columns=INVENTORY_COLUMNS)
    missing = []
    results = found[found["role"] == RESULT]
    for (cohort, repeat), sub in results.groupby(["cohort", "repeat"]):
        folds = set(sub["fold"])
        for method, msub in sub.groupby("method"):
            for fold in sorted(folds - set(msub["fold"])):
                missing.append({"cohort": cohort, "method": method, "repeat": repeat,
                                "fold": fold, "state": MISSING, "lease": False,
                                "path": str(RunRef(cohort, method, fold, repeat).path(root)),
                                "role": RESULT})
    out = pd.concat([found, pd.DataFrame(missing, columns=INVENTORY_COLUMNS)], ignore_index=True)
    return out.sort_values(["cohort", "method", "repeat", "fold"]).reset_index(drop=True)


# -- readers of one run ------------------------------------------------------------------------

# readers of one run, by its directory (the records' owner is steph.runs.RunDir)

def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The per-epoch rows of a run's ``log.jsonl`` ([] when there is none)."""
    return RunDir(path).read_log()


def read_settings(path: str | Path) -> dict[str, Any]:
    """A run's ``config.yaml`` in today's format ({} when there is none)."""
    return RunDir(path).read_settings()


def run_config(path: str | Path) -> ExperimentConfig:
    """The experiment settings a run was made with (its config.yaml without ``run``)."""
    settings = read_settings(path)
    return build_config({k: v for k, v in settings.items() if k != "run"},
                        source=str(RunDir(path).config))


def read_manifest(path: str | Path) -> dict[str, Any]:
    from steph.runs import migrations

    return migrations.upgrade_manifest(RunDir(path).read_manifest())


def read_metrics(path: str | Path) -> dict[str, Any]:
    return RunDir(path).read_metrics()


def read_predictions(path: str | Path) -> pd.DataFrame:
    """``predictions.csv`` of a run (patient_id, split, risk, time, event)."""
    return RunDir(path).read_predictions()


def weights_digest(path: str | Path) -> str:
    """The SHA-256 its manifest records for a run's weights (what a cache key names)."""
    digest = read_manifest(path).get("weights_sha256")
    if not digest:
        from steph.utils.io import file_sha256

        digest = file_sha256(RunDir(path).weights)
    return str(digest)


def theta0_digest(runs_root: str | Path, arch: str = "abmil") -> str:
    from steph.utils.io import file_sha256

    return file_sha256(RunsFolder(runs_root).theta0(arch))


def finished_runs(inventory: pd.DataFrame, method: str | None = None,
                  cohort: str | None = None, role: str | None = None) -> list[RunRef]:
    """The finished runs of ``inventory`` (of a method / cohort / role when given)."""
    sub = inventory[inventory["state"] == FINISHED]
    if role is not None:
        sub = sub[sub["role"] == role]
    if method is not None:
        sub = sub[sub["method"] == method]
    if cohort is not None:
        sub = sub[sub["cohort"] == cohort]
    return [RunRef(c, m, int(f), int(r))
            for c, m, r, f in sub[["cohort", "method", "repeat", "fold"]].itertuples(index=False)]


def load_steph(runs_root: str | Path, run: RunRef):
    """The STEPH module of a finished run (``ConfigError`` when the run is another kind)."""
    from steph.errors import ConfigError
    from steph.inference import load_artefact

    module, manifest = load_artefact(run.path(runs_root))
    if manifest["kind"] != "steph":
        raise ConfigError(f"{run} is a {manifest['kind']} run, not a STEPH run")
    return module


def steph_arch(runs_root: str | Path, run: RunRef) -> str:
    """The network a STEPH run merged (its artefact's settings)."""
    return read_manifest(run.path(runs_root))["settings"]["arch"]


def target_run(run: RunRef, arch: str) -> RunRef:
    """The cancer-specific run a transfer run of ``run`` merged as its target (same cohort,
    fold and repeat, the network ``arch``)."""
    return RunRef(run.cohort, arch, run.fold, run.repeat)


def source_run(source: str, arch: str) -> RunRef:
    """A source's model (fold 0, repeat 0: method.md section 4)."""
    return RunRef(source, arch, 0, 0)


def provenance(runs_root: str | Path, inventory: pd.DataFrame) -> pd.DataFrame:
    """Software and host of every finished run (from run.json): one row per distinct
    combination with the number of runs and the methods that ran with it."""
    rows = []
    for run in finished_runs(inventory):
        rec = RunDir(run.path(runs_root)).read_record()
        rows.append({"python": rec.get("python", "?"), "torch": rec.get("torch", "?"),
                     "steph": rec.get("steph", "?"), "host": rec.get("host", "?"),
                     "threads": rec.get("threads", np.nan), "method": run.method})
    cols = ["python", "torch", "steph", "host", "threads"]
    if not rows:
        return pd.DataFrame(columns=[*cols, "runs", "methods"])
    df = pd.DataFrame(rows)
    df["threads"] = df["threads"].astype("string").fillna("?")
    out = (df.groupby(cols, dropna=False)
           .agg(runs=("method", "size"), methods=("method", lambda m: ", ".join(dict.fromkeys(m))))
           .reset_index())
    return out


def epoch_seconds(runs_root: str | Path, inventory: pd.DataFrame) -> pd.DataFrame:
    """Training seconds per epoch of every finished run that trained (from run.json):
    method, runs, epochs, mean and sd seconds per epoch (over all epochs of all its runs) and
    the hosts (the paper's Table S6 measures this, on one machine)."""
    rows = []
    for run in finished_runs(inventory):
        rec = RunDir(run.path(runs_root)).read_record()
        for s in rec.get("epoch_seconds") or []:
            if s is not None:
                rows.append({"method": run.method, "run": str(run), "seconds": float(s),
                             "host": rec.get("host", "?")})
    cols = ["method", "runs", "epochs", "mean_seconds", "sd_seconds", "hosts"]
    if not rows:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(rows)
    out = df.groupby("method", sort=False).agg(
        runs=("run", "nunique"), epochs=("seconds", "size"), mean_seconds=("seconds", "mean"),
        sd_seconds=("seconds", "std"), hosts=("host", lambda h: ", ".join(sorted(set(h)))))
    return out.reset_index()[cols]


def settings_table(runs_root: str | Path, inventory: pd.DataFrame
                   ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The settings of every method (its finished runs' config.yaml, run identity left out):
    a table of the keys whose values differ between methods, or between runs of one method
    (key, then one column per method; a cell lists every value its runs had) and the dict of
    the keys every method that has them shares."""
    per_method: dict[str, dict[str, set[str]]] = {}
    for run in finished_runs(inventory):
        settings = read_settings(run.path(runs_root))
        flat = _flatten({k: v for k, v in settings.items() if k != "run"})
        flat["run.sources"] = ", ".join(settings.get("run", {}).get("sources") or []) or "–"
        values = per_method.setdefault(run.method, {})
        for k, v in flat.items():
            values.setdefault(k, set()).add(v)
    methods = list(per_method)
    keys = sorted({k for v in per_method.values() for k in v})
    differing, common = [], {}
    for key in keys:
        cells = {m: per_method[m].get(key) for m in methods}
        present = [v for v in cells.values() if v is not None]
        if key != "run.sources" and all(len(v) == 1 for v in present) and \
                len({next(iter(v)) for v in present}) == 1:
            common[key] = next(iter(present[0]))
            continue
        if key == "run.sources" and all(v == {"–"} for v in present):
            continue
        differing.append({"setting": key, **{m: ("–" if v is None else " | ".join(sorted(v)))
                                             for m, v in cells.items()}})
    return pd.DataFrame(differing, columns=["setting", *methods]), common


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return out
