"""The model-merging baselines as methods (method.md section 6; modules in
:mod:`steph.merging.baselines`, where the choices behind them are documented), over the runs
folder's network (``model.arch``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from steph.config import MergeConfig
from steph.merging.baselines import AdaMerging, adamerging_stack, merged_network, static_merge
from steph.merging.pool import ModelPool
from steph.methods.networks import (
    example_bag_inputs,
    example_network,
    network_bag_inputs,
    random_task_vectors,
)
from steph.methods.registry import Built, CostSpec, Method, MethodContext, register_method

# method name -> pairwise preprocessing of the source task vectors
PREPROCESSING = {"adamerging": "none", "ties_am": "ties", "isoc_am": "iso_c",
                 "isocts_am": "iso_cts", "surgery_am": "none"}


def _static_method(name: str, summary: str,
                   coef_of: Callable[[MethodContext, ModelPool], float]) -> Method:
    def build(ctx: MethodContext) -> Built:
        pool = ctx.pool()
        model = merged_network(static_merge(pool, coef_of(ctx, pool)), ctx.hparams, ctx.arch)
        return Built(module=model, kind=ctx.arch, settings=model.hparams,
                     bag_inputs=network_bag_inputs(ctx, ctx.arch))

    def cost(spec: CostSpec):
        """A merged network of ``spec.arch``: nothing is learned."""
        net = example_network(spec)
        for p in net.parameters():
            p.requires_grad_(False)
        return net, example_bag_inputs(net, spec.n_instances)

    # untrained: training settings cannot change them (their input models record theirs)
    return Method(name, summary, needs_pool=True, trains=False, build=build,
                  config_sections=("data", "bins", "model", "merge"), cost_model=cost)


def _preprocess_options(name: str, cfg: MergeConfig) -> dict[str, Any]:
    method = PREPROCESSING[name]
    if method == "ties":
        return {"density": cfg.ties_density}
    if method == "iso_cts":
        return {"common_space_fraction": cfg.iso_cts_fraction}
    return {}


def _adamerging_method(name: str, summary: str, surgery: bool = False) -> Method:
    def build(ctx: MethodContext) -> Built:
        cfg = ctx.cfg.merge
        stack = adamerging_stack(ctx.pool(), PREPROCESSING[name], **_preprocess_options(name, cfg))
        model = AdaMerging(stack, ctx.hparams, init_coef=cfg.init_coef,
                           head_seed=ctx.cfg.train.seed,
                           surgery_rank=cfg.surgery_rank if surgery else None,
                           coef_lr_scale=cfg.coef_lr_scale, arch=ctx.arch)
        return Built(module=model, kind=model.export_kind, settings=model.export_settings,
                     export=model.export, bag_inputs=network_bag_inputs(ctx, ctx.arch))

    def cost(spec: CostSpec):
        """The exported network (merged encoder + head, surgery for Surgery AM) as it runs at
        inference; learnable parameters: what training learns (m + 1 coefficients, the head,
        the surgery module)."""
        stack, hparams = random_task_vectors(spec, spec.n_sources + 1)
        model = AdaMerging(stack, hparams, surgery_rank=MergeConfig().surgery_rank
                           if surgery else None, arch=spec.arch)
        learnable = model.trainable_parameter_count()
        exported = model.export()
        exported.trainable_parameter_count = lambda: learnable
        return exported, example_bag_inputs(exported, spec.n_instances)

    return Method(name, summary, needs_pool=True, trains=True, build=build,
                  config_sections=("data", "bins", "model", "train", "merge"), cost_model=cost)


register_method(_static_method(
    "model_avg", "Model Avg: plain average of the target and source models (no training)",
    lambda ctx, pool: 1.0 / (len(pool.sources) + 1)))
register_method(_static_method(
    "task_arithmetic", "Task Arithmetic: theta_0 + ta_coef * sum of all task vectors (no training)",
    lambda ctx, pool: ctx.cfg.merge.ta_coef))
register_method(_adamerging_method(
    "adamerging", "AdaMerging: learned task-wise coefficients (tau_t included) + fresh head"))
register_method(_adamerging_method(
    "ties_am", "TIES AM: AdaMerging over sources TIES-merged pairwise with the target"))
register_method(_adamerging_method(
    "isoc_am", "Iso-C AM: AdaMerging over sources Iso-C-merged pairwise with the target"))
register_method(_adamerging_method(
    "isocts_am", "Iso-CTS AM: AdaMerging over sources Iso-CTS-merged pairwise with the target"))
register_method(_adamerging_method(
    "surgery_am", "Surgery AM: AdaMerging + Representation Surgery of the bag embedding",
    surgery=True))
