"""Patch-GCN (Chen et al., MICCAI 2021) for discrete-time survival, in the configuration of
method.md section 6.

Written from the Patch-GCN paper, the DeeperGCN paper (Li et al. 2020, GENConv) and method.md;
no code of the original repository (GPL-3.0) and no graph library: message passing is plain
PyTorch with ``index_add_`` / ``scatter_reduce``. A bag's graph is small and fixed (8 neighbours
per patch), so a gather and two scatters per layer are all that is needed; a graph library
would add a compiled dependency (torch-scatter / PyG wheels pinned to each torch build) for no
gain, and plain ops keep ``torch.func.functional_call`` (STEPH's merged forward) working. When
every node has the same number of in-edges, grouped by node (the k-NN graphs of
:mod:`steph.data.graphs` when every slide has more than k patches), the softmax is taken on a
dense (N, k, C) view instead: the same numbers, about half the time on CPU.

The network needs the bag's graph: ``forward(x, edge_index=...)`` with ``edge_index`` a (2, E)
int64 tensor of directed edges ``src -> dst`` (row 0: the neighbour, row 1: the node that
aggregates it), node ids indexing the rows of ``x`` (see :mod:`steph.data.graphs`). Calling it
without ``edge_index`` is an error: silently dropping the graph would train another network.

- Linear(in_dim -> 256) + ReLU + dropout 0.25;
- three GENConv layers: ``x_i' = MLP(x_i + sum_j softmax_j(t m_j) m_j)`` over the in-neighbours
  j of i, messages ``m_j = ReLU(x_j) + 1e-7``, the softmax taken per channel over the
  neighbours, learnable temperature t (starts at 1); MLP = Linear(256->512, no bias) ->
  LayerNorm -> ReLU -> Linear(512->256, no bias). A node without in-neighbours aggregates 0;
- the second and third layers are residual DeepGCN blocks ("res": conv -> LayerNorm -> ReLU ->
  x + h -> dropout 0.1); the first is its bare convolution. As in the reference configuration
  the first block also owns a LayerNorm that is never applied: it is kept so that the
  parameter count (1,586,980) and layout match method.md; it receives no gradient;
- the input and the three layer outputs concatenated (1024-d) -> Linear(1024->256) + ReLU +
  dropout 0.25; gated attention pooling (256, 256, dropout 0.25); Linear(256 -> n_bins).

The LayerNorms act per node (nn.LayerNorm), so nodes interact only through edges.

Large bags: time and memory are linear in the number of patches. In eval mode without autograd
a bag of more than ``chunk_size`` patches is computed exactly layer by layer in chunks of
destination nodes (:meth:`PatchGCN._embed_chunked`): only four (N, hidden) tensors are held,
never the (E, hidden) messages of the whole graph.

Encoder / head: the MIL encoder is everything but ``head`` (``fc.``, ``layers.``, ``phi.``,
``attention.``). ``embed`` returns the pooled vector and the attention weights (N,). The
network is invariant to a relabelling of the nodes applied to ``x`` and ``edge_index`` alike.

1,586,980 parameters at in_dim=1536, n_bins=32 (Table S4 says 1.69 M: see
docs/method-notes.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from steph.models.abmil import GatedAttention
from steph.models.base import DEFAULT_CHUNK_SIZE, MILNetwork, OnlineSoftmax, check_chunk_size
from steph.models.registry import register_model


def softmax_aggregate(messages: torch.Tensor, dst: torch.Tensor, n_nodes: int,
                      t: torch.Tensor, degree: int | None = None) -> torch.Tensor:
    """``out[i] = sum_{e: dst[e]=i} softmax(t * messages)[e] * messages[e]``, the softmax taken
    per channel over the edges into each node; 0 for nodes without incoming edges.

    messages: (E, C), dst: (E,) int64 -> (n_nodes, C). ``degree``: set when the edges are
    grouped by destination in node order with exactly ``degree`` edges per node (what
    :mod:`steph.data.graphs` gives for slides of more than k patches; see
    :func:`uniform_degree`): the softmax is then taken densely, about twice as fast on CPU."""
    if degree:
        m = messages.view(n_nodes, degree, -1)
        return (F.softmax(m * t, dim=1) * m).sum(dim=1)
    c = messages.shape[1]
    s = messages * t
    index = dst.unsqueeze(1).expand(-1, c)
    # shift by each node's max (a constant per softmax, so detached) for a stable exp
    smax = torch.zeros(n_nodes, c, dtype=s.dtype, device=s.device).scatter_reduce(
        0, index, s.detach(), reduce="amax", include_self=False)
    w = torch.exp(s - smax[dst])
    denom = torch.zeros(n_nodes, c, dtype=s.dtype, device=s.device).index_add_(0, dst, w)
    num = torch.zeros(n_nodes, c, dtype=s.dtype, device=s.device).index_add_(0, dst, w * messages)
    return num / denom.clamp_min(torch.finfo(s.dtype).tiny)  # isolated nodes: 0 / 0 -> 0


def uniform_degree(dst: torch.Tensor, n_nodes: int) -> int | None:
    """k when ``dst`` is ``[0]*k + [1]*k + ... + [n-1]*k`` (k >= 1), else None."""
    e = dst.numel()
    if e == 0 or e % n_nodes or dst.is_meta:
        return None
    k = e // n_nodes
    expected = torch.arange(n_nodes, device=dst.device).repeat_interleave(k)
    return k if torch.equal(dst, expected) else None


class GENConv(nn.Module):
    """Generalised graph convolution with softmax aggregation (DeeperGCN), no edge features."""

    def __init__(self, dim: int, t: float = 1.0, eps: float = 1e-7):
        super().__init__()
        self.eps = eps
        self.t = nn.Parameter(torch.tensor([float(t)]))
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim, bias=False), nn.LayerNorm(2 * dim),
                                 nn.ReLU(), nn.Linear(2 * dim, dim, bias=False))

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor,
                degree: int | None = None) -> torch.Tensor:
        # ReLU(x_j) + eps on the nodes, then gathered per edge (the same, 8x less work)
        messages = (F.relu(x) + self.eps)[edge_index[0]]
        return self.mlp(x + softmax_aggregate(messages, edge_index[1], x.shape[0], self.t,
                                              degree))


class DeepGCNBlock(nn.Module):
    """Residual block "res": conv -> LayerNorm -> ReLU -> x + h -> dropout."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.conv = GENConv(dim)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor,
                degree: int | None = None) -> torch.Tensor:
        return self.finish(x, self.conv(x, edge_index, degree))

    def finish(self, x: torch.Tensor, conv: torch.Tensor) -> torch.Tensor:
        """The block's output from its input ``x`` and its convolution's output (per node)."""
        return self.drop(x + F.relu(self.norm(conv)))


@register_model("patch_gcn", title="Patch-GCN")
class PatchGCN(MILNetwork):
    """Patch-GCN survival network (see the module docstring)."""

    ENCODER_PREFIXES = ("fc.", "layers.", "phi.", "attention.")
    bag_inputs = ("edge_index",)
    eval_in_pieces = True

    def __init__(self, in_dim: int = 1536, n_bins: int = 32, hidden_dim: int = 256,
                 n_layers: int = 3, dropout: float = 0.25, block_dropout: float = 0.1,
                 chunk_size: int = DEFAULT_CHUNK_SIZE):
        super().__init__()
        self.chunk_size = check_chunk_size(chunk_size)
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.in_dim, self.n_bins, self.hidden_dim = int(in_dim), int(n_bins), int(hidden_dim)
        self.n_layers, self.dropout, self.block_dropout = int(n_layers), float(dropout), float(block_dropout)
        h = self.hidden_dim
        self.fc = nn.Sequential(nn.Linear(self.in_dim, h), nn.ReLU(), nn.Dropout(self.dropout))
        self.layers = nn.ModuleList(DeepGCNBlock(h, self.block_dropout)
                                    for _ in range(self.n_layers))
        self.phi = nn.Sequential(nn.Linear(h * (self.n_layers + 1), h), nn.ReLU(),
                                 nn.Dropout(self.dropout))
        self.attention = GatedAttention(h, h, self.dropout)
        self.head = nn.Linear(h, self.n_bins)

    def hparams(self) -> dict:
        return {"in_dim": self.in_dim, "n_bins": self.n_bins, "hidden_dim": self.hidden_dim,
                "n_layers": self.n_layers, "dropout": self.dropout,
                "block_dropout": self.block_dropout}

    @staticmethod
    def _check_edges(edge_index: torch.Tensor | None, n: int) -> torch.Tensor:
        if edge_index is None:
            raise ValueError("PatchGCN needs the bag's graph: pass edge_index, a (2, E) int64 "
                             "tensor of edges src -> dst (see steph.data.graphs)")
        if edge_index.dim() != 2 or edge_index.shape[0] != 2 or edge_index.dtype != torch.int64:
            raise ValueError(f"edge_index must be a (2, E) int64 tensor, got "
                             f"{tuple(edge_index.shape)} {edge_index.dtype}")
        # (meta tensors, used to count FLOPs without computing, have no values to check)
        if edge_index.numel() and not edge_index.is_meta and (
                int(edge_index.min()) < 0 or int(edge_index.max()) >= n):
            raise ValueError(f"edge_index refers to nodes outside the bag of {n} instances "
                             f"(range {int(edge_index.min())}..{int(edge_index.max())})")
        return edge_index

    def embed(self, x: torch.Tensor, edge_index: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled vector (1, hidden_dim) and the attention weights (N,) of one bag."""
        x = self._bag(x)
        edge_index = self._check_edges(edge_index, x.shape[0])
        degree = uniform_degree(edge_index[1], x.shape[0])
        chunk = self._eval_chunk(x.shape[0])
        if chunk:
            return self._embed_chunked(x, edge_index, degree, chunk)
        h = self.fc(x)
        outs = [h]
        h = self.layers[0].conv(h, edge_index, degree)  # the first layer: a bare convolution
        outs.append(h)
        for layer in self.layers[1:]:
            h = layer(h, edge_index, degree)
            outs.append(h)
        h = self.phi(torch.cat(outs, dim=1))
        attn = F.softmax(self.attention(h), dim=0)
        return (attn @ h).unsqueeze(0), attn

    def _embed_chunked(self, x: torch.Tensor, edge_index: torch.Tensor, degree: int | None,
                       chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`embed` in chunks of ``chunk`` nodes, layer by layer (eval, no autograd).

        Each layer keeps its (N, hidden) node features whole and does the edge work (gather,
        softmax aggregation, MLP) for one chunk of destination nodes at a time; ``phi``'s input,
        the concatenation of the four (N, hidden) outputs, is never formed: its Linear is the
        sum of four block products, accumulated as the layers go; the attention pooling is an
        online softmax over chunks. The same result up to float rounding."""
        n, width = x.shape[0], self.hidden_dim
        src, dst = edge_index[0], edge_index[1]
        if degree is None:  # group the edges by destination node
            order = torch.argsort(dst, stable=True)
            src, dst = src[order], dst[order]
        starts = list(range(0, n, chunk))
        ptr = torch.searchsorted(dst, torch.tensor([*starts, n], device=dst.device)).tolist()

        def layer(conv: GENConv, h: torch.Tensor, finish=None) -> torch.Tensor:
            messages = F.relu(h) + conv.eps
            out = []
            for i, a in enumerate(starts):
                b = min(a + chunk, n)
                e = slice(ptr[i], ptr[i + 1])
                agg = softmax_aggregate(messages[src[e]], dst[e] - a, b - a, conv.t, degree)
                c = conv.mlp(h[a:b] + agg)
                out.append(c if finish is None else finish(h[a:b], c))
            return torch.cat(out)

        proj = self.phi[0]  # Linear over [h_0, h_1, ..., h_L]: one column block per layer
        h = torch.cat([self.fc(x[a:a + chunk]) for a in starts])
        pre = F.linear(h, proj.weight[:, :width], proj.bias)
        for i, block in enumerate(self.layers):
            # the first layer is its bare convolution (see the class docstring)
            h = layer(block.conv, h, None if i == 0 else block.finish)
            pre = pre + F.linear(h, proj.weight[:, (i + 1) * width:(i + 2) * width])
        scores, pool = [], OnlineSoftmax()
        for a in starts:
            hp = self.phi[2](self.phi[1](pre[a:a + chunk]))
            s = self.attention(hp)
            scores.append(s)
            pool.add(s, hp)
        return pool.result().unsqueeze(0), F.softmax(torch.cat(scores), dim=0)
