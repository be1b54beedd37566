"""Gated-attention MIL (ABMIL) for discrete-time survival, as specified in method.md section 3.

Parameter names are part of the public contract: the merging methods address "the MIL encoder"
as the tensors under ``feat_proj.`` and ``attention.`` (8 tensors) and the head as ``head.``.
ABMIL follows the interface of every steph MIL network (:mod:`steph.models.base`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from steph.models.base import MILNetwork

ENCODER_PREFIXES = ("feat_proj.", "attention.")
HEAD_PREFIX = "head."


class GatedAttention(nn.Module):
    """score(x) = w^T (tanh(A x) * sigmoid(B x)), dropout after each branch (Ilse et al. 2018)."""

    def __init__(self, dim: int, attn_dim: int, dropout: float):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.b = nn.Sequential(nn.Linear(dim, attn_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.score = nn.Linear(attn_dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (N, dim) -> (N,)
        return self.score(self.a(h) * self.b(h)).squeeze(-1)


class ABMIL(MILNetwork):
    """Attention-based MIL survival network.

    ``feat_proj``: Linear(in_dim -> hidden_dim) + ReLU; gated attention (hidden_dim -> attn_dim
    -> 1) with softmax over the instances; the bag embedding is the attention-weighted sum of the
    projected instances; ``head``: Linear(hidden_dim -> n_bins) giving hazard logits.

    With in_dim=1536 and n_bins=32 it has 1,197,729 parameters.
    """

    ENCODER_PREFIXES = ENCODER_PREFIXES
    HEAD_PREFIX = HEAD_PREFIX
    bag_inputs = ()

    def __init__(
        self,
        in_dim: int = 1536,
        n_bins: int = 32,
        hidden_dim: int = 512,
        attn_dim: int = 384,
        dropout: float = 0.25,
    ):
        super().__init__()
        self.in_dim, self.n_bins = int(in_dim), int(n_bins)
        self.hidden_dim, self.attn_dim, self.dropout = int(hidden_dim), int(attn_dim), float(dropout)
        self.feat_proj = nn.Sequential(nn.Linear(self.in_dim, self.hidden_dim), nn.ReLU())
        self.attention = GatedAttention(self.hidden_dim, self.attn_dim, self.dropout)
        self.head = nn.Linear(self.hidden_dim, self.n_bins)

    def hparams(self) -> dict:
        return {
            "in_dim": self.in_dim,
            "n_bins": self.n_bins,
            "hidden_dim": self.hidden_dim,
            "attn_dim": self.attn_dim,
            "dropout": self.dropout,
        }

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bag embedding (1, hidden_dim) and attention weights (N,) of one bag."""
        h = self.feat_proj(self._as_instances(x))
        attn = F.softmax(self.attention(h), dim=0)
        return (attn @ h).unsqueeze(0), attn


class ABMILEmbedder(nn.Module):
    """Calls ``ABMIL.embed`` as its forward, so that ``torch.func.functional_call`` can run the
    bag embedding with swapped (e.g. merged) encoder tensors: ``{"abmil.<name>": tensor}``."""

    def __init__(self, abmil: ABMIL):
        super().__init__()
        self.abmil = abmil

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.abmil.embed(x)[0]


def encoder_parameter_names(model: nn.Module) -> list[str]:
    """Names of the MIL-encoder tensors (everything but the head), in registration order."""
    return [n for n, _ in model.named_parameters() if n.startswith(ENCODER_PREFIXES)]


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
