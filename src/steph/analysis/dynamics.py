"""How STEPH used its sources.

* **Dynamics** (appendix D.1, Figures S1 and S2): the mean merge weight w and mixup coefficient
  lambda of every source over the training bags of each epoch, as the trainer logged them
  (``log.jsonl``: ``mean_w``, ``mean_lambda``, ``mean_selected`` in the order of the artefact's
  ``settings.sources``).
* **Selections on the test patients**: ``STEPH.explain`` on every test bag of a run gives w,
  lambda and the K selected sources of that patient. This needs the features (the data root)
  and one forward pass per patient; the result of each run is cached
  (``RUNS/.cache/analysis/selection/<cohort>/<method>/[rep<r>/]fold<k>.json``, keyed by the
  artefact's weights, the patients and their feature files). Nothing is added to a run while it
  trains: finished runs stay byte-for-byte what they were, and runs made before this analysis
  existed can be analysed too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from steph.analysis.cache import cache_key, read_cached, run_cache_path, write_cached
from steph.analysis.runs import RunRef, load_steph, read_log, read_manifest, weights_digest

DYNAMICS_COLUMNS = ["cohort", "method", "repeat", "fold", "epoch", "source", "w", "lambda",
                    "selected"]
SELECTION_COLUMNS = ["cohort", "method", "repeat", "fold", "patient_id", "source", "w", "lambda",
                     "selected", "coefficient"]


def sources_of(runs_root: str | Path, run: RunRef) -> list[str]:
    """The source cohorts of a STEPH run, in the order of its merge weights."""
    return list(read_manifest(run.path(runs_root))["settings"]["sources"])


def steph_dynamics(runs_root: str | Path, runs: Sequence[RunRef]) -> pd.DataFrame:
    """One row per (run, epoch, source) with the epoch's mean w, lambda and selection share
    over the training bags."""
    rows = []
    for run in runs:
        sources = sources_of(runs_root, run)
        for rec in read_log(run.path(runs_root)):
            if "mean_w" not in rec:
                continue
            w = np.atleast_1d(rec["mean_w"])
            lam = np.atleast_1d(rec.get("mean_lambda", [np.nan] * len(w)))
            sel = np.atleast_1d(rec.get("mean_selected", [np.nan] * len(w)))
            for i, source in enumerate(sources):
                rows.append({"cohort": run.cohort, "method": run.method, "repeat": run.repeat,
                             "fold": run.fold, "epoch": int(rec["epoch"]), "source": source,
                             "w": float(w[i]), "lambda": float(lam[i]),
                             "selected": float(sel[i])})
    return pd.DataFrame(rows, columns=DYNAMICS_COLUMNS)


def last_epoch(dynamics: pd.DataFrame) -> pd.DataFrame:
    """Per (cohort, method, source): the last epoch's w, lambda and training selection share,
    averaged over runs (folds)."""
    if dynamics.empty:
        return pd.DataFrame(columns=["cohort", "method", "source", "w", "lambda", "selected"])
    last = dynamics[dynamics["epoch"] == dynamics.groupby(
        ["cohort", "method", "repeat", "fold"])["epoch"].transform("max")]
    return (last.groupby(["cohort", "method", "source"], sort=False)[["w", "lambda", "selected"]]
            .mean().reset_index())


def top_sources(runs_root: str | Path, run: RunRef, n: int) -> list[str]:
    """The ``n`` sources with the largest mean w in the last logged epoch of ``run`` (ties in
    the artefact's order)."""
    dyn = steph_dynamics(runs_root, [run])
    if dyn.empty:
        return sources_of(runs_root, run)[:n]
    last = dyn[dyn["epoch"] == dyn["epoch"].max()]
    order = np.argsort(-last["w"].to_numpy(float), kind="stable")
    return [last["source"].iloc[i] for i in order[:n]]


def test_selections(runs_root: str | Path, data_root: str | Path, run: RunRef,
                    progress: bool = False) -> pd.DataFrame:
    """``explain`` on every test patient of a STEPH run: one row per (patient, source) with w,
    lambda, whether it was among the K selected and its coefficient in theta(X) - theta_0
    (cached, see the module docstring)."""
    import torch
    from tqdm.auto import tqdm

    from steph.analysis.bags import RunBags

    bags = RunBags(runs_root, data_root, run)
    ids = bags.test_ids()
    key = cache_key("selection/1", weights_digest(run.path(runs_root)), ids, bags.files_key(ids))
    path = run_cache_path(runs_root, "selection", run)
    cached = read_cached(path, key)
    if cached is None:
        module = load_steph(runs_root, run)
        records = []
        with torch.no_grad():
            for pid in tqdm(ids, desc=f"explain {run}", unit="patient",
                            disable=None if progress else True, leave=False):
                ex = module.explain(bags.bag(pid), **bags.bag_inputs(pid, module.bag_inputs))
                for i, source in enumerate(module.source_names):
                    records.append([pid, source, float(ex.w[i]), float(ex.lam[i]),
                                    int(source in ex.selected), ex.coefficients[source]])
        write_cached(path, key, records)
        cached = records
    frame = pd.DataFrame(cached, columns=SELECTION_COLUMNS[4:])
    for col, value in (("cohort", run.cohort), ("method", run.method), ("repeat", run.repeat),
                       ("fold", run.fold)):
        frame[col] = value
    return frame[SELECTION_COLUMNS]


def selection_frequency(selections: pd.DataFrame) -> pd.DataFrame:
    """Per (cohort, method, source): test patients, the share for which the source was among
    the K selected, and the mean w and lambda over them (pooled over folds)."""
    cols = ["cohort", "method", "source", "patients", "selected_share", "mean_w", "mean_lambda"]
    if selections.empty:
        return pd.DataFrame(columns=cols)
    out = selections.groupby(["cohort", "method", "source"], sort=False).agg(
        patients=("patient_id", "size"), selected_share=("selected", "mean"),
        mean_w=("w", "mean"), mean_lambda=("lambda", "mean")).reset_index()
    return out[cols]
