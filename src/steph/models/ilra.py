"""ILRA (Xiang & Zhang, ICLR 2023) for discrete-time survival, as in method.md section 6.

Written from the ILRA paper and method.md; no code of the original repository.

The network (hidden 256, 2 blocks, 8 heads, rank k = 1, no LayerNorm, no dropout):

- each attention unit ``MHA(Q, K)``: ``q = fc_q(Q)``, ``k = fc_k(K)``, ``v = fc_v(K)``; a
  standard multi-head attention with its own input projections and output projection
  (``attn``: the layout of ``torch.nn.MultiheadAttention``) gives ``A``; ``O = q + A``;
  ``O = O + ReLU(fc_o(O))``; gated units multiply by ``SiLU(gate(Q))``. The inner attention's
  projections are what bring the count to Table S4's 4.21 M (without them: 2.90 M);
- each block (GAB): a learned latent ``L`` (k x 256); ``H = MHA(L, X)`` (the latent reads the
  bag) then ``X' = MHA(X, H)`` (every instance reads the latent), both gated: the block is
  linear in the number of instances;
- pooling: a learned seed (1 x 256) attends to the instances (ungated unit), then
  Linear(256 -> n_bins).

Initialisation: xavier-normal weights for every Linear (the inner attention's biases start at 0,
as in ``torch.nn.MultiheadAttention``), xavier-uniform latents and seed.

Encoder / head: the MIL encoder is both blocks and the pooling unit (``blocks.``, ``pool.``);
the head is ``head``. ``embed`` returns the pooled vector and the pooling attention averaged
over heads (N,). The network is permutation invariant.

Large bags: the network is linear in the number of instances. In eval mode without autograd a
bag of more than ``chunk_size`` instances is computed exactly in chunks: the latent (and the
pooling seed) reads the instances by an online softmax over chunks of keys, and the instances
read the latent chunk by chunk; only the (N, hidden) block outputs are held whole.

4,214,560 parameters at in_dim=1536, n_bins=32.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from steph.models.base import (
    DEFAULT_CHUNK_SIZE,
    MILNetwork,
    OnlineSoftmax,
    check_chunk_size,
    head_dim,
)
from steph.models.registry import register_model


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention with ``heads`` heads and input/output projections."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim(dim, heads)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.out_proj = nn.Linear(dim, dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # (n, dim) -> (heads, n, head_dim)
        return t.reshape(-1, self.heads, self.head_dim).transpose(0, 1)

    def _merge(self, t: torch.Tensor) -> torch.Tensor:  # (heads, n, head_dim) -> (n, dim)
        return self.out_proj(t.transpose(0, 1).reshape(-1, self.heads * self.head_dim))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(nq, dim), (nk, dim), (nk, dim) -> output (nq, dim), weights (heads, nq, nk)."""
        q, k, v = self._split(self.q_proj(q)), self._split(self.k_proj(k)), self._split(self.v_proj(v))
        w = F.softmax((q * self.head_dim ** -0.5) @ k.transpose(-1, -2), dim=-1)
        return self._merge(w @ v), w

    def forward_streamed(self, q: torch.Tensor,
                         kv_chunks: Iterable[tuple[torch.Tensor, torch.Tensor]]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`forward` with the keys and values given chunk by chunk (an online
        softmax over the chunks): only one chunk's projections are held at a time."""
        q = self._split(self.q_proj(q)) * self.head_dim ** -0.5
        scores, pool = [], OnlineSoftmax()
        for k, v in kv_chunks:
            s = q @ self._split(self.k_proj(k)).transpose(-1, -2)  # (heads, nq, c)
            scores.append(s)
            pool.add(s, self._split(self.v_proj(v)))
        return self._merge(pool.result()), F.softmax(torch.cat(scores, dim=-1), dim=-1)


class AttentionUnit(nn.Module):
    """ILRA's attention unit: ``O = q + MHA(q, k, v)``, ``O + ReLU(fc_o(O))``, optional gate."""

    def __init__(self, dim_q: int, dim_k: int, dim: int, heads: int, gated: bool):
        super().__init__()
        self.fc_q = nn.Linear(dim_q, dim)
        self.fc_k = nn.Linear(dim_k, dim)
        self.fc_v = nn.Linear(dim_k, dim)
        self.attn = MultiHeadAttention(dim, heads)
        self.fc_o = nn.Linear(dim, dim)
        self.gate = nn.Linear(dim_q, dim) if gated else None

    def forward(self, query: torch.Tensor, key: torch.Tensor, chunk: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``chunk`` > 0: queries and keys beyond that many rows are taken in chunks of it
        (the same result up to float rounding; eval-time memory bound)."""
        if chunk and query.shape[0] > chunk:  # every query is independent of the others
            parts = [self(query[i:i + chunk], key, chunk) for i in range(0, query.shape[0], chunk)]
            return torch.cat([o for o, _ in parts]), torch.cat([w for _, w in parts], dim=1)
        q = self.fc_q(query)
        if chunk and key.shape[0] > chunk:
            a, w = self.attn.forward_streamed(
                q, ((self.fc_k(c), self.fc_v(c)) for c in key.split(chunk)))
        else:
            a, w = self.attn(q, self.fc_k(key), self.fc_v(key))
        o = q + a
        o = o + F.relu(self.fc_o(o))
        if self.gate is not None:
            o = o * F.silu(self.gate(query))
        return o, w


class GAB(nn.Module):
    """One low-rank block: the latent reads the bag, then every instance reads the latent."""

    def __init__(self, dim_in: int, dim: int, heads: int, rank: int):
        super().__init__()
        self.latent = nn.Parameter(torch.empty(rank, dim))
        self.to_latent = AttentionUnit(dim, dim_in, dim, heads, gated=True)
        self.to_instances = AttentionUnit(dim_in, dim, dim, heads, gated=True)

    def forward(self, x: torch.Tensor, chunk: int = 0) -> torch.Tensor:
        h, _ = self.to_latent(self.latent, x, chunk)
        return self.to_instances(x, h, chunk)[0]


class SeedPooling(nn.Module):
    """A learned seed attends to the instances (ILRA's non-local pooling)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.seed = nn.Parameter(torch.empty(1, dim))
        self.attn = AttentionUnit(dim, dim, dim, heads, gated=False)

    def forward(self, x: torch.Tensor, chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        z, w = self.attn(self.seed, x, chunk)
        return z, w.mean(dim=0)[0]  # (1, dim), (N,)


@register_model("ilra", title="ILRA")
class ILRA(MILNetwork):
    """ILRA survival network (see the module docstring)."""

    ENCODER_PREFIXES = ("blocks.", "pool.")
    eval_in_pieces = True

    def __init__(self, in_dim: int = 1536, n_bins: int = 32, hidden_dim: int = 256,
                 n_blocks: int = 2, heads: int = 8, rank: int = 1,
                 chunk_size: int = DEFAULT_CHUNK_SIZE):
        super().__init__()
        self.chunk_size = check_chunk_size(chunk_size)
        self.in_dim, self.n_bins, self.hidden_dim = int(in_dim), int(n_bins), int(hidden_dim)
        self.n_blocks, self.heads, self.rank = int(n_blocks), int(heads), int(rank)
        self.blocks = nn.ModuleList(
            GAB(self.in_dim if i == 0 else self.hidden_dim, self.hidden_dim, self.heads, self.rank)
            for i in range(self.n_blocks))
        self.pool = SeedPooling(self.hidden_dim, self.heads)
        self.head = nn.Linear(self.hidden_dim, self.n_bins)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
            if isinstance(m, MultiHeadAttention):
                for lin in (m.q_proj, m.k_proj, m.v_proj, m.out_proj):
                    nn.init.zeros_(lin.bias)
        for block in self.blocks:
            nn.init.xavier_uniform_(block.latent)
        nn.init.xavier_uniform_(self.pool.seed)

    def hparams(self) -> dict:
        return {"in_dim": self.in_dim, "n_bins": self.n_bins, "hidden_dim": self.hidden_dim,
                "n_blocks": self.n_blocks, "heads": self.heads, "rank": self.rank}

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled vector (1, hidden_dim) and the pooling attention (N,) of one bag."""
        h = self._bag(x)
        chunk = self._eval_chunk(h.shape[0])
        for block in self.blocks:
            h = block(h, chunk)
        return self.pool(h, chunk)
