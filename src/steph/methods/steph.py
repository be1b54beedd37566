"""STEPH (method.md section 5), its ablations (Table S5) and the K sweep (Table S3), over the
runs folder's network (``model.arch``: ABMIL by default, or any registered MIL network)."""

from __future__ import annotations

from typing import Any

from steph.config import ExperimentConfig, StephConfig
from steph.merging.steph import STEPH
from steph.methods.networks import example_bag_inputs, network_bag_inputs, random_task_vectors
from steph.methods.registry import (
    Built,
    CostSpec,
    Method,
    MethodContext,
    SearchSpec,
    register_method,
    register_method_pattern,
)

STEPH_SECTIONS = ("data", "bins", "model", "train", "steph")


def steph_method(name: str, summary: str, **overrides: Any) -> Method:
    """A STEPH variant: ``overrides`` replace settings of the ``steph`` config section."""

    def build(ctx: MethodContext) -> Built:
        cfg = type(ctx.cfg.steph).model_validate({**ctx.cfg.steph.model_dump(), **overrides})
        # a fresh head drawn at random; where it starts is train.head_init's (the trainer's)
        model = STEPH(ctx.pool().stack(), ctx.hparams, cfg, head_seed=ctx.cfg.train.seed,
                      n_patients=ctx.n_patients, arch=ctx.arch)
        return Built(module=model, kind="steph", settings=model.settings,
                     info=lambda history: merge_facts(model, history),
                     bag_inputs=network_bag_inputs(ctx, ctx.arch))

    def cost(spec: CostSpec):
        """STEPH over ``spec.arch`` with m = ``spec.n_sources`` random source task vectors."""
        cfg = StephConfig.model_validate({**StephConfig().model_dump(), **overrides})
        stack, hparams = random_task_vectors(spec, spec.n_sources + 1)
        model = STEPH(stack, hparams, cfg, arch=spec.arch).eval()
        return model, example_bag_inputs(model, spec.n_instances)

    return Method(name, summary, needs_pool=True, trains=True, build=build,
                  config_sections=STEPH_SECTIONS, search=gamma_search, cost_model=cost)


def gamma_search(cfg: ExperimentConfig) -> SearchSpec | None:
    """``steph.gamma: search``: gamma by inner cross-validation over ``steph.gamma_grid``."""
    s = cfg.steph
    if s.gamma != "search":
        return None
    return SearchSpec("steph.gamma", tuple(s.gamma_grid), folds=s.search_folds, prefer="larger",
                      target_model=s.search_target)


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
register_method_pattern(
    r"steph_k(\d+)",
    lambda m: steph_method(m.group(0), f"STEPH with K = {m.group(1)}", top_k=int(m.group(1))),
    "steph_k<N>", "STEPH with K = N selected sources (Table S3's sweep)")
