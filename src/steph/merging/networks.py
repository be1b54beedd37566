"""Network plumbing of the merging modules (STEPH, the AdaMerging family): a registered MIL
network whose encoder tensors are frozen at theta_0 and replaced, at every forward, by merged
ones through ``torch.func.functional_call`` on the network's ``embed``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from steph.merging.task_vectors import FlatLayout, TensorDict
from steph.models.base import EmbedCall


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


def merged_embedding(embedder: EmbedCall, params: TensorDict, x: torch.Tensor,
                     bag_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``embedder.network.embed(x, **bag_inputs)[0]`` with the encoder tensors ``params``
    (autograd flows to them) in place of the network's own."""
    return functional_call(embedder, {f"network.{k}": v for k, v in params.items()}, (x,),
                           dict(bag_inputs), strict=False)


def renamed_prefix(old: str, new: str):
    """A load_state_dict pre-hook that renames keys ``<prefix>old...`` to ``<prefix>new...``."""
    def hook(state_dict, prefix, *args) -> None:
        for key in [k for k in state_dict if k.startswith(prefix + old)]:
            state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)
    return hook


def network_settings(settings: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(arch, hparams) of the network inside a merging artefact's settings: ``arch`` and
    ``network``, or ``abmil`` in artefacts written before any network could be merged."""
    if "network" in settings:
        return settings.get("arch", "abmil"), settings["network"]
    return "abmil", settings["abmil"]
