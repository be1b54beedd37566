"""``joint``: multi-cancer joint learning (the paradigm of the paper's Figure 1), the upper
reference of what transfer can give a target.

One model of the runs folder's network (``model.arch``, ABMIL by default), from its shared
theta_0, trained with the shared protocol on the target's training patients of the fold plus
every patient of every source cohort (they never include a target patient), and evaluated on
the target's test patients of the fold. Every cohort's times go into the target's time bins.
Unlike the transfer methods it needs no source model; unlike the cancer-specific methods its
result depends on the sources (they are part of the run's identity). An epoch is one pass over
all those patients (the protocol's 16 bags per step), so a joint run costs about as much as
training every cohort's model once.
"""

from __future__ import annotations

from steph.data.bag_inputs import cohort_providers
from steph.data.dataset import BagDataset, ConcatBags
from steph.errors import ConfigError
from steph.methods.networks import network_bag_inputs
from steph.methods.registry import Built, Method, MethodContext, register_method
from steph.models import create_model, model_class


def build_joint(ctx: MethodContext) -> Built:
    if ctx.load_cohort is None or not ctx.sources:
        raise ConfigError(f"joint training of {ctx.target!r} needs source cohorts")
    model = create_model(ctx.arch, **ctx.hparams)
    model.load_state_dict(ctx.theta0)  # the shared initialisation, as every model of the folder
    d, seed = ctx.cfg.data, ctx.cfg.train.seed
    names = model_class(ctx.arch).bag_inputs
    parts = [ctx.train_data]
    for source in ctx.sources:
        cohort = ctx.load_cohort(source)
        if cohort.feature_dim != ctx.hparams["in_dim"]:
            raise ConfigError(f"joint training of {ctx.target!r}: source {source!r} has "
                              f"{cohort.feature_dim}-d features, the target "
                              f"{ctx.hparams['in_dim']}-d")
        bags = BagDataset(cohort, list(cohort.patient_ids), ctx.bins, cache_mb=d.cache_mb,
                          max_instances=d.max_instances, seed=seed)
        if names:
            graphs = ctx.graph_dirs(source) if ctx.graph_dirs is not None else None
            bags.set_bag_inputs(cohort_providers(names, cohort, graphs,
                                                 prepare=bags.patient_ids,
                                                 who=f"joint training over {source!r}"))
        parts.append(bags)
    train = ConcatBags(parts)
    counts = {ctx.target: len(ctx.train_data), **{p.cohort.name: len(p) for p in parts[1:]}}
    return Built(module=model, kind=ctx.arch, settings=model.hparams, train_data=train,
                 bag_inputs=network_bag_inputs(ctx, ctx.arch),
                 info=lambda history: {"joint_train_patients": counts})


register_method(Method(
    "joint", "multi-cancer joint learning: one model on the target's training patients plus "
    "every source cohort's patients (the upper reference of transfer)",
    needs_pool=False, trains=True, build=build_joint, uses_sources=True))
