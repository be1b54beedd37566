"""STEPH (method.md section 5), its ablations (Table S5) and the K sweep (Table S3), over the
runs folder's network (``model.arch``: ABMIL by default, or any registered MIL network).

Cross-fitting (``steph.crossfit`` = J >= 2, or the method ``steph_xfit``: J = 5; a departure,
off by default, docs/method-notes.md): the recipe declares J inner target models
(``Method.inner_targets``); the runner trains them (``<run>/crossfit/inner<j>``) and hands them
over as ``MethodContext.inner_targets``. Every training patient is merged with the inner target
task vector of the model that never saw it (the per-bag input ``tau_row``), the screening
probes embed it with that model's encoder (``steph.crossfit_screen``), and the saved module is
a plain STEPH with the fold model's tau_t (or the inner ones' mean, ``steph.crossfit_test``).
The candidates of an inner gamma search get no inner target models: they train without
cross-fitting.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from steph.config import ExperimentConfig, StephConfig
from steph.merging.steph import CROSSFIT_INPUT, STEPH
from steph.merging.task_vectors import TensorDict, task_vector
from steph.training.trainer import TrainingRestart
from steph.methods.networks import example_bag_inputs, network_bag_inputs, random_task_vectors
from steph.methods.registry import (
    Built,
    CostSpec,
    InnerTarget,
    Method,
    MethodContext,
    SearchSpec,
    register_method,
    register_method_pattern,
)

log = logging.getLogger("steph.methods")

STEPH_SECTIONS = ("data", "bins", "model", "train", "steph")


def steph_method(name: str, summary: str, **overrides: Any) -> Method:
    """A STEPH variant: ``overrides`` replace settings of the ``steph`` config section."""

    def settings(cfg: ExperimentConfig) -> StephConfig:
        return type(cfg.steph).model_validate({**cfg.steph.model_dump(), **overrides})

    def build(ctx: MethodContext) -> Built:
        cfg = settings(ctx.cfg)
        pool = ctx.pool()
        stack = pool.stack()
        # cross-fitting: the runner's inner target models (none for an inner search's candidates)
        crossfit = CrossFit.load(ctx.inner_targets, pool) if cfg.crossfit else None
        inner_tau = None
        if crossfit is not None:
            inner_tau = torch.stack([stack.layout.flatten(t) for t in crossfit.taus])
        # a fresh head drawn at random; where it starts is train.head_init's (the trainer's)
        model = STEPH(stack, ctx.hparams, cfg, head_seed=ctx.cfg.train.seed,
                      n_patients=ctx.n_patients, arch=ctx.arch, inner_tau=inner_tau)
        bag_inputs = network_bag_inputs(ctx, ctx.arch)
        if crossfit is not None:
            bag_inputs[CROSSFIT_INPUT] = InnerRows(crossfit.fold_of)
        screening: dict[str, Any] = {}
        if cfg.w_init == "screened":
            screening = screen_sources(pool, ctx.hparams, ctx.arch, ctx.train_data,
                                       bag_inputs, ctx.cfg.train.loss_alpha, ctx.cfg.train.seed,
                                       inner=crossfit if cfg.crossfit_screen else None,
                                       ridge=cfg.screen_ridge)
            w, lam = screened_start(screening, model.source_names, model.top_k)
            model.start_merge_at(w, lam)
        facts = crossfit.facts(cfg) if crossfit is not None else {}
        return Built(module=model, kind="steph", settings=model.settings,
                     info=lambda history: {**merge_facts(model, history), **screening, **facts},
                     bag_inputs=bag_inputs, on_epoch_end=CollapseGuard(model),
                     export=model.without_crossfit if crossfit is not None else None)

    def cost(spec: CostSpec):
        """STEPH over ``spec.arch`` with m = ``spec.n_sources`` random source task vectors."""
        cfg = StephConfig.model_validate({**StephConfig().model_dump(), **overrides})
        stack, hparams = random_task_vectors(spec, spec.n_sources + 1)
        model = STEPH(stack, hparams, cfg, arch=spec.arch).eval()
        return model, example_bag_inputs(model, spec.n_instances)

    return Method(name, summary, needs_pool=True, trains=True, build=build,
                  config_sections=STEPH_SECTIONS, search=gamma_search, cost_model=cost,
                  inner_targets=lambda cfg: settings(cfg).crossfit or None)


class InnerRows:
    """The per-bag input ``tau_row``: patient id -> the inner target model that never saw the
    patient (-1: none held it out, a test patient: tau_t). A plain class (picklable for the
    data workers)."""

    def __init__(self, fold_of: dict[str, int]):
        self.fold_of = dict(fold_of)

    def __call__(self, patient_id: str) -> torch.Tensor:
        return torch.tensor(self.fold_of.get(patient_id, -1), dtype=torch.int64)


@dataclass
class CrossFit:
    """The inner target models of a run as STEPH uses them: their task vectors over the MIL
    encoder, the inner fold of every training patient and each model's held-out C-index."""

    taus: list[TensorDict]
    fold_of: dict[str, int]
    cindex: list[float]

    @classmethod
    def load(cls, inner: list[InnerTarget] | None, pool) -> CrossFit | None:
        """From the runner's inner target models (None when the run has none, e.g. a
        candidate of an inner search)."""
        if not inner:
            return None
        from steph.utils.io import load_tensors

        names = pool.encoder_names
        taus, fold_of = [], {}
        for j, target in enumerate(inner):
            state = load_tensors(target.weights)
            taus.append(task_vector(state, pool.theta0, names))
            for pid in target.held_out:
                if pid in fold_of:
                    raise ValueError(f"patient {pid!r} is held out of inner target models "
                                     f"{fold_of[pid]} and {j}")
                fold_of[pid] = j
        return cls(taus, fold_of, [float(t.c_index) for t in inner])

    def facts(self, cfg: StephConfig) -> dict[str, Any]:
        return {"crossfit_folds": len(self.taus), "crossfit_test": cfg.crossfit_test,
                "crossfit_inner_cindex": [round(c, 4) for c in self.cindex]}


def gamma_search(cfg: ExperimentConfig) -> SearchSpec | None:
    """``steph.gamma: search``: gamma by inner cross-validation over ``steph.gamma_grid``."""
    s = cfg.steph
    if s.gamma != "search":
        return None
    return SearchSpec("steph.gamma", tuple(s.gamma_grid), folds=s.search_folds, prefer="larger",
                      target_model=s.search_target)


def screen_sources(pool, hparams: dict[str, Any], arch: str, train, bag_inputs: dict,
                   loss_alpha: float, seed: int, inner: CrossFit | None = None,
                   ridge: str = "search") -> dict[str, Any]:
    """Cross-validated probe C-index, on the training patients, of theta_0 + tau_t and of
    theta_0 + tau_t + tau_i for every source i (forward passes and penalised head fits only).

    With ``inner`` (cross-fitting), every training patient's embedding comes from the inner
    target model that never saw it, theta_0 + tau_t^(j) (+ tau_i), instead of the fold's target
    model, which has seen every patient it is scored on. ``ridge="target"``: the source probes
    use the ridge the target's probe chose instead of choosing their own (a quarter of the
    penalised fits)."""
    from steph.merging.baselines import merged_network
    from steph.training.head_start import fit_ph_head, head_inputs

    if bag_inputs:
        train.set_bag_inputs(dict(bag_inputs))
    bins = np.array([int(item["bin"]) for item in train])
    events = np.array([int(item["event"]) for item in train])
    times = np.array([float(item["time"]) for item in train])
    from steph.survival.baseline import baseline_hazard_logits

    base = baseline_hazard_logits(bins, events, hparams["n_bins"])
    names = pool.encoder_names
    tau_t, taus = pool.task_vectors(names)

    def embeddings(target: TensorDict, extra: TensorDict | None, items) -> torch.Tensor:
        state = dict(pool.theta0)
        for n in names:
            state[n] = pool.theta0[n] + target[n] + (extra[n] if extra is not None else 0.0)
        return head_inputs(merged_network(state, hparams, arch), items)

    groups = None
    if inner is not None:  # the training patients of each inner fold, in the dataset's order
        fold = np.array([inner.fold_of.get(p, -1) for p in train.patient_ids])
        if (fold < 0).any():
            raise ValueError(f"{int((fold < 0).sum())} training patient(s) in no inner fold of "
                             "the cross-fitting")
        groups = [np.flatnonzero(fold == j) for j in range(len(inner.taus))]

    chosen: dict[str, float] = {}

    def probe(extra: TensorDict | None) -> float:
        if groups is None:
            z = embeddings(tau_t, extra, train)
        else:
            parts = {j: embeddings(inner.taus[j], extra, (train[int(i)] for i in idx))
                     for j, idx in enumerate(groups) if len(idx)}
            z = torch.zeros(len(train), next(iter(parts.values())).shape[1], dtype=torch.float64)
            for j, zj in parts.items():
                z[torch.from_numpy(groups[j])] = zj
        kw = {"grid": (chosen["ridge"],)} if "ridge" in chosen else {}
        _, _, info = fit_ph_head(z, bins, events, times, base, loss_alpha, seed=seed, **kw)
        if ridge == "target" and extra is None:
            chosen["ridge"] = info["head_ridge"]
        return float(np.nanmax(list(info["head_cv_cindex"].values())))

    own = probe(None)
    gains = {name: probe(tau) - own for name, tau in zip(pool.source_names, taus)}
    out: dict[str, Any] = {"screen_target_cindex": own, "screen_gain": gains}
    if inner is not None:
        out["screen_crossfit"] = True
    return out


def screened_start(screening: dict[str, Any], sources: list[str], top_k: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """w and lambda to start from. With h >= 1 helpful sources (positive screening gain, at most
    K): w = 2/h and lambda = 0.5 for them, so theta(X) starts at theta_0 + tau_t + the mean of
    their task vectors; w = 0.02, lambda ~ 1 for the others. When no source helped: w = 1/K,
    lambda ~ 1 for all, so theta(X) starts at the target's own encoder theta_0 + tau_t."""
    gains = np.array([screening["screen_gain"][s] for s in sources])
    helpful = [i for i in np.argsort(-gains, kind="stable")[:top_k] if gains[i] > 0]
    w = torch.full((len(sources),), 0.02)
    lam = torch.ones(len(sources))
    if helpful:
        w[helpful] = 2.0 / len(helpful)
        lam[helpful] = 0.5
    else:
        w[:] = 1.0 / top_k
    return w, lam


class CollapseGuard:
    """STEPH's collapse guard (``steph.guard``), the trainer's ``on_epoch_end`` of a STEPH run.

    When no selected merge weight was positive for any bag of an epoch, the merged encoder was
    theta_0 (a random network) for the whole epoch and, under ReLU, nothing can bring w back.
    Warn; with the guard on and a smaller gamma in ``gamma_grid``, ask for a restart with the
    next smaller one (the run records the attempt and starts again)."""

    def __init__(self, model: STEPH):
        self.gamma = model.gamma()
        self.cfg = model.cfg
        self.warned = False

    def __call__(self, row: dict[str, Any]) -> None:
        if row.get("mean_alive", 1.0) > 0:
            return
        reason = (f"every selected merge weight was 0 for all of epoch {row.get('epoch')} "
                  f"(gamma {self.gamma:g}): STEPH had reduced to a head on theta_0")
        smaller = [x for x in self.cfg.gamma_grid if x < self.gamma]
        if self.cfg.guard and smaller:
            raise TrainingRestart(reason, {"steph.gamma": max(smaller)})
        if not self.warned:
            log.warning("%s%s", reason, "" if self.cfg.guard else " (steph.guard is off)")
            self.warned = True


def merge_facts(model: STEPH, history: list[dict[str, Any]]) -> dict[str, Any]:
    """What metrics.json says about the merge: the gamma trained with and whether any merge
    weight was alive in the last epoch (0: STEPH ended as a head on theta_0)."""
    last = history[-1] if history else {}
    return {"gamma": model.gamma(), "merge_alive_last_epoch": last.get("mean_alive")}


register_method(steph_method("steph", "STEPH: sparse task-vector mixup with hypernetworks"))
register_method(steph_method("steph_lambda1", "STEPH ablation: no mixup (lambda = 1)",
                             mixing="none"))
register_method(steph_method("steph_free_lambda", "STEPH ablation: lambda a free learned vector",
                             mixing="free"))
register_method(steph_method("steph_dense", "STEPH ablation: no sparsity (K = m)",
                             top_k=10_000))
register_method(steph_method("steph_free_w", "STEPH ablation: w a free learned vector",
                             aggregation="free"))
# Its module at inference is a plain STEPH (the inner target models are dropped when it is
# saved): no cost model of its own, efficiency's STEPH row is its cost.
register_method(replace(steph_method(
    "steph_xfit", "STEPH with cross-fitted target task vectors (5 inner target models; a "
    "departure, docs/method-notes.md)", crossfit=5), cost_model=None))
register_method_pattern(
    r"steph_k(\d+)",
    lambda m: steph_method(m.group(0), f"STEPH with K = {m.group(1)}", top_k=int(m.group(1))),
    "steph_k<N>", "STEPH with K = N selected sources (Table S3's sweep)")
