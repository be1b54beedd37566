"""Gated-attention MIL (ABMIL) for discrete-time survival, as specified in method.md section 3.

Parameter names are part of the public contract: the merging methods address "the MIL encoder"
as the tensors under ``feat_proj.`` and ``attention.`` (8 tensors) and the head as ``head.``.
ABMIL follows the interface of every steph MIL network (:mod:`steph.models.base`).

Exact prediction on any bag size: in eval mode without autograd (how every prediction in steph
runs), a bag of more than ``chunk_size`` instances is pooled in chunks with an online softmax
(a running maximum of the attention scores, the running sum of their exponentials and the
running exp-weighted sum of the projected instances, rescaled whenever the maximum grows). The
result equals the one-pass computation up to float rounding, every instance counts, and the
memory for activations is bounded by the chunk instead of growing with the bag. Training mode
and autograd always take the one-pass path (unchanged).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from steph.models.base import (
    DEFAULT_CHUNK_SIZE,
    MILNetwork,
    OnlineSoftmax,
    check_chunk_size,
)
from steph.models.registry import register_model


class GatedAttention(nn.Module):
    """score(x) = w^T (tanh(A x) * sigmoid(B x)), dropout after each branch (Ilse et al. 2018)."""

    def __init__(self, dim: int, attn_dim: int, dropout: float):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.b = nn.Sequential(nn.Linear(dim, attn_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.score = nn.Linear(attn_dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (N, dim) -> (N,)
        return self.score(self.a(h) * self.b(h)).squeeze(-1)


@register_model("abmil", title="ABMIL")
class ABMIL(MILNetwork):
    """Attention-based MIL survival network.

    ``feat_proj``: Linear(in_dim -> hidden_dim) + ReLU; gated attention (hidden_dim -> attn_dim
    -> 1) with softmax over the instances; the bag embedding is the attention-weighted sum of the
    projected instances; ``head``: Linear(hidden_dim -> n_bins) giving hazard logits.

    With in_dim=1536 and n_bins=32 it has 1,197,729 parameters.

    ``chunk_size`` (a performance setting, not a hyperparameter: not in :meth:`hparams`, not
    saved): above this many instances, eval-mode no-grad pooling runs chunk by chunk (see the
    module docstring); 0 never chunks.
    """

    ENCODER_PREFIXES = ("feat_proj.", "attention.")
    eval_in_pieces = True

    def __init__(
        self,
        in_dim: int = 1536,
        n_bins: int = 32,
        hidden_dim: int = 512,
        attn_dim: int = 384,
        dropout: float = 0.25,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ):
        super().__init__()
        self.chunk_size = check_chunk_size(chunk_size)
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

    def embed(self, x: torch.Tensor, chunk_size: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bag embedding (1, hidden_dim) and attention weights (N,) of one bag.

        ``chunk_size``: None = ``self.chunk_size`` when in eval mode with autograd off, else
        one pass; an int > 0 forces chunked pooling with that chunk size (differentiable, but
        then without the memory saving); 0 = one pass."""
        x = self._as_instances(x)
        if chunk_size is None:
            chunked = not self.training and not torch.is_grad_enabled()
            chunk_size = self.chunk_size if chunked else 0
        if 0 < chunk_size < x.shape[0]:
            return self._embed_chunked(x, chunk_size)
        h = self.feat_proj(x)
        attn = F.softmax(self.attention(h), dim=0)
        return (attn @ h).unsqueeze(0), attn

    def _embed_chunked(self, x: torch.Tensor, chunk_size: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Online-softmax attention pooling over chunks of ``chunk_size`` instances."""
        scores, pool = [], OnlineSoftmax()
        for start in range(0, x.shape[0], chunk_size):
            h = self.feat_proj(x[start:start + chunk_size])
            s = self.attention(h)  # (c,)
            scores.append(s)
            pool.add(s, h)
        attn = F.softmax(torch.cat(scores), dim=0)
        return pool.result().unsqueeze(0), attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Hazard logits (1, n_bins) of one bag."""
        z, _ = self.embed(x)
        return self.head(z)

