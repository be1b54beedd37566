"""One run of the grid, from its settings to its records.

For a run (cohort, method, fold, repeat): check or record its settings (``config.yaml``),
build the method's module from a :class:`~steph.methods.MethodContext`, train it with the
shared trainer, restarting when the method asks (a ``TrainingRestart``, e.g. STEPH's collapse
guard, recorded in ``attempts.json`` before the next attempt starts, so an interrupted run
resumes the right attempt), then hand it to :func:`steph.experiments.writer.write_run`. A
method that wants a setting chosen first by inner cross-validation (``Method.search``) gets it
from :mod:`steph.experiments.search`, which trains its inner models with the same
:meth:`RunRunner.train`.

Evaluation sees every patch wherever the module can compute a bag of any size exactly
(``eval_in_pieces``). A module that cannot (TransMIL) is evaluated on whole bags unless
``data.eval_max_instances`` is set; then bags above it are evaluated on a sample of their
patches, which the log and ``metrics.json`` record (``eval_policy``, ``eval_sampled_bags``).

Determinism: a run's result depends only on its settings and data, not on the runs the process
ran before: torch is seeded with ``train.seed`` before every module is built, and the trainer
reseeds before training and restores the RNG on resume.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from steph.config import ExperimentConfig
from steph.data.cohort import Cohort
from steph.data.dataset import BagDataset
from steph.data.loader import resolve_workers
from steph.errors import ConfigError, RunError
from steph.experiments.search import run_search, with_overrides
from steph.experiments.workspace import Workspace
from steph.experiments.writer import TrainedRun, frame_cindex, write_run
from steph.merging.pool import ModelPool
from steph.methods import Built, InnerTarget, Method, MethodContext, config_for, get_method
from steph.models import check_module, model_class
from steph.runs import RunDir, RunRef
from steph.survival.bins import TimeBins
from steph.training.trainer import TrainingRestart, fit, predict
from steph.utils.device import check_precision, device_description, resolve_device
from steph.utils.io import remove_temporaries, save_tensors

log = logging.getLogger("steph.experiments")


def build(method: Method, ctx: MethodContext) -> Built:
    """``method.build(ctx)`` from a seeded RNG (a fresh module's random parts depend on the
    run's settings only, not on which runs this process trained before: a local grid, a Ray
    worker, a retry), its module checked against the trainer's contract."""
    torch.manual_seed(ctx.cfg.train.seed)
    built = method.build(ctx)
    check_module(built.module, f"the module of method {method.name!r}")
    return built


class RunRunner:
    """Trains and records runs of a :class:`Workspace` in this process, on ``train.device``."""

    def __init__(self, workspace: Workspace, progress: bool = True):
        self.ws = workspace
        self.progress = progress
        cfg = workspace.cfg
        arch = cfg.model.arch
        model_class(arch)  # an unknown network: ConfigError naming the known ones
        base = get_method(arch)
        if base.needs_pool or base.network(cfg) != arch:
            raise ConfigError(f"model.arch {arch!r} has no cancer-specific method of its name")
        # where every run of this process computes: checked now (a one-line error for a device
        # or precision this machine lacks), before any data is read
        self.device = resolve_device(cfg.train.device)
        check_precision(self.device, cfg.train.precision)
        self.workers = resolve_workers(cfg.data.workers)
        log.info("computing on %s (%s), %d data worker(s)", device_description(self.device),
                 cfg.train.precision, self.workers)

    @property
    def cfg(self) -> ExperimentConfig:
        return self.ws.cfg

    @property
    def runs(self):
        return self.ws.runs

    # -- identity -----------------------------------------------------------------------------
    def settings(self, ref: RunRef) -> dict[str, Any]:
        """What decides a run's result: its identity and the config sections its method uses."""
        method = get_method(ref.method)
        run = {"cohort": ref.cohort, "method": ref.method, "fold": ref.fold,
               "data_root": str(self.ws.data_root.resolve()),
               "sources": (self.ws.sources_for(ref.cohort)
                           if method.needs_pool or method.uses_sources else [])}
        if ref.repeat:  # repeat 0 keeps the identity runs had before repeats existed
            run["repeat"] = ref.repeat
        return {"run": run, **config_for(method, self.cfg)}

    def finished_metrics(self, ref: RunRef) -> dict[str, Any] | None:
        """Metrics of a finished run (None if unfinished); refuses one made with other settings."""
        run = self.ws.runs.run(ref)
        if not run.is_finished():
            return None
        run.check_or_write_settings(self.settings(ref))
        return run.read_metrics()

    # -- evaluation ----------------------------------------------------------------------------
    def eval_dataset(self, data: BagDataset, module: Any, cfg: ExperimentConfig) -> BagDataset:
        """``data`` as evaluation must see it: whole bags, except for a module that cannot
        compute a bag in pieces when ``data.eval_max_instances`` is set."""
        limit = None if module.eval_in_pieces else cfg.data.eval_max_instances
        return data if data.max_instances == limit else data.resampled(limit)

    def predict(self, module: Any, data: BagDataset, cfg: ExperimentConfig | None = None
                ) -> tuple[pd.DataFrame, Any]:
        """Predictions on ``data`` on this runner's device, through the data pipeline."""
        return predict(module, data, device=self.device,
                       precision=(cfg or self.cfg).train.precision, workers=self.workers)

    def eval_facts(self, ref: RunRef, module: Any, cfg: ExperimentConfig, test: BagDataset,
                   train: BagDataset) -> dict[str, Any]:
        """How the bags were evaluated (``eval_policy``) and how many were sampled."""
        limit = None if module.eval_in_pieces else cfg.data.eval_max_instances
        if module.eval_in_pieces:
            policy = "exact"  # every patch, huge bags computed in pieces
        elif limit is None:
            policy = "exact, whole bags"
        else:
            policy = f"patches sampled above {limit} per bag"
        n_test, n_train = test.n_sampled(), train.n_sampled()
        if n_test or n_train:
            log.warning("%s: %d test and %d training bag(s) above data.eval_max_instances=%d "
                        "evaluated on a sample of their patches (%s cannot compute a bag in "
                        "pieces)", ref, n_test, n_train, limit, type(module).__name__)
        return {"eval_policy": policy, "eval_sampled_bags": n_test,
                "train_eval_sampled_bags": n_train}

    # -- building and training ---------------------------------------------------------------------
    def context(self, ref: RunRef, cfg: ExperimentConfig, cohort: Cohort, bins: TimeBins,
                theta0: dict, meta: dict, train: BagDataset, test: BagDataset | None,
                path: Path, pool: Callable[[], ModelPool] | None = None,
                inner: list[InnerTarget] | None = None) -> MethodContext:
        return MethodContext(
            cfg=cfg, target=ref.cohort, fold=ref.fold, hparams=meta["hparams"], theta0=theta0,
            bins=bins, n_patients=len(cohort), n_train=len(train),
            train_bins=train.bin_indices, train_events=train.events, run_dir=path,
            train_data=train, test_data=test, pool_loader=pool, arch=meta["model"],
            cohort=cohort, graph_dir=self.ws.runs.graphs(cohort.name),
            sources=self.ws.sources_for(ref.cohort), load_cohort=self.ws.cohort,
            graph_dirs=self.ws.runs.graphs, inner_targets=inner)

    def train(self, ref: RunRef, method: Method, cfg: ExperimentConfig, cohort: Cohort,
              bins: TimeBins, train: BagDataset, evaluate: BagDataset | None, path: Path,
              pool: Callable[[], ModelPool] | None = None, *, attempts: list | None = None,
              desc: str | None = None, progress: bool | None = None, watch: bool = True,
              inner: list[InnerTarget] | None = None
              ) -> tuple[Built, TrainedRun, ExperimentConfig, BagDataset | None]:
        """Build ``method`` for this run and train it in ``path`` (resuming what is there).

        ``evaluate``: the bags the run is evaluated on (None: none), which the trainer also
        scores during training (``train.eval_every``) unless ``watch`` is off. ``attempts``: the
        run's recorded restarts (their overrides are applied, and a new restart is recorded
        and started); None: a restart is not made, the module is kept as it stands (inner
        search candidates). Returns the built module, what training left, the settings it
        trained with and ``evaluate`` as evaluation sees it."""
        theta0, meta = self.ws.load_theta0(method.network(self.cfg))
        run = RunDir(path)
        for attempt in attempts or []:
            cfg = with_overrides(cfg, attempt["overrides"])
        history: list[dict[str, Any]] = []
        resumed_from = 0
        while True:
            ctx = self.context(ref, cfg, cohort, bins, theta0, meta, train, evaluate, path, pool,
                               inner)
            built = build(method, ctx)
            for ds in (train, evaluate):
                if ds is not None:
                    ds.set_bag_inputs(dict(built.bag_inputs))
            scored = self.eval_dataset(evaluate, built.module, cfg) if evaluate is not None else None
            if not method.trains:
                break
            try:
                result = fit(built.module, train if built.train_data is None else built.train_data,
                             cfg.train, path,
                             test=scored if watch else None,
                             progress=self.progress if progress is None else progress,
                             desc=desc or str(ref), on_epoch_end=built.on_epoch_end,
                             workers=self.workers, prefetch=cfg.data.prefetch)
                history, resumed_from = result.history, result.resumed_from
                break
            except TrainingRestart as restart:
                if attempts is None:  # kept as it stands (e.g. collapsed): scored so
                    log.info("%s: %s", desc or ref, restart.reason)
                    break
                attempts.append(start_over(run, restart, len(attempts)))
                log.warning("%s: %s; starting again with %s", ref, restart.reason,
                            ", ".join(f"{k}={v}" for k, v in restart.overrides.items()))
                cfg = with_overrides(cfg, restart.overrides)
        info = {"restarts": attempts} if attempts else {}
        return built, TrainedRun(built, history, resumed_from, info), cfg, scored

    # -- one run -----------------------------------------------------------------------------------
    def run(self, ref: RunRef) -> dict[str, Any]:
        """Train and evaluate one run unless it is finished; return its metrics."""
        done = self.finished_metrics(ref)
        if done is not None:
            return done
        started_at = time.time()
        run = self.ws.runs.run(ref)
        if run.path.is_dir():  # held under its lease: what a killed process left is ours to clear
            remove_temporaries(run.path, recursive=True)
        method = get_method(ref.method)
        cohort = self.ws.cohort(ref.cohort)
        split = self.ws.split(ref.cohort, ref.fold, ref.repeat)
        bins = self.ws.bins_for(cohort, split)
        arch = method.network(self.cfg)
        path0 = self.ws.theta0(cohort.feature_dim, arch)
        _, meta = self.ws.load_theta0(arch)
        if meta["hparams"]["in_dim"] != cohort.feature_dim:
            raise RunError(f"cohort {cohort.name!r} has {cohort.feature_dim}-d features but the "
                           f"experiment's theta_0 ({path0}) takes {meta['hparams']['in_dim']}-d")
        run.check_or_write_settings(self.settings(ref))
        train_ds, test_ds = self.ws.datasets(cohort, split, bins)
        t0 = time.perf_counter()
        cfg, info = self.cfg, {}
        spec = method.search(cfg) if method.search is not None else None
        if spec is not None:
            found = run_search(self, ref, method, spec, cohort, split)
            cfg = with_overrides(cfg, {spec.key: found.value})
            info.update(found.metrics())
        pool = (lambda: self.ws.pool(ref)) if method.needs_pool else None
        n_inner = method.inner_targets(cfg) if method.inner_targets is not None else None
        inner = self.inner_targets(ref, cohort, split, n_inner) if n_inner else None
        built, trained, cfg, test_eval = self.train(
            ref, method, cfg, cohort, bins, train_ds, test_ds, run.path, pool,
            attempts=run.read_attempts(), inner=inner)
        trained.info = {**info, **trained.info}
        train_eval = self.eval_dataset(train_ds, built.module, cfg)
        facts = self.eval_facts(ref, built.module, cfg, test_eval, train_eval)
        return write_run(run, ref, trained, bins=bins, cohort=cohort, n_train=len(train_ds),
                         train_eval=train_eval, test_eval=test_eval, eval_facts=facts,
                         predict=lambda module, data: self.predict(module, data, cfg),
                         seconds=time.perf_counter() - t0, started_at=started_at,
                         device=device_description(self.device))

    # -- what an inner search trains (steph.experiments.search) -------------------------------
    def inner_datasets(self, cohort: Cohort, fold: int, train_ids, val_ids
                       ) -> tuple[TimeBins, BagDataset, BagDataset]:
        from steph.data.splits import Split

        inner = Split(fold, tuple(train_ids), tuple(val_ids))
        bins = self.ws.bins_for(cohort, inner)
        train, val = self.ws.datasets(cohort, inner, bins)
        return bins, train, val

    def train_inner_target(self, ref: RunRef, cohort: Cohort, fold: int, train_ids,
                           path: Path) -> Path:
        """The target's own model trained on an inner training split (weights in ``path``)."""
        target_method = get_method(self.ws.planner.prerequisites(ref)[0].method)
        weights = RunDir(path).weights
        if not weights.exists():
            bins, train, _ = self.inner_datasets(cohort, fold, train_ids, ())
            built, _, _, _ = self.train(ref, target_method, self.cfg, cohort, bins, train, None,
                                        path, desc=f"{ref} search target {fold}",
                                        progress=False)
            save_tensors(weights, built.module.state_dict())
            from steph.utils.faults import fault_point

            fault_point("search:target")
            RunDir(path).checkpoint.unlink(missing_ok=True)
        return weights

    def inner_targets(self, ref: RunRef, cohort: Cohort, split, folds: int
                      ) -> list[InnerTarget]:
        """Cross-fitting's inner target models of run ``ref`` (``<run>/crossfit/inner<j>``,
        resumed when there): the run's training patients in ``folds`` inner folds (stratified,
        seeded by ``data.split_seed``, as an inner search's), model j trained from theta_0 on
        all of them but fold j and scored on fold j."""
        from steph.data.splits import create_splits
        from steph.utils.io import read_json, write_json

        patients = (cohort.patients.set_index("patient_id").loc[list(split.train_ids)]
                    .reset_index()[["patient_id", "time", "event"]])
        root = self.ws.runs.run(ref).path / "crossfit"
        out = []
        for j, part in enumerate(create_splits(patients, k=folds, seed=self.cfg.data.split_seed)):
            path = root / f"inner{j}"
            score = path / "score.json"
            weights = self.train_inner_target(ref, cohort, j, part.train_ids, path)
            if not score.exists():
                _, _, held = self.inner_datasets(cohort, j, (), part.test_ids)
                write_json(score, {"c_index": self._score_weights(ref, cohort, weights, held),
                                   "n_train": len(part.train_ids),
                                   "n_held_out": len(part.test_ids)})
            out.append(InnerTarget(weights, tuple(part.test_ids),
                                   float(read_json(score)["c_index"])))
        return out

    def _score_weights(self, ref: RunRef, cohort: Cohort, weights: Path,
                       bags: BagDataset) -> float:
        """Harrell's C on ``bags`` of the target's network holding ``weights``."""
        from steph.data.bag_inputs import cohort_providers
        from steph.models import create_model
        from steph.utils.io import load_tensors

        arch = self.ws.planner.prerequisites(ref)[0].method
        _, meta = self.ws.load_theta0(arch)
        model = create_model(arch, **meta["hparams"])
        model.load_state_dict(load_tensors(weights))
        bags.set_bag_inputs(cohort_providers(model.bag_inputs, cohort,
                                             self.ws.runs.graphs(cohort.name)))
        return frame_cindex(self.predict(model, bags)[0])

    def score_candidate(self, ref: RunRef, method: Method, cohort: Cohort, key: str, value: Any,
                        fold: int, train_ids, val_ids, target_weights: Path, path: Path) -> float:
        """One candidate value of ``key`` trained on an inner training split, scored by
        Harrell's C on its validation patients."""
        bins, train, val = self.inner_datasets(cohort, fold, train_ids, val_ids)
        cfg = with_overrides(self.cfg, {key: value})
        built, _, cfg, val = self.train(
            ref, method, cfg, cohort, bins, train, val, path,
            lambda: self.ws.pool(ref, target_weights),
            desc=f"{ref} search {key}={value} inner {fold}", progress=False, watch=False)
        module = built.export() if built.export is not None else built.module
        return frame_cindex(self.predict(module, val, cfg)[0])


def start_over(run: RunDir, restart: TrainingRestart, n_before: int) -> dict[str, Any]:
    """Record a restart and clear the run for the next attempt: the checkpoints go first (a
    process killed here redoes the same attempt, which ends the same way), the finished
    attempt's log is kept as ``log.attempt<n>.jsonl``, then ``attempts.json`` is written."""
    import os

    from steph.utils.faults import fault_point

    history = run.read_log()
    for ckpt in sorted(run.path.glob(RunDir.CHECKPOINT.replace(".safetensors", "*.safetensors"))):
        ckpt.unlink()
        fault_point("restart:checkpoint")
    if run.log.exists():
        os.replace(run.log, run.attempt_log(n_before))
        fault_point("restart:log")
    entry = {"reason": restart.reason, "overrides": restart.overrides,
             "stopped_after_epoch": history[-1]["epoch"] if history else 0}
    run.write_attempts([*run.read_attempts(), entry])
    return entry
