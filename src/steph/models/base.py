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
  head together cover every parameter;
- says how it evaluates a bag of any size (``eval_in_pieces``): True when, in eval mode without
  autograd, a bag of more than ``chunk_size`` instances (a performance setting, not a
  hyper-parameter: not in ``hparams()``, default 65,536, 0 = never) is computed in pieces of
  bounded memory with the same result up to float rounding (ABMIL, ILRA, Patch-GCN chunk by
  chunk, R2T-MIL region by region); False when no exact split exists and the whole bag is held
  at once (TransMIL). Training mode and autograd always take the one-pass path.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from steph.models.module import SurvivalModule


class MILNetwork(SurvivalModule):
    """Base class of steph's MIL networks (see the module docstring for the contract); each
    registers itself with ``@register_model`` (:mod:`steph.models.registry`)."""

    ENCODER_PREFIXES: ClassVar[tuple[str, ...]] = ()
    HEAD_PREFIX: ClassVar[str] = "head."
    head: nn.Linear
    chunk_size: int = 0  # set by subclasses that evaluate in pieces (see the module docstring)

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

    def _eval_chunk(self, n: int) -> int:
        """The chunk size for a bag of ``n`` instances: ``chunk_size`` in eval mode without
        autograd when the bag is larger than it, else 0 (one pass)."""
        if self.training or torch.is_grad_enabled():
            return 0
        return self.chunk_size if 0 < self.chunk_size < n else 0

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


DEFAULT_CHUNK_SIZE = 65_536  # instances per piece in eval / no-grad computation (0 = never)


def check_chunk_size(chunk_size: int) -> int:
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0 = never chunk), got {chunk_size}")
    return int(chunk_size)


class OnlineSoftmax:
    """``softmax(scores) @ values`` over the last score axis, accumulated chunk by chunk.

    ``add(s, v)`` with scores ``s`` (..., c) and values ``v`` (c, d) or (..., c, d): a running
    maximum of the scores, the running sum of their exponentials and the running exp-weighted
    sum of the values, rescaled whenever the maximum grows (earlier terms only shrink, so
    nothing overflows). ``result()`` equals the one-pass computation up to float rounding."""

    def __init__(self) -> None:
        self.max = self.sum = self.acc = None

    def add(self, scores: torch.Tensor, values: torch.Tensor) -> None:
        m = scores.amax(dim=-1, keepdim=True)
        if self.max is None:
            e = torch.exp(scores - m)
            self.max, self.sum, self.acc = m, e.sum(dim=-1, keepdim=True), e @ values
            return
        new_max = torch.maximum(self.max, m)
        scale = torch.exp(self.max - new_max)
        e = torch.exp(scores - new_max)
        self.sum = self.sum * scale + e.sum(dim=-1, keepdim=True)
        self.acc = self.acc * scale + e @ values
        self.max = new_max

    def result(self) -> torch.Tensor:
        return self.acc / self.sum


class EmbedCall(nn.Module):
    """Calls ``network.embed`` as its forward and returns the bag embedding (1, d), so that
    ``torch.func.functional_call`` can run a network's embedding with swapped (e.g. merged)
    encoder tensors, named ``{"network.<name>": tensor}``; per-bag inputs (Patch-GCN's
    ``edge_index``) are passed as keyword arguments."""

    def __init__(self, network: MILNetwork):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor, **bag_inputs: torch.Tensor) -> torch.Tensor:
        return self.network.embed(x, **bag_inputs)[0]


def init_fresh_head(head: nn.Linear, generator: torch.Generator,
                    bias: torch.Tensor | None = None) -> None:
    """Draw a head afresh (not copied from any model): U(+-1/sqrt(fan_in)) from ``generator``.

    ``bias``, when given, replaces the drawn bias (e.g. the training split's baseline hazard
    logits, see steph.survival.baseline); the weights always stay freshly drawn."""
    with torch.no_grad():
        bound = 1.0 / head.in_features ** 0.5
        head.weight.uniform_(-bound, bound, generator=generator)
        head.bias.uniform_(-bound, bound, generator=generator)
        if bias is not None:
            head.bias.copy_(bias)
