"""The frozen models whose bag embeddings representation transfer reads (method.md section 6).

An :class:`ExpertBank` holds E frozen MIL models: for target t and fold k, the target's own fold-k
model first (the "self" expert), then every source cohort's fold-0 model, in the model pool's
order. ``bank(x)`` gives the (E, d) bag embeddings of one bag (what enters each model's head),
always in eval mode and without autograd, so that huge bags are pooled in chunks exactly as a
direct prediction with each model would be.

The bank is what a served artefact bundles: with it a representation-transfer module computes
its experts' inputs from the raw bag, without the run directories of the models it came from.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from steph.merging.pool import ModelPool
from steph.models.registry import create_model


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state dict's content (names, dtypes, shapes and bytes, in name order): it
    changes exactly when a model's weights change, however the file was written."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ExpertBank(nn.Module):
    """E frozen MIL networks of one architecture; ``names[0]`` is the self expert when the bank
    comes from :meth:`from_pool`."""

    def __init__(self, names: Sequence[str], hparams: Mapping[str, Any], arch: str = "abmil",
                 states: Sequence[Mapping[str, torch.Tensor]] | None = None):
        super().__init__()
        if not names:
            raise ValueError("an expert bank needs at least one model")
        self.names = [str(n) for n in names]
        self.arch = str(arch)
        self.hparams = dict(hparams)
        self.models = nn.ModuleList(create_model(self.arch, **self.hparams) for _ in self.names)
        needs = self.models[0].bag_inputs
        if needs:
            raise ValueError(f"{self.arch} needs per-bag inputs {tuple(needs)}; expert banks run "
                             "networks on the bag alone")
        if states is not None:
            if len(states) != len(self.names):
                raise ValueError(f"{len(states)} state dicts for {len(self.names)} experts")
            for model, state in zip(self.models, states):
                model.load_state_dict(dict(state))
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    @classmethod
    def from_pool(cls, pool: ModelPool, hparams: Mapping[str, Any] | None = None,
                  arch: str = "abmil") -> ExpertBank:
        """The self expert (the pool's target model) then every source, in the pool's order."""
        return cls([pool.target_name, *pool.source_names], hparams or pool.hparams, arch,
                   [pool.target, *pool.sources.values()])

    def train(self, mode: bool = True) -> ExpertBank:
        """Frozen models stay in eval mode (no dropout), whatever their owner's mode."""
        return super().train(False)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def embed_dim(self) -> int:
        return int(self.models[0].head.in_features)

    @property
    def in_dim(self) -> int:
        return int(self.hparams["in_dim"])

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(E, d) bag embeddings of one bag, model by model."""
        return torch.cat([m.embed(x)[0] for m in self.models], dim=0)

    def digests(self) -> list[str]:
        return [state_digest(m.state_dict()) for m in self.models]

    def key(self) -> str:
        """What the embeddings depend on: the architecture, its settings and every expert's
        weights (their content digests), in order."""
        ident = {"arch": self.arch, "hparams": self.hparams,
                 "experts": [[n, d] for n, d in zip(self.names, self.digests())]}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    def subset(self, indices: Sequence[int]) -> ExpertBank:
        """A new bank with copies of the experts at ``indices`` (in that order)."""
        idx = [int(i) for i in indices]
        return ExpertBank([self.names[i] for i in idx], self.hparams, self.arch,
                          [self.models[i].state_dict() for i in idx])

    def settings(self) -> dict[str, Any]:
        return {"names": self.names, "arch": self.arch, "hparams": self.hparams}

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> ExpertBank:
        """An untrained bank shaped by ``settings``; load the state dict after."""
        return cls(settings["names"], settings["hparams"], settings["arch"])
