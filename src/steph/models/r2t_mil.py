"""R2T-MIL (Tang et al., CVPR 2024: re-embedded regional transformer) for discrete-time survival,
as in method.md section 6.

Written from the R2T paper and method.md; no code of the original repository.

The network: Linear(in_dim -> 512) + ReLU + dropout 0.25; a regional MSA layer; a cross-region
MSA layer; LayerNorm; attention pooling (Linear 512->128 no bias, ReLU, Linear 128->1 no bias,
softmax over the instances); Linear(512 -> n_bins).

- **Squaring.** A sequence of n tokens is laid row-major on a square whose side is
  ceil(sqrt(n)) rounded up to a multiple of ``region_num`` (8), zero-padded at the end, and cut
  into region_num x region_num regions of equal size. The padding tokens take part in the
  attention unmasked and are dropped afterwards, as in the reference configuration.
- **R-MSA** (pre-LayerNorm, residual): multi-head self-attention (8 heads, qkv with bias)
  within each region; EPEG adds a depth-wise Conv2d(8, 8, (15, 1), bias) of each region's
  attention logits (along the query axis) to those logits before the softmax; output Linear +
  dropout 0.1.
- **CR-MSA** (pre-LayerNorm, residual): per region, logits ``x phi`` (phi: dim x k, k = 3) give
  k representative tokens (softmax over the region's tokens); the k-th representatives of all
  regions attend to each other (8 heads, no EPEG); each token gets back the sum over k of its
  representative's output weighted by the softmax over k of its logit and by its min-max
  normalised logit.

Cost: the regions have ~n/64 tokens each, so R-MSA costs ~n^2/64 (quadratic with a small
constant, not linear); regions are independent, so it can be evaluated region by region exactly:
in eval mode without autograd, a bag of more than ``chunk_size`` instances is (memory for one
region's attention logits, ~1.4 GB at 240,000 instances, instead of all 64 regions'; the
compute stays ~n^2/64).

Encoder / head: the MIL encoder is everything but ``head`` (projection, both MSA layers, final
LayerNorm, attention pooling). ``embed`` returns the pooled vector and the pooling weights (N,).
The network is not permutation invariant (regions depend on the order).

2,975,008 parameters at in_dim=1536, n_bins=32. Initialisation: xavier-normal weights and zero
biases for Linear and Conv2d, phi kaiming-uniform.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from steph.models.base import (
    DEFAULT_CHUNK_SIZE,
    MILNetwork,
    ceil_sqrt,
    check_chunk_size,
    head_dim,
)
from steph.models.registry import register_model


def region_grid(n: int, region_num: int) -> tuple[int, int]:
    """(side, region_size): the square that holds n tokens, its side a multiple of region_num."""
    side = ceil_sqrt(n)
    side += -side % region_num
    return side, side // region_num


def partition(x: torch.Tensor, side: int, size: int) -> torch.Tensor:
    """(side*side, C) row-major grid -> (regions, size*size, C); regions and the tokens in each
    region in row-major order."""
    r = side // size
    return x.reshape(r, size, r, size, -1).transpose(1, 2).reshape(r * r, size * size, -1)


def merge(regions: torch.Tensor, side: int, size: int) -> torch.Tensor:
    """Inverse of :func:`partition`."""
    r = side // size
    return regions.reshape(r, r, size, size, -1).transpose(1, 2).reshape(side * side, -1)


class RegionAttention(nn.Module):
    """Multi-head self-attention within each of a batch of regions (R, P, dim), with optional
    EPEG on the attention logits."""

    def __init__(self, dim: int, heads: int, dropout: float, epeg_kernel: int | None):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim(dim, heads)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.epeg = None
        if epeg_kernel:
            self.epeg = nn.Conv2d(heads, heads, (epeg_kernel, 1), padding=(epeg_kernel // 2, 0),
                                  groups=heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, p, c = x.shape
        q, k, v = self.qkv(x).reshape(r, p, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        logits = (q * self.head_dim ** -0.5) @ k.transpose(-1, -2)  # (R, heads, P, P)
        if self.epeg is not None:
            logits = logits + self.epeg(logits)
        out = F.softmax(logits, dim=-1) @ v
        return self.drop(self.proj(out.transpose(1, 2).reshape(r, p, c)))


class RMSALayer(nn.Module):
    """x + R-MSA(LayerNorm(x)) over the squared, padded sequence."""

    def __init__(self, dim: int, heads: int, region_num: int, dropout: float, epeg_kernel: int):
        super().__init__()
        self.region_num = region_num
        self.norm = nn.LayerNorm(dim)
        self.attn = RegionAttention(dim, heads, dropout, epeg_kernel)

    def forward(self, x: torch.Tensor, by_region: bool = False) -> torch.Tensor:
        """``by_region``: attend within one region at a time (regions are independent: the
        same result, memory for one region's attention instead of all)."""
        n = x.shape[0]
        side, size = region_grid(n, self.region_num)
        regions = partition(F.pad(self.norm(x), (0, 0, 0, side * side - n)), side, size)
        if by_region:
            out = torch.cat([self.attn(regions[i:i + 1]) for i in range(regions.shape[0])])
        else:
            out = self.attn(regions)
        return x + merge(out, side, size)[:n]


class CRMSALayer(nn.Module):
    """x + CR-MSA(LayerNorm(x)): k representatives per region attend across regions."""

    def __init__(self, dim: int, heads: int, region_num: int, dropout: float, k: int):
        super().__init__()
        self.region_num = region_num
        self.norm = nn.LayerNorm(dim)
        self.phi = nn.Parameter(torch.empty(dim, k))
        self.attn = RegionAttention(dim, heads, dropout, epeg_kernel=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        side, size = region_grid(n, self.region_num)
        regions = partition(F.pad(self.norm(x), (0, 0, 0, side * side - n)), side, size)
        logits = (regions @ self.phi).transpose(1, 2)  # (R, k, P)
        dispatch = F.softmax(logits, dim=-1)  # each representative: a mix of its region
        combine = F.softmax(logits, dim=1)  # each token: a mix of its region's representatives
        lo, hi = logits.amin(dim=-1, keepdim=True), logits.amax(dim=-1, keepdim=True)
        scale = (logits - lo) / (hi - lo + 1e-8)
        reps = (dispatch @ regions).transpose(0, 1)  # (k, R, C): one sequence of regions per k
        out = self.attn(reps).transpose(0, 1)  # (R, k, C)
        back = (combine * scale).transpose(1, 2) @ out  # (R, P, C)
        return x + merge(back, side, size)[:n]


@register_model("r2t_mil", title="R2T-MIL")
class R2TMIL(MILNetwork):
    """R2T-MIL survival network (see the module docstring)."""

    ENCODER_PREFIXES = ("feat_proj.", "rmsa.", "crmsa.", "norm.", "pool.")
    eval_in_pieces = True

    def __init__(self, in_dim: int = 1536, n_bins: int = 32, dim: int = 512, heads: int = 8,
                 region_num: int = 8, epeg_kernel: int = 15, crmsa_k: int = 3,
                 attn_dim: int = 128, dropout: float = 0.25, trans_dropout: float = 0.1,
                 chunk_size: int = DEFAULT_CHUNK_SIZE):
        super().__init__()
        self.chunk_size = check_chunk_size(chunk_size)
        self.in_dim, self.n_bins, self.dim, self.heads = int(in_dim), int(n_bins), int(dim), int(heads)
        self.region_num, self.epeg_kernel, self.crmsa_k = int(region_num), int(epeg_kernel), int(crmsa_k)
        self.attn_dim, self.dropout, self.trans_dropout = int(attn_dim), float(dropout), float(trans_dropout)
        self.feat_proj = nn.Sequential(nn.Linear(self.in_dim, self.dim), nn.ReLU(),
                                       nn.Dropout(self.dropout))
        self.rmsa = RMSALayer(self.dim, self.heads, self.region_num, self.trans_dropout,
                              self.epeg_kernel)
        self.crmsa = CRMSALayer(self.dim, self.heads, self.region_num, self.trans_dropout,
                                self.crmsa_k)
        self.norm = nn.LayerNorm(self.dim)
        self.pool = nn.Sequential(nn.Linear(self.dim, self.attn_dim, bias=False), nn.ReLU(),
                                  nn.Linear(self.attn_dim, 1, bias=False))
        self.head = nn.Linear(self.dim, self.n_bins)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.kaiming_uniform_(self.crmsa.phi, a=math.sqrt(5))

    def hparams(self) -> dict:
        return {"in_dim": self.in_dim, "n_bins": self.n_bins, "dim": self.dim,
                "heads": self.heads, "region_num": self.region_num,
                "epeg_kernel": self.epeg_kernel, "crmsa_k": self.crmsa_k,
                "attn_dim": self.attn_dim, "dropout": self.dropout,
                "trans_dropout": self.trans_dropout}

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled vector (1, dim) and the pooling attention (N,) of one bag."""
        h = self.feat_proj(self._bag(x))
        h = self.norm(self.crmsa(self.rmsa(h, by_region=bool(self._eval_chunk(h.shape[0])))))
        attn = F.softmax(self.pool(h).squeeze(-1), dim=0)
        return (attn @ h).unsqueeze(0), attn
