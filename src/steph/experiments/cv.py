"""The cohort x fold x method grid: plan the runs a request needs, train what is missing in
dependency order (cancer-specific models first), skip what is finished, summarise.

The pieces, each with one job:

- :mod:`~steph.experiments.plan`: which runs a request needs, prerequisites first (pure);
- :mod:`~steph.experiments.workspace`: cohorts, folds, theta_0 and model pools (the inputs);
- :mod:`~steph.experiments.runner`: one run, from its settings to its records (with
  :mod:`~steph.experiments.search` and :mod:`~steph.experiments.writer`);
- :mod:`~steph.experiments.executors`: who runs the runs, in this process (``local``) or as a
  Ray task graph (``ray``); each run is held by a lease while it trains, and a run that fails
  fails only the runs that need it.

:class:`Experiment` puts them together as the grid an executor runs; :func:`run_cv` is the
whole request, summary included.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from steph.config import ExperimentConfig, build_config
from steph.experiments.plan import Planner, parse_folds
from steph.experiments.runner import RunRunner
from steph.experiments.workspace import Workspace
from steph.methods import resolve_methods
from steph.runs import RunRef

log = logging.getLogger("steph.experiments")

__all__ = ["Experiment", "parse_folds", "run_cv"]


class Experiment:
    """One data root + one runs folder + one configuration, as the grid executors run
    (:class:`steph.experiments.executors.Grid`)."""

    def __init__(self, data_root: str | Path, runs_root: str | Path,
                 cfg: ExperimentConfig | None = None, sources: Sequence[str] | None = None,
                 progress: bool = True):
        self.workspace = Workspace(data_root, runs_root, cfg, sources)
        self.runner = RunRunner(self.workspace, progress)
        self.progress = progress

    # -- what executors read -------------------------------------------------------------------
    @property
    def data_root(self) -> Path:
        return self.workspace.data_root

    @property
    def runs_root(self) -> Path:
        return self.workspace.runs_root

    @property
    def cfg(self) -> ExperimentConfig:
        return self.workspace.cfg

    @property
    def planner(self) -> Planner:
        return self.workspace.planner

    def plan(self, methods: Sequence[str], targets: Sequence[str], folds: Sequence[int],
             repeats: int = 1) -> list[RunRef]:
        return self.planner.plan(methods, targets, folds, repeats)

    def prerequisites(self, ref: RunRef) -> list[RunRef]:
        return self.planner.prerequisites(ref)

    def record_request(self, methods: Sequence[str], targets: Sequence[str],
                       folds: Sequence[int], repeats: int = 1, command: str = "cv") -> None:
        """Record in ``RUNS/requests.json`` which runs this request makes results (its targets
        with its methods, and with the target models its transfer methods merge), so that
        tables leave out the sources' input runs (:mod:`steph.runs.requests`)."""
        self.workspace.runs.record_request(
            targets, methods, self.planner.result_pairs(methods, targets), folds=folds,
            repeats=repeats, command=command)

    def prepare(self, refs: Sequence[RunRef]) -> dict[RunRef, str]:
        return self.workspace.prepare(refs)

    def is_finished(self, ref: RunRef) -> bool:
        return self.workspace.runs.run(ref).is_finished()

    def lease_path(self, ref: RunRef) -> Path:
        return self.workspace.runs.run(ref).lease

    def finished_metrics(self, ref: RunRef) -> dict[str, Any] | None:
        return self.runner.finished_metrics(ref)

    def run(self, ref: RunRef) -> dict[str, Any]:
        return self.runner.run(ref)

    def use_threads(self, cpus_per_run: float | None) -> None:
        """``train.threads`` following the CPUs a run gets (performance only: a run's identity
        and result do not change); an explicit ``train.threads`` is kept."""
        cfg = self.cfg
        if cpus_per_run is None or cfg.train.threads is not None:
            return
        threads = max(1, int(cpus_per_run))
        self.workspace.cfg = cfg.model_copy(
            update={"train": cfg.train.model_copy(update={"threads": threads})})

    def spec(self) -> dict[str, Any]:
        """Small, picklable arguments that rebuild this experiment in another process
        (:meth:`from_spec`)."""
        ws = self.workspace
        return {"data_root": str(ws.data_root.resolve()), "runs_root": str(ws.runs_root.resolve()),
                "config": self.cfg.to_dict(), "sources": ws.sources, "progress": self.progress}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Experiment:
        return cls(spec["data_root"], spec["runs_root"], build_config(spec["config"]),
                   sources=spec["sources"], progress=spec["progress"])

    def run_all(self, refs: Sequence[RunRef], executor: Any = None) -> list[dict[str, Any]]:
        """Run ``refs`` (prerequisites first) in this process (or with ``executor``); return
        their metrics in order. Raises :class:`~steph.experiments.executors.GridError` listing
        the runs that failed."""
        from steph.experiments.executors import GridError, LocalExecutor

        outcome = (executor or LocalExecutor()).run(self, refs)
        if outcome.failed:
            raise GridError(outcome.failed, len(refs))
        return [outcome.metrics[j] for j in refs]


def run_cv(data_root: str | Path, out: str | Path, methods: str | Sequence[str] = "abmil",
           targets: Sequence[str] | None = None, folds: str | Sequence[int] | None = None,
           cfg: ExperimentConfig | None = None, sources: Sequence[str] | None = None,
           progress: bool = True, repeats: int = 1, baseline: str = "abmil",
           executor: Any = "local") -> pd.DataFrame:
    """Run the grid and write ``out/summary.csv`` and ``out/summary.md``; return the summary
    (of every finished result run in ``out``: earlier calls' too, see
    :mod:`steph.runs.requests`).

    ``executor``: ``"local"`` (this process, one run after another), ``"ray"`` (a Ray task graph
    on a local Ray instance, or on the cluster ``ray.init`` is already connected to) or an
    executor object such as ``RayExecutor(address="auto", gpus_per_run=0.25)`` (see
    :mod:`steph.experiments.executors`). When runs fail, the summary of the finished ones is
    written first, then :class:`~steph.experiments.executors.GridError` lists the failed runs.

    Example::

        from steph.experiments import run_cv
        summary = run_cv("DATA", "RUNS", methods="abmil,steph", targets=["BLCA"], folds="0-4")
    """
    from steph.experiments.executors import GridError, make_executor
    from steph.experiments.summary import write_summary

    runner = make_executor(executor)
    exp = Experiment(data_root, out, cfg, sources=sources, progress=progress)
    method_names = resolve_methods(methods)
    target_names = list(targets) if targets else list(exp.workspace.cohort_names)
    exp.workspace.check_cohorts(target_names, "target")
    fold_ids = parse_folds(folds, exp.cfg.data.n_folds)
    refs = exp.plan(method_names, target_names, fold_ids, repeats)
    # every input the unfinished runs read (targets and sources), before any training
    exp.workspace.check_inputs([j for j in refs if not exp.is_finished(j)])
    exp.record_request(method_names, target_names, fold_ids, repeats)
    log.info("%d run(s) planned (%d already finished)", len(refs),
             sum(exp.is_finished(j) for j in refs))
    outcome = runner.run(exp, refs)
    # every finished result of the folder, not only this call's (a call with fewer methods
    # or targets must not hide the others)
    summary = write_summary(exp.runs_root, data_root=exp.data_root, methods=method_names,
                            baseline=baseline)
    if outcome.failed:
        raise GridError(outcome.failed, len(refs), summary=summary,
                        where=exp.runs_root / "summary.csv")
    return summary
