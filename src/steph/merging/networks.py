"""Network plumbing of the merging modules (STEPH, the AdaMerging family, Surgery's exported
network): a registered MIL network whose encoder tensors are frozen at theta_0 and replaced, at
every forward, by merged ones through ``torch.func.functional_call`` on the network's
``embed``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from steph.merging.task_vectors import FlatLayout, TensorDict
from steph.models.base import EmbedCall, MILNetwork, init_fresh_head
from steph.models.module import SurvivalModule
from steph.models.registry import create_model


class OverNetwork(SurvivalModule):
    """Base of the modules built around one registered MIL network (``self.network``): they
    take its per-bag inputs and evaluation policy, train or export its ``head``, and run its
    ``embed`` with merged encoder tensors."""

    network: MILNetwork

    def attach_network(self, arch: str, hparams: dict[str, Any], *,
                       frozen: tuple[FlatLayout, torch.Tensor] | None = None,
                       head_generator: torch.Generator | None = None,
                       head_bias: torch.Tensor | None = None) -> None:
        """Build network ``arch`` (from torch's global RNG, like any module); ``frozen``:
        (layout, flat theta_0) of its encoder, copied in and frozen; ``head_generator``: draw a
        fresh head from it (``head_bias`` replacing the drawn bias)."""
        self.arch = arch
        self.network = create_model(arch, **hparams)
        self.bag_inputs = tuple(self.network.bag_inputs)  # e.g. Patch-GCN's ("edge_index",)
        self.eval_in_pieces = self.network.eval_in_pieces  # (see steph.models.base)
        if frozen is not None:
            load_frozen_encoder(self.network, *frozen)
        if head_generator is not None:
            init_fresh_head(self.network.head, head_generator, head_bias)
        # Not registered (it would duplicate ``network`` in the state dict).
        object.__setattr__(self, "_embedder", EmbedCall(self.network))

    @property
    def survival_head(self) -> nn.Linear:
        return self.network.head

    def merged_embedding(self, x: torch.Tensor, params: TensorDict,
                         bag_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The network's bag embedding (1, d) with the encoder tensors ``params`` (autograd
        flows to them) in place of its own."""
        return functional_call(self._embedder, {f"network.{k}": v for k, v in params.items()},
                               (x,), dict(bag_inputs), strict=False)


def load_frozen_encoder(network: nn.Module, layout: FlatLayout, flat: torch.Tensor) -> None:
    """Copy the encoder tensors ``layout`` cuts from ``flat`` (theta_0) into ``network`` and
    freeze them; every other parameter (the head) stays trainable."""
    missing = set(layout.names) - {n for n, _ in network.named_parameters()}
    if missing:
        raise ValueError(f"task vectors hold tensors {type(network).__name__} does not have: "
                         f"{sorted(missing)[:5]}")
    with torch.no_grad():
        for name, tensor in layout.unflatten(flat).items():
            network.get_parameter(name).copy_(tensor)
    for name, p in network.named_parameters():
        p.requires_grad_(name not in layout.names)
