"""The cohort x fold x method grid: plan the runs a request needs, train what is missing in
dependency order (cancer-specific models first), skip what is finished, summarise.

Transfer methods for target t and fold k need the target's cancer-specific model of fold k and
every source's of fold 0 (method.md section 4), all of the runs folder's network ``model.arch``
(ABMIL by default; :meth:`Experiment.prerequisites`); ``run_cv`` trains them when they are
missing. Each network has its own shared initialisation in the runs folder.

Evaluation sees every patch wherever the network can compute a bag of any size exactly (ABMIL,
ILRA, Patch-GCN, R2T-MIL compute huge bags in pieces). A network that cannot (TransMIL) is
evaluated on whole bags unless ``data.eval_max_instances`` is set; then bags above it are
evaluated on a sample of their patches, which the log and ``metrics.json`` record
(``eval_policy``, ``eval_sampled_bags``).

Who runs the runs is an executor (``steph.experiments.executors``): in this process one after
another (``local``, the default) or as a Ray task graph on a cluster (``ray``). Either way the
run directories are the record, each run is held by a lease (``runs.RunLock``) while it trains,
and a run that fails fails only the runs that need it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from steph.config import ExperimentConfig
from steph.data.cohort import Cohort, discover_cohorts
from steph.data.dataset import BagDataset
from steph.data.loader import resolve_workers
from steph.data.splits import Split, has_split_files, load_or_create_splits
from steph.errors import ConfigError, DataError, RunError, StephError
from steph.experiments.runs import (
    METRICS,
    PREDICTIONS,
    WEIGHTS,
    check_or_write_config,
    ensure_theta0,
    graph_cache,
    is_finished,
    load_theta0,
    read_attempts,
    run_dir,
    start_over,
    theta0_path,
    write_run_record,
)
from steph.experiments.search import run_search, with_overrides
from steph.inference import save_artefact
from steph.merging.pool import ModelPool
from steph.methods import Method, MethodContext, config_for, get_method, resolve_methods
from steph.models.output import TrainingRestart
from steph.models.registry import model_class
from steph.survival.bins import TimeBins
from steph.survival.metrics import concordance_index
from steph.training.trainer import CHECKPOINT, fit, predict
from steph.utils.device import check_precision, device_description, resolve_device
from steph.utils.faults import fault_point
from steph.utils.io import read_json, remove_temporaries, save_tensors, write_csv, write_json

log = logging.getLogger("steph.experiments")


@dataclass(frozen=True)
class Job:
    """One run of the grid: a method on a cohort's fold, in one repeat of the CV (repeat r
    uses split seed ``data.split_seed + r``)."""

    cohort: str
    method: str
    fold: int
    repeat: int = 0

    def __str__(self) -> str:
        rep = f"rep{self.repeat}/" if self.repeat else ""
        return f"{self.cohort}/{self.method}/{rep}fold{self.fold}"

    def path(self, runs_root: str | Path) -> Path:
        return run_dir(runs_root, self.cohort, self.method, self.fold, self.repeat)


def parse_folds(spec: str | Sequence[int] | None, n_folds: int) -> list[int]:
    """"0-4", "0,2,3" or a list; None means all folds."""
    if spec is None:
        return list(range(n_folds))
    if isinstance(spec, str):
        out: list[int] = []
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                if "-" in part:
                    a, b = part.split("-", 1)
                    out += list(range(int(a), int(b) + 1))
                else:
                    out.append(int(part))
            except ValueError:
                raise ConfigError(f"folds must look like 0-4 or 0,2,3; got {spec!r}") from None
    else:
        out = [int(f) for f in spec]
    bad = [f for f in out if not 0 <= f < n_folds]
    if bad or not out:
        raise ConfigError(f"folds {bad or spec} out of range: there are {n_folds} folds (0-{n_folds - 1})")
    return list(dict.fromkeys(out))


class Experiment:
    """One data root + one runs directory + one configuration."""

    def __init__(self, data_root: str | Path, runs_root: str | Path, cfg: ExperimentConfig | None = None,
                 sources: Sequence[str] | None = None, progress: bool = True):
        self.data_root = Path(data_root)
        self.runs_root = Path(runs_root)
        self.cfg = cfg or ExperimentConfig()
        self.progress = progress
        # where every run of this process computes: checked now (a one-line error for a device
        # or precision this machine lacks), before any data is read
        self.device = resolve_device(self.cfg.train.device)
        check_precision(self.device, self.cfg.train.precision)
        self.workers = resolve_workers(self.cfg.data.workers)
        arch = self.cfg.model.arch
        model_class(arch)  # an unknown network: ConfigError naming the known ones
        base = get_method(arch)
        if base.needs_pool or base.network(self.cfg) != arch:
            raise ConfigError(f"model.arch {arch!r} has no cancer-specific method of its name")
        self.cohort_names = discover_cohorts(self.data_root, self.cfg.data.labels)
        if not self.cohort_names:
            raise DataError(f"no cohort under {self.data_root} (expected <cohort>/{self.cfg.data.labels})")
        self._sources = list(sources) if sources else None
        if self._sources:
            self._check_cohorts(self._sources, "source")
        self._cohorts: dict[str, Cohort] = {}
        self._splits: dict[tuple[str, int], list[Split]] = {}
        log.info("computing on %s (%s), %d data worker(s)", device_description(self.device),
                 self.cfg.train.precision, self.workers)

    def _check_cohorts(self, names: Iterable[str], what: str) -> None:
        unknown = [n for n in names if n not in self.cohort_names]
        if unknown:
            raise ConfigError(f"unknown {what} cohort(s) {unknown}; cohorts under {self.data_root}: "
                              f"{', '.join(self.cohort_names)}")

    # -- data --------------------------------------------------------------------------------
    def cohort(self, name: str) -> Cohort:
        if name not in self._cohorts:
            self._check_cohorts([name], "")
            d = self.cfg.data
            self._cohorts[name] = Cohort.load(
                self.data_root / name, labels=d.labels, convention=d.convention, endpoint=d.endpoint,
                time_unit=d.time_unit, on_bad_slide=d.on_bad_slide, check=d.check)
        return self._cohorts[name]

    def splits(self, name: str, repeat: int = 0) -> list[Split]:
        """The cohort's folds in repeat ``repeat`` (split seed ``data.split_seed + repeat``)."""
        if (name, repeat) not in self._splits:
            d = self.cfg.data
            cohort = self.cohort(name)
            out = self.runs_root / "splits" / name
            if repeat:
                if has_split_files(Path(cohort.root) / "splits"):
                    raise ConfigError(f"cohort {name!r} brings its own splits ({cohort.root / 'splits'}); "
                                      "--repeats needs folds that steph draws itself")
                out = out / f"rep{repeat}"
            self._splits[(name, repeat)] = load_or_create_splits(
                cohort, out, k=d.n_folds, seed=d.split_seed + repeat)
        return self._splits[(name, repeat)]

    def split(self, name: str, fold: int, repeat: int = 0) -> Split:
        splits = self.splits(name, repeat)
        for s in splits:
            if s.fold == fold:
                return s
        raise ConfigError(f"cohort {name!r} has no fold {fold} (folds: {[s.fold for s in splits]})")

    def sources_for(self, target: str) -> list[str]:
        names = self._sources or self.cohort_names
        return [n for n in names if n != target]

    def bins_for(self, cohort: Cohort, split: Split) -> TimeBins:
        b = self.cfg.bins
        if b.kind == "uniform":
            return TimeBins.uniform(b.n_bins, b.max_time)
        tr = cohort.patients.set_index("patient_id").loc[list(split.train_ids)]
        return TimeBins.quantile(tr["time"], tr["event"], b.n_bins)

    def datasets(self, cohort: Cohort, split: Split, bins: TimeBins) -> tuple[BagDataset, BagDataset]:
        """Training bags (patches sampled down to ``data.max_instances``) and test bags (never
        sampled: evaluation sees every patch)."""
        d = self.cfg.data
        kw = {"cache_mb": d.cache_mb, "seed": self.cfg.train.seed}
        return (BagDataset(cohort, list(split.train_ids), bins, max_instances=d.max_instances,
                           **kw),
                BagDataset(cohort, list(split.test_ids), bins, **kw))

    def _pipeline(self) -> dict[str, Any]:
        """How the trainer reads bags (data.workers, data.prefetch)."""
        return {"workers": self.workers, "prefetch": self.cfg.data.prefetch}

    def _predict(self, module, data: BagDataset, cfg: ExperimentConfig | None = None):
        """Predictions on ``data`` on this experiment's device, through the data pipeline."""
        return predict(module, data, device=self.device,
                       precision=(cfg or self.cfg).train.precision, workers=self.workers)

    def theta0(self, in_dim: int, arch: str = "abmil") -> Path:
        return ensure_theta0(self.runs_root, self.cfg.model, in_dim, self.cfg.bins.n_bins, arch)

    def eval_dataset(self, data: BagDataset, module: Any, cfg: ExperimentConfig | None = None
                     ) -> BagDataset:
        """``data`` as evaluation must see it: whole bags, except for a module that cannot
        compute a bag in pieces (``eval_in_pieces`` false or absent, e.g. TransMIL) when
        ``data.eval_max_instances`` is set: then bags above it are sampled."""
        limit = self._eval_limit(module, cfg or self.cfg)
        return data if data.max_instances == limit else data.resampled(limit)

    @staticmethod
    def _eval_limit(module: Any, cfg: ExperimentConfig) -> int | None:
        return None if getattr(module, "eval_in_pieces", False) else cfg.data.eval_max_instances

    # -- planning ----------------------------------------------------------------------------
    def prerequisites(self, job: Job) -> list[Job]:
        """Runs that must be finished before ``job`` starts: for a transfer method, the target's
        own cancer-specific model of the same fold and repeat, then every source's fold-0 model
        (method.md section 4; sources never see a target patient, so every repeat shares repeat
        0's), all of the network ``model.arch`` (the method of that name)."""
        if not get_method(job.method).needs_pool:
            return []
        base = self.cfg.model.arch
        return [Job(job.cohort, base, job.fold, job.repeat),
                *(Job(s, base, 0) for s in self.sources_for(job.cohort))]

    def plan(self, methods: Sequence[str], targets: Sequence[str], folds: Sequence[int],
             repeats: int = 1) -> list[Job]:
        """Every run needed, prerequisites first, each once."""
        if repeats < 1:
            raise ConfigError(f"repeats must be >= 1, got {repeats}")
        jobs: list[Job] = []
        for t in targets:
            for name in methods:
                for r in range(repeats):
                    for k in folds:
                        job = Job(t, name, k, r)
                        jobs += [*self.prerequisites(job), job]
        first = [j for j in jobs if not get_method(j.method).needs_pool]  # cancer-specific
        ordered = first + [j for j in jobs if get_method(j.method).needs_pool]
        return list(dict.fromkeys(ordered))

    def _prepare_one(self, job: Job, arch: str, unwritable: dict[str, str]) -> str:
        """Splits of ``job``'s cohort and its network's theta_0; the one-line error or ''. A
        theta_0 that could not be written (a full disk) stops every run of its network, with
        one error, instead of being retried cohort after cohort."""
        try:
            self.splits(job.cohort, job.repeat)
        except StephError as err:
            return one_line(err)
        try:
            self.theta0(self.cohort(job.cohort).feature_dim, arch)
        except RunError as err:
            unwritable[arch] = one_line(err)
            return unwritable[arch]
        except StephError as err:  # this cohort's input (e.g. its feature dimension)
            return one_line(err)
        return ""

    def prepare(self, jobs: Sequence[Job]) -> dict[Job, str]:
        """Create what runs share before any of them starts: the splits of every cohort and
        repeat in ``jobs`` and the theta_0 of each network they train (from the first cohort that
        loads). Returns the jobs whose cohort could not be prepared, with the one-line error
        (their runs cannot start)."""
        failed: dict[Job, str] = {}
        errors: dict[tuple[str, int, str], str] = {}
        unwritable: dict[str, str] = {}  # arch -> why its theta_0 could not be written
        for job in jobs:
            arch = get_method(job.method).network(self.cfg)  # the network's own theta_0
            key = (job.cohort, job.repeat, arch)
            if key not in errors:
                errors[key] = unwritable.get(arch) or self._prepare_one(job, arch, unwritable)
            if errors[key]:
                failed[job] = errors[key]
        return failed

    # -- one run -----------------------------------------------------------------------------
    def pool_for(self, job: Job) -> ModelPool:
        arch = self.cfg.model.arch
        _, meta = load_theta0(self.runs_root, arch)
        target, *sources = self.prerequisites(job)
        missing = [str(j.path(self.runs_root)) for j in (target, *sources)
                   if not is_finished(j.path(self.runs_root))]
        if missing:
            raise RunError(f"prerequisite runs not finished: {', '.join(missing)}")
        return self._pool(job, target.path(self.runs_root) / WEIGHTS, sources, meta)

    def _pool(self, job: Job, target: Path, sources: Sequence[Job], meta: dict) -> ModelPool:
        arch = self.cfg.model.arch
        return ModelPool.from_files(
            theta0_path(self.runs_root, arch), (job.cohort, target),
            [(s.cohort, s.path(self.runs_root) / WEIGHTS) for s in sources],
            hparams=meta["hparams"], arch=arch)

    def settings(self, job: Job) -> dict[str, Any]:
        """What decides a run's result: its identity and the config sections its method uses."""
        method = get_method(job.method)
        run = {"cohort": job.cohort, "method": job.method, "fold": job.fold,
               "data_root": str(self.data_root.resolve()),
               "sources": self.sources_for(job.cohort) if method.needs_pool else []}
        if job.repeat:  # repeat 0 keeps the identity runs had before repeats existed
            run["repeat"] = job.repeat
        return {"run": run, **config_for(method, self.cfg)}

    def finished_metrics(self, job: Job) -> dict[str, Any] | None:
        """Metrics of a finished run (None if unfinished); refuses one made with other settings."""
        path = job.path(self.runs_root)
        if not is_finished(path):
            return None
        check_or_write_config(path, self.settings(job))
        return read_json(path / METRICS)

    def run(self, job: Job) -> dict[str, Any]:
        """Train and evaluate one run unless it is finished; return its metrics.

        A method may first choose a setting by inner cross-validation (``Method.search``), and
        a module may ask for a fresh start with other settings (``TrainingRestart``, e.g.
        STEPH's collapse guard): each restart is recorded in ``attempts.json`` before the next
        attempt starts, so an interrupted run resumes the right attempt."""
        path = job.path(self.runs_root)
        done = self.finished_metrics(job)
        if done is not None:
            return done
        started_at = time.time()
        if path.is_dir():  # held under its lease: what a killed process left is ours to clear
            remove_temporaries(path, recursive=True)
        method: Method = get_method(job.method)
        cohort = self.cohort(job.cohort)
        split = self.split(job.cohort, job.fold, job.repeat)
        bins = self.bins_for(cohort, split)
        arch = method.network(self.cfg)
        path0 = self.theta0(cohort.feature_dim, arch)
        theta0, meta = load_theta0(self.runs_root, arch)
        if meta["hparams"]["in_dim"] != cohort.feature_dim:
            raise RunError(f"cohort {cohort.name!r} has {cohort.feature_dim}-d features but the "
                           f"experiment's theta_0 ({path0}) takes {meta['hparams']['in_dim']}-d")
        check_or_write_config(path, self.settings(job))
        train_ds, test_ds = self.datasets(cohort, split, bins)
        t0 = time.perf_counter()
        cfg, info = self.cfg, {}
        spec = method.search(cfg) if method.search is not None else None
        if spec is not None:
            found = self._search(job, method, spec, cohort, split, theta0, meta)
            cfg = with_overrides(cfg, {spec.key: found.value})
            info.update(found.metrics())
        attempts = read_attempts(path)
        for attempt in attempts:
            cfg = with_overrides(cfg, attempt["overrides"])
        history: list[dict[str, Any]] = []
        resumed_from = 0
        while True:
            ctx = self._context(job, cfg, cohort, bins, theta0, meta, train_ds, test_ds, path,
                                pool_loader=(lambda: self.pool_for(job)) if method.needs_pool else None)
            built = _build(method, ctx)
            for ds in (train_ds, test_ds):
                ds.set_bag_inputs(dict(built.bag_inputs))
            test_eval = self.eval_dataset(test_ds, built.module, cfg)
            if not method.trains:
                break
            try:
                result = fit(built.module, train_ds, cfg.train, path, test=test_eval,
                             progress=self.progress, desc=str(job), **self._pipeline())
                history, resumed_from = result.history, result.resumed_from
                break
            except TrainingRestart as restart:
                attempts.append(start_over(path, restart, len(attempts)))
                log.warning("%s: %s; starting again with %s", job, restart.reason,
                            ", ".join(f"{k}={v}" for k, v in restart.overrides.items()))
                cfg = with_overrides(cfg, restart.overrides)
        if attempts:
            info["restarts"] = attempts
        seconds = time.perf_counter() - t0
        return self._finish(path, job, built, bins, cohort, train_ds, test_eval, history,
                            seconds, info, cfg, started_at=started_at,
                            resumed_after_epoch=resumed_from)

    def _context(self, job: Job, cfg: ExperimentConfig, cohort: Cohort, bins: TimeBins,
                 theta0: dict, meta: dict, train_ds: BagDataset, test_ds: BagDataset | None,
                 path: Path, pool_loader=None) -> MethodContext:
        return MethodContext(
            cfg=cfg, target=job.cohort, fold=job.fold, hparams=meta["hparams"], theta0=theta0,
            bins=bins, n_patients=len(cohort), n_train=len(train_ds),
            train_bins=train_ds.bin_indices, train_events=train_ds.events, run_dir=path,
            train_data=train_ds, test_data=test_ds, pool_loader=pool_loader,
            arch=meta.get("model", "abmil"), cohort=cohort,
            graph_dir=graph_cache(self.runs_root, cohort.name))

    def _search(self, job: Job, method: Method, spec, cohort: Cohort, split: Split,
                theta0: dict, meta: dict):
        """Run (or resume) ``spec``'s inner cross-validation on ``job``'s training patients."""
        target_job, *sources = self.prerequisites(job)
        target_method = get_method(target_job.method)
        patients = (cohort.patients.set_index("patient_id").loc[list(split.train_ids)]
                    .reset_index()[["patient_id", "time", "event"]])
        weights = WEIGHTS

        def inner_data(j: int, train_ids, val_ids):
            inner = Split(j, tuple(train_ids), tuple(val_ids))
            bins = self.bins_for(cohort, inner)
            train, val = self.datasets(cohort, inner, bins)
            return bins, train, val

        def train_target(j: int, train_ids, run: Path) -> Path:
            if not (run / weights).exists():
                bins, train, _ = inner_data(j, train_ids, ())
                ctx = self._context(job, self.cfg, cohort, bins, theta0, meta, train, None, run)
                built = _build(target_method, ctx)
                train.set_bag_inputs(dict(built.bag_inputs))
                fit(built.module, train, self.cfg.train, run, progress=False,
                    desc=f"{job} search target {j}", **self._pipeline())
                save_tensors(run / weights, built.module.state_dict())
                fault_point("search:target")
                (run / CHECKPOINT).unlink(missing_ok=True)
            return run / weights

        def train_candidate(j: int, value, train_ids, val_ids, target: Path, run: Path) -> float:
            bins, train, val = inner_data(j, train_ids, val_ids)
            cfg = with_overrides(self.cfg, {spec.key: value})
            pool = lambda: self._pool(job, target, sources, meta)
            ctx = self._context(job, cfg, cohort, bins, theta0, meta, train, val, run, pool)
            built = _build(method, ctx)
            for ds in (train, val):
                ds.set_bag_inputs(dict(built.bag_inputs))
            val = self.eval_dataset(val, built.module, cfg)
            try:
                fit(built.module, train, cfg.train, run, progress=False,
                    desc=f"{job} search {spec.key}={value} inner {j}", **self._pipeline())
            except TrainingRestart as restart:  # e.g. collapsed: scored as it stands
                log.info("%s search %s=%s inner %d: %s", job, spec.key, value, j, restart.reason)
            module = built.export() if built.export is not None else built.module
            return _cindex(self._predict(module, val, cfg)[0])

        return run_search(spec, job.path(self.runs_root) / "search", patients,
                          self.cfg.data.split_seed, train_target, train_candidate,
                          outer_target=target_job.path(self.runs_root) / weights)

    def _finish(self, path: Path, job: Job, built, bins: TimeBins, cohort: Cohort,
                train_ds: BagDataset, test_ds: BagDataset, history: list[dict[str, Any]],
                seconds: float, info: dict[str, Any] | None = None,
                cfg: ExperimentConfig | None = None, started_at: float | None = None,
                resumed_after_epoch: int = 0) -> dict[str, Any]:
        """Predictions, artefact, run.json and, last, metrics.json (which depends only on the
        command and the data, never on timing: reruns give the same bytes). ``test_ds`` is the
        test set as evaluation sees it (:meth:`eval_dataset`)."""
        cfg = cfg or self.cfg
        module = built.export() if built.export is not None else built.module
        train_eval = self.eval_dataset(train_ds, built.module, cfg)
        test_pred, test_curves = self._predict(module, test_ds, cfg)
        train_pred, _ = self._predict(module, train_eval, cfg)
        preds = pd.concat([train_pred.assign(split="train"), test_pred.assign(split="test")])
        preds = preds[["patient_id", "split", "risk", "time", "event"]]
        metrics: dict[str, Any] = {
            "cohort": job.cohort, "method": job.method, "fold": job.fold, "repeat": job.repeat,
            "c_index": _cindex(test_pred), "train_c_index": _cindex(train_pred),
            "n_train": len(train_ds), "n_test": len(test_ds),
            "test_events": int(test_pred["event"].sum()),
            "epochs": len(history),
        }
        metrics.update(self._eval_facts(job, built.module, cfg, test_ds, train_eval))
        metrics.update(_extra_metrics(train_pred, test_pred, test_curves, bins))
        if built.info is not None:
            metrics.update(built.info(history))
        metrics.update(info or {})
        save_artefact(path / "model.safetensors", module, built.kind, built.settings(), bins,
                      cohort.feature_dim, info={"cohort": job.cohort, "method": job.method,
                                                "fold": job.fold, "repeat": job.repeat})
        write_csv(path / PREDICTIONS, preds)
        # epochs that ran before a resume count too: their times are in the history
        train_seconds = sum(r.get("seconds", 0.0) for r in history) if history else seconds
        write_run_record(path, train_seconds=train_seconds, history=history,
                         started_at=started_at, resumed_after_epoch=resumed_after_epoch,
                         device=device_description(self.device))
        write_json(path / METRICS, metrics)  # last: the run is finished
        (path / CHECKPOINT).unlink(missing_ok=True)
        log.info("%s: test C-index %.4f", job, metrics["c_index"])
        return metrics

    def _eval_facts(self, job: Job, module: Any, cfg: ExperimentConfig, test_ds: BagDataset,
                    train_eval: BagDataset) -> dict[str, Any]:
        """How the bags were evaluated (``eval_policy``) and how many were sampled."""
        limit = self._eval_limit(module, cfg)
        if getattr(module, "eval_in_pieces", False):
            policy = "exact"  # every patch, huge bags computed in pieces
        elif limit is None:
            policy = "exact, whole bags"
        else:
            policy = f"patches sampled above {limit} per bag"
        n_test, n_train = test_ds.n_sampled(), train_eval.n_sampled()
        if n_test or n_train:
            log.warning("%s: %d test and %d training bag(s) above data.eval_max_instances=%d "
                        "evaluated on a sample of their patches (%s cannot compute a bag in "
                        "pieces)", job, n_test, n_train, limit, type(module).__name__)
        return {"eval_policy": policy, "eval_sampled_bags": n_test,
                "train_eval_sampled_bags": n_train}

    def run_all(self, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        """Run ``jobs`` (prerequisites first) in this process; return their metrics in order.
        Raises :class:`~steph.experiments.executors.GridError` listing the runs that failed."""
        from steph.experiments.executors import GridError, LocalExecutor

        outcome = LocalExecutor().run(self, jobs)
        if outcome.failed:
            raise GridError(outcome.failed, len(jobs))
        return [outcome.metrics[j] for j in jobs]


def one_line(err: BaseException, limit: int = 400) -> str:
    """An error as one line (its lines joined, at most ``limit`` characters): the message of
    a steph error, else ``Type: message``."""
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    if not isinstance(err, StephError):
        text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _build(method: Method, ctx: MethodContext):
    """``method.build(ctx)`` from a seeded RNG: a fresh module's random parts (e.g. STEPH's
    hypernetworks) depend on the run's settings only, not on which runs this process trained
    before (a local grid, a Ray worker, a retry)."""
    torch.manual_seed(ctx.cfg.train.seed)
    return method.build(ctx)


def _cindex(pred: pd.DataFrame) -> float:
    try:
        return float(concordance_index(pred["time"].to_numpy(), pred["event"].to_numpy(),
                                       pred["risk"].to_numpy()))
    except ValueError:
        return float("nan")


def _extra_metrics(train: pd.DataFrame, test: pd.DataFrame, curves: np.ndarray,
                   bins: TimeBins) -> dict[str, float]:
    """Uno's IPCW C-index and the integrated Brier score, when the data allow them."""
    from steph.survival import metrics as M

    out: dict[str, float] = {}
    args = (train["time"].to_numpy(), train["event"].to_numpy(), test["time"].to_numpy(),
            test["event"].to_numpy())
    try:
        out["uno_c_index"] = float(M.uno_concordance_index(*args, test["risk"].to_numpy()))
    except (ValueError, AttributeError):
        pass
    try:
        times = bins.end_times
        lo, hi = test["time"].min(), test["time"].max()
        keep = (times >= lo) & (times < hi)
        if keep.sum() >= 2:
            out["ibs"] = float(M.integrated_brier_score(*args, curves[:, keep], times[keep]))
    except (ValueError, AttributeError):
        pass
    return out


def run_cv(data_root: str | Path, out: str | Path, methods: str | Sequence[str] = "abmil",
           targets: Sequence[str] | None = None, folds: str | Sequence[int] | None = None,
           cfg: ExperimentConfig | None = None, sources: Sequence[str] | None = None,
           progress: bool = True, repeats: int = 1, baseline: str = "abmil",
           executor: Any = "local") -> pd.DataFrame:
    """Run the grid and write ``out/summary.csv`` and ``out/summary.md``; return the summary.

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
    target_names = list(targets) if targets else list(exp.cohort_names)
    exp._check_cohorts(target_names, "target")
    fold_ids = parse_folds(folds, exp.cfg.data.n_folds)
    jobs = exp.plan(method_names, target_names, fold_ids, repeats)
    log.info("%d run(s) planned (%d already finished)", len(jobs),
             sum(is_finished(j.path(exp.runs_root)) for j in jobs))
    outcome = runner.run(exp, jobs)
    summary = write_summary(exp.runs_root, data_root=exp.data_root, targets=target_names,
                            methods=method_names, folds=fold_ids, repeats=repeats,
                            baseline=baseline)
    if outcome.failed:
        raise GridError(outcome.failed, len(jobs), summary=summary,
                        where=exp.runs_root / "summary.csv")
    return summary
