"""Task vectors ``tau_c = theta_c - theta_0`` of a named parameter subset, flattened and stacked.

Merging is then one fused operation over the stack, ``theta = theta_0 + coef @ T``, instead of a
Python loop over parameters and sources; the merged flat vector is cut back into named views.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

TensorDict = dict[str, torch.Tensor]


def task_vector(theta: Mapping[str, torch.Tensor], theta0: Mapping[str, torch.Tensor],
                names: Sequence[str] | None = None) -> TensorDict:
    """``theta - theta0`` over ``names`` (all of theta0's tensors when None)."""
    names = list(theta0) if names is None else list(names)
    missing = [n for n in names if n not in theta or n not in theta0]
    if missing:
        raise KeyError(f"task vector: tensors missing from a model: {missing}")
    out = {}
    for n in names:
        if theta[n].shape != theta0[n].shape:
            raise ValueError(f"task vector: shape of {n!r} differs: {tuple(theta[n].shape)} vs "
                             f"{tuple(theta0[n].shape)} (models of different architectures?)")
        out[n] = theta[n].detach().float() - theta0[n].detach().float()
    return out


@dataclass
class FlatLayout:
    """Names and shapes of a parameter subset, and where each sits in the flat vector."""

    names: list[str]
    shapes: list[torch.Size]

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor], names: Sequence[str] | None = None) -> "FlatLayout":
        names = list(tensors) if names is None else list(names)
        return cls(names=names, shapes=[tensors[n].shape for n in names])

    @property
    def numels(self) -> list[int]:
        return [int(torch.Size(s).numel()) for s in self.shapes]

    @property
    def size(self) -> int:
        return sum(self.numels)

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[n].detach().float().reshape(-1) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> TensorDict:
        """Named views into ``flat`` (no copy; gradients flow back to ``flat``)."""
        if flat.shape[-1] != self.size:
            raise ValueError(f"flat vector has {flat.shape[-1]} entries, layout needs {self.size}")
        out, offset = {}, 0
        for name, shape, numel in zip(self.names, self.shapes, self.numels):
            out[name] = flat[offset:offset + numel].view(shape)
            offset += numel
        return out

    def to_dict(self) -> dict:
        return {"names": self.names, "shapes": [list(s) for s in self.shapes]}

    @classmethod
    def from_dict(cls, d: dict) -> "FlatLayout":
        return cls(names=list(d["names"]), shapes=[torch.Size(s) for s in d["shapes"]])


@dataclass
class TaskVectorStack:
    """theta_0 and task vectors of one parameter subset, flat: ``base`` (P,), ``vectors`` (T, P).

    ``labels[i]`` names the cohort of row ``i``.
    """

    layout: FlatLayout
    base: torch.Tensor
    vectors: torch.Tensor
    labels: list[str]

    @classmethod
    def from_dicts(cls, theta0: Mapping[str, torch.Tensor], task_vectors: Sequence[Mapping[str, torch.Tensor]],
                   labels: Sequence[str], names: Sequence[str] | None = None) -> "TaskVectorStack":
        if len(task_vectors) != len(labels):
            raise ValueError("one label per task vector")
        layout = FlatLayout.of(theta0, names)
        base = layout.flatten(theta0)
        vectors = (torch.stack([layout.flatten(tv) for tv in task_vectors])
                   if task_vectors else torch.zeros(0, layout.size))
        return cls(layout=layout, base=base, vectors=vectors, labels=list(labels))

    def merge(self, coef: torch.Tensor) -> torch.Tensor:
        """Flat ``theta_0 + sum_i coef_i tau_i`` (one matrix-vector product)."""
        return torch.addmv(self.base, self.vectors.t(), coef)

    def merged_dict(self, coef: torch.Tensor) -> TensorDict:
        return self.layout.unflatten(self.merge(coef))
