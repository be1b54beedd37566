"""Cancer-specific training: one method per registered MIL network (``abmil``, ``transmil``,
``ilra``, ``r2t_mil``, ``patch_gcn``: the rows of Table S2), each model trained on one cohort
from its network's shared theta_0 (``RUNS/theta0.safetensors`` for ABMIL,
``RUNS/theta0-<arch>.safetensors`` for the others).

A network's extra per-bag inputs come from :func:`network_bag_inputs`: Patch-GCN's
``edge_index`` is the k-NN graph of each bag's patch coordinates, built once per slide into
``RUNS/graphs/<cohort>`` (and, for a bag sampled by ``data.max_instances``, over the sampled
patches, see steph.data.graphs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from steph.data.bag_inputs import cohort_providers, example_inputs
from steph.errors import ConfigError
from steph.merging.task_vectors import TaskVectorStack
from steph.methods.registry import (
    BagInputProvider,
    Built,
    CostSpec,
    Method,
    MethodContext,
    register_method,
)
from steph.models import SurvivalModule, create_model, list_models, model_class, model_title


def network_bag_inputs(ctx: MethodContext, arch: str) -> dict[str, BagInputProvider]:
    """Providers of the extra per-bag inputs network ``arch`` takes (its ``bag_inputs``) for
    the target cohort's bags; those of every bag of the run are built (or read from the
    cache) now, so that e.g. a slide without coordinates stops the run before it trains."""
    names = model_class(arch).bag_inputs
    if names and ctx.cohort is None:
        raise ConfigError(f"network {arch!r} needs per-bag inputs {names} but the run has no "
                          "cohort")
    ids = [pid for ds in (ctx.train_data, ctx.test_data) if ds is not None
           for pid in ds.patient_ids]
    return cohort_providers(names, ctx.cohort, ctx.graph_dir, prepare=ids,
                            who=f"network {arch!r}")


def _cancer_specific(arch: str):
    def build(ctx: MethodContext) -> Built:
        model = create_model(arch, **ctx.hparams)
        model.load_state_dict(ctx.theta0)  # every cancer-specific model starts from theta_0
        return Built(module=model, kind=arch, settings=model.hparams,
                     bag_inputs=network_bag_inputs(ctx, arch))
    return build


# -- efficiency figures (steph bench efficiency) ---------------------------------------------

def example_network(spec: CostSpec, arch: str | None = None, seed: int = 0) -> nn.Module:
    """Network ``arch`` (default ``spec.arch``) at the measured size, random weights, eval."""
    torch.manual_seed(seed)
    return create_model(arch or spec.arch, in_dim=spec.in_dim, n_bins=spec.n_bins).eval()


def example_bag_inputs(module: SurvivalModule, n: int) -> dict[str, torch.Tensor]:
    """The extra per-bag inputs ``module`` declares, for a bag of ``n`` patches on a raster."""
    return example_inputs(module.bag_inputs, n)


def random_task_vectors(spec: CostSpec, rows: int, scale: float = 0.01, seed: int = 0
                        ) -> tuple[TaskVectorStack, dict[str, Any]]:
    """theta_0 of ``spec.arch`` and ``rows`` random task vectors of its encoder (rows = the
    target's plus m = spec.n_sources sources for a transfer method), and its hparams."""
    net = example_network(spec, seed=seed)
    names = net.encoder_names()
    theta0 = {n: p.detach() for n, p in net.named_parameters() if n in names}
    g = torch.Generator().manual_seed(seed + 1)
    vectors = [{n: scale * torch.randn(t.shape, generator=g) for n, t in theta0.items()}
               for _ in range(rows)]
    labels = ["target", *(f"source{i}" for i in range(1, rows))]
    return TaskVectorStack.from_dicts(theta0, vectors, labels, names), net.hparams()


def _network_cost(arch: str):
    def cost(spec: CostSpec):
        net = example_network(spec, arch)
        return net, example_bag_inputs(net, spec.n_instances)
    return cost


for _arch in list_models():
    register_method(Method(
        _arch, f"cancer-specific {model_title(_arch)} trained from its shared theta_0",
        needs_pool=False, trains=True, build=_cancer_specific(_arch),
        cost_model=_network_cost(_arch), arch=_arch))
