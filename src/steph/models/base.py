"""The one interface every MIL survival network of steph follows (ABMIL, TransMIL, ILRA, R2T-MIL,
Patch-GCN), so that training, merging and inference need not know which network they hold.

A network

- is built from keyword arguments ``in_dim, n_bins, ...`` and returns exactly those from
  ``hparams()`` (``type(net)(**net.hparams())`` rebuilds it);
- takes ONE bag: ``forward(x, **bag_inputs) -> logits (1, n_bins)`` with ``x`` of shape
  ``(N, D)`` or ``(1, N, D)``;
- says which extra per-bag inputs it needs in the class attribute ``bag_inputs`` (names of
  keyword arguments, e.g. Patch-GCN's ``("edge_index",)``); callers pass exactly those;
- exposes ``embed(x, **bag_inputs) -> (z (1, d), attention (N,) or None)``: ``z`` is what
  enters the head, ``attention`` a per-instance weight where the network has one;
- has its head as the attribute ``head`` (an ``nn.Linear``) and declares which tensors form
  "the MIL encoder" (what STEPH and the AdaMerging family merge) as parameter-name prefixes
  ``ENCODER_PREFIXES``; ``encoder_names()`` lists them in registration order. Encoder and
  head together cover every parameter.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn


class MILNetwork(nn.Module):
    """Base class of steph's MIL networks (see the module docstring for the contract)."""

    ENCODER_PREFIXES: ClassVar[tuple[str, ...]] = ()
    HEAD_PREFIX: ClassVar[str] = "head."
    bag_inputs: ClassVar[tuple[str, ...]] = ()
    head: nn.Linear

    def hparams(self) -> dict:  # pragma: no cover - every network overrides it
        raise NotImplementedError

    def embed(self, x: torch.Tensor, **bag_inputs: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor | None]:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: torch.Tensor, **bag_inputs: torch.Tensor) -> torch.Tensor:
        """Hazard logits (1, n_bins) of one bag."""
        z, _ = self.embed(x, **bag_inputs)
        return self.head(z)

    # -- what the trainer's head start (steph.training.head_start) uses --------------------------
    @property
    def survival_head(self) -> nn.Linear:
        return self.head

    def head_input(self, x: torch.Tensor, **bag_inputs: torch.Tensor) -> torch.Tensor:
        """What enters the head, (1, d)."""
        return self.embed(x, **bag_inputs)[0]

    def encoder_names(self) -> list[str]:
        """Names of the MIL-encoder parameters, in registration order."""
        return [n for n, _ in self.named_parameters() if n.startswith(self.ENCODER_PREFIXES)]

    def head_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if n.startswith(self.HEAD_PREFIX)]

    @classmethod
    def _as_instances(cls, x: torch.Tensor) -> torch.Tensor:
        """(N, D) view of one bag given as (N, D) or (1, N, D)."""
        if x.dim() == 3:
            if x.shape[0] != 1:
                raise ValueError(f"{cls.__name__} takes one bag at a time, got a batch of "
                                 f"{x.shape[0]}")
            x = x[0]
        if x.dim() != 2:
            raise ValueError(f"expected a bag of shape (N, D) or (1, N, D), got {tuple(x.shape)}")
        return x

    @classmethod
    def _bag(cls, x: torch.Tensor) -> torch.Tensor:
        """Like :meth:`_as_instances`, and refuses an empty bag (padding and graphs need N >= 1)."""
        x = cls._as_instances(x)
        if x.shape[0] == 0:
            raise ValueError(f"{cls.__name__} got an empty bag (0 instances)")
        return x


def head_dim(dim: int, heads: int) -> int:
    """Width of each of ``heads`` attention heads over ``dim`` channels."""
    if dim % heads:
        raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
    return dim // heads


def ceil_sqrt(n: int) -> int:
    """Exact ceil(sqrt(n)) for n >= 1 (the side of the square grid TransMIL and R2T-MIL lay a
    bag of n tokens on; integer arithmetic, so no float rounding at perfect squares)."""
    return math.isqrt(n - 1) + 1
