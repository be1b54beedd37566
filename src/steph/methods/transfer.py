"""Representation transfer as methods (method.md section 6; modules in :mod:`steph.transfer`).

Every row reads the same experts' inputs: the bag embedding of every target patient of the fold
(training and test, whole bags) under the target's own fold-k model (the "self" expert, first)
and every source's fold-0 model, computed once per run and cached in its run directory
(:mod:`steph.transfer.cache`, keyed by the content digests of the models).

Fresh heads (and ROUPKT's router and experts) are drawn at random from the training seed; where
a head starts is ``train.head_init``'s (the trainer's head start), as for every method.

``roupkt``        ROUPKT: a router ABMIL on the raw bag picks the top-k experts; a fresh head on
                  their probability-weighted ReLU(Linear) outputs (method.md section 6).
``zero_shot``     one source model applied to the target as it is (no training): the source
                  whose risks rank the target's *training* patients best (Harrell's C on the
                  training split; ties: the first in the pool's order). Every source's training
                  and test C-index is recorded in metrics.json (``source_train_c_index``,
                  ``source_test_c_index``); the test values are computed after the choice and
                  never feed it.
``linear_probe``  a fresh head on one source's embedding, trained with the shared protocol.
                  The source is chosen on the training split (``transfer.probe_selection``):
                  ``inner_cv`` (default) = for each source, the best inner cross-validated
                  C-index (3 folds of the training patients, over the ridge grid of the head
                  start's ``fit`` mode) of a proportional-hazards linear read-out of its
                  embedding, i.e. how well a probe on that embedding ranks held-out *training*
                  patients; ``zero_shot`` = the training C-index of the source model as it is.
                  Ties: the first in the pool's order. Scores in metrics.json (``probe_scores``).
``fusion_mean``   a fresh head on the mean of every source's and the self expert's embedding.

No test patient's label reaches a choice or a training: the test patients' embeddings are
computed from their features alone (so that the run's predictions need no second pass), the
choices read the training dataset's labels only, and the trainer trains on the training split.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from steph.methods.registry import Built, CostSpec, Method, MethodContext, register_method
from steph.models.registry import create_model
from steph.survival.baseline import baseline_hazard_logits
from steph.survival.metrics import concordance_index_or_nan
from steph.survival.risk import risk_from_logits
from steph.training.head_start import fit_ph_head
from steph.transfer import (
    EXPERTS_INPUT,
    ROUPKT,
    ExpertBank,
    ExpertEmbeddings,
    ExpertReadout,
    expert_embeddings,
)

TRANSFER_SECTIONS = ("data", "bins", "model", "train", "transfer")
SELF = 0  # the self expert's position in the bank and in the cached inputs


def run_experts(ctx: MethodContext) -> tuple[ExpertBank, ExpertEmbeddings]:
    """The run's expert bank (self, then the sources) and every patient's cached embeddings."""
    if "experts" not in ctx.extra:
        pool = ctx.pool()
        bank = ExpertBank.from_pool(pool, pool.hparams or ctx.hparams)
        ids = list(ctx.train_data.patient_ids)
        if ctx.test_data is not None:
            ids += list(ctx.test_data.patient_ids)  # features only: labels are never read
        emb = expert_embeddings(bank, ids, ctx.train_data.cohort.load_bag, ctx.run_dir)
        ctx.extra["experts"] = (bank, emb)
    return ctx.extra["experts"]


@torch.no_grad()
def _source_risks(bank: ExpertBank, i: int, z: torch.Tensor) -> np.ndarray:
    """Risks of expert model i as it is, from its cached embeddings z (n, d)."""
    return risk_from_logits(bank.models[i].head(z)).numpy()


def source_scores(bank: ExpertBank, emb: ExpertEmbeddings, data: Any) -> dict[str, float]:
    """C-index of every source model as it is on the patients of ``data`` (a bag dataset)."""
    z = emb.of(data.patient_ids)
    return {bank.names[i]: concordance_index_or_nan(data.times, data.events, _source_risks(bank, i, z[:, i]))
            for i in range(SELF + 1, len(bank))}


def probe_scores(bank: ExpertBank, emb: ExpertEmbeddings, ctx: MethodContext) -> dict[str, float]:
    """Inner cross-validated C-index of a linear read-out of each source's embedding, on the
    training patients only (the best over the ridge grid of ``fit_ph_head``)."""
    train = ctx.train_data
    z = emb.of(train.patient_ids).double()
    bins, events = np.asarray(train.bin_indices), np.asarray(train.events)
    base = baseline_hazard_logits(bins, events, ctx.bins.n_bins)
    out = {}
    for i in range(SELF + 1, len(bank)):
        _, _, info = fit_ph_head(z[:, i], bins, events, np.asarray(train.times), base,
                                 ctx.cfg.train.loss_alpha, seed=ctx.cfg.train.seed)
        finite = [c for c in info["head_cv_cindex"].values() if math.isfinite(c)]
        out[bank.names[i]] = max(finite) if finite else float("nan")
    return out


def best_of(scores: dict[str, float]) -> str:
    """The name with the largest finite score (ties: the first); the first if none is finite."""
    best, value = next(iter(scores)), -math.inf
    for name, s in scores.items():
        if math.isfinite(s) and s > value:
            best, value = name, s
    return best


def _provider(emb: ExpertEmbeddings) -> dict[str, Callable[[str], torch.Tensor]]:
    return {EXPERTS_INPUT: emb.__getitem__}


# -- the recipes ---------------------------------------------------------------------------------

def _build_roupkt(ctx: MethodContext) -> Built:
    bank, emb = run_experts(ctx)
    t = ctx.cfg.transfer
    hp = ctx.hparams
    model = ROUPKT(bank, ctx.bins.n_bins, top_k=t.top_k, z_loss=t.z_loss,
                   balance_loss=t.balance_loss,
                   router={k: hp[k] for k in ("hidden_dim", "attn_dim", "dropout") if k in hp},
                   seed=ctx.cfg.train.seed, cached_inputs=True)

    def info(history: list[dict[str, Any]]) -> dict[str, Any]:
        last = history[-1] if history else {}
        out: dict[str, Any] = {"experts": bank.names}
        for key in ("mean_p", "mean_selected"):
            if key in last:  # per expert, averaged over the last epoch's training bags
                out[f"router_{key[5:]}_last_epoch"] = dict(zip(bank.names, last[key]))
        return out

    return Built(module=model, kind="roupkt", settings=model.settings,
                 bag_inputs=_provider(emb), info=info)


def _build_zero_shot(ctx: MethodContext) -> Built:
    bank, emb = run_experts(ctx)
    train_c = source_scores(bank, emb, ctx.train_data)  # training patients only
    best = best_of(train_c)
    model = bank.subset([bank.names.index(best)]).models[0]  # the source model, frozen

    def info(history: list[dict[str, Any]]) -> dict[str, Any]:
        test_c = source_scores(bank, emb, ctx.test_data) if ctx.test_data is not None else {}
        return {"zero_shot_source": best, "source_train_c_index": train_c,
                "source_test_c_index": test_c}

    return Built(module=model, kind="abmil", settings=model.hparams, info=info)


def _build_linear_probe(ctx: MethodContext) -> Built:
    bank, emb = run_experts(ctx)
    rule = ctx.cfg.transfer.probe_selection
    scores = (probe_scores(bank, emb, ctx) if rule == "inner_cv"
              else source_scores(bank, emb, ctx.train_data))
    best = best_of(scores)
    i = bank.names.index(best)
    model = ExpertReadout(bank.subset([i]), ctx.bins.n_bins, columns=[i],
                          seed=ctx.cfg.train.seed, cached_inputs=True)
    return Built(module=model, kind="expert_readout", settings=model.settings,
                 bag_inputs=_provider(emb),
                 info=lambda history: {"probe_source": best, "probe_selection": rule,
                                       "probe_scores": scores})


def _build_fusion_mean(ctx: MethodContext) -> Built:
    bank, emb = run_experts(ctx)
    model = ExpertReadout(bank, ctx.bins.n_bins, seed=ctx.cfg.train.seed, cached_inputs=True)
    return Built(module=model, kind="expert_readout", settings=model.settings,
                 bag_inputs=_provider(emb), info=lambda history: {"experts": bank.names})


# -- cost models (steph bench efficiency): the modules as served, random weights ----------------

def _cost_bank(spec: CostSpec, n: int) -> ExpertBank:
    names = ["self", *(f"source{i}" for i in range(1, n))]
    return ExpertBank(names[:n], {"in_dim": spec.in_dim, "n_bins": spec.n_bins}, arch=spec.arch)


def _roupkt_cost(spec: CostSpec):
    return ROUPKT(_cost_bank(spec, spec.n_sources + 1), spec.n_bins).eval(), {}


def _zero_shot_cost(spec: CostSpec):
    model = create_model(spec.arch, in_dim=spec.in_dim, n_bins=spec.n_bins)
    for p in model.parameters():  # nothing is learnt: a source model as it is
        p.requires_grad_(False)
    return model.eval(), {}


def _linear_probe_cost(spec: CostSpec):
    return ExpertReadout(_cost_bank(spec, 1), spec.n_bins).eval(), {}


def _fusion_mean_cost(spec: CostSpec):
    return ExpertReadout(_cost_bank(spec, spec.n_sources + 1), spec.n_bins).eval(), {}


# name, summary, trains, build, config sections, cost model
ROWS = (
    ("roupkt", "ROUPKT: a router picks the top-5 of the frozen source/self models' embeddings",
     True, _build_roupkt, TRANSFER_SECTIONS, _roupkt_cost),
    ("zero_shot", "zero-shot: the source model that ranks the training patients best, as it is",
     False, _build_zero_shot, ("data", "bins", "model"), _zero_shot_cost),
    ("linear_probe", "linear probe: a fresh head on the best source's embedding (train-chosen)",
     True, _build_linear_probe, TRANSFER_SECTIONS, _linear_probe_cost),
    ("fusion_mean", "fusion: a fresh head on the mean of every source's and the self embedding",
     True, _build_fusion_mean, TRANSFER_SECTIONS, _fusion_mean_cost),
)
for _name, _summary, _trains, _build, _sections, _cost in ROWS:
    register_method(Method(_name, _summary, needs_pool=True, trains=_trains, build=_build,
                           config_sections=_sections, cost_model=_cost))
