"""TransMIL (Shao et al., NeurIPS 2021) for discrete-time survival, as in method.md section 6.

Written from the TransMIL paper, the Nystromformer paper (Xiong et al., AAAI 2021) and
method.md; no code of the original repositories.

The network: Linear(in_dim -> 512) + ReLU; the sequence is padded to the next square H x W by
repeating its first tokens and a learned class token is prepended; TransLayer (pre-LayerNorm +
Nystrom attention, residual); PPEG (depth-wise 7x7, 5x5 and 3x3 convolutions on the H x W grid
plus identity; the class token passes unchanged); a second TransLayer; LayerNorm; the class
token is the bag embedding -> Linear(512 -> n_bins).

Nystrom attention (8 heads of 64, 256 landmarks, 6 Moore-Penrose iterations): the sequence is
zero-padded at the front to a multiple of the landmark count; landmarks are segment means of
q and k; ``softmax(q k_l^T) pinv(softmax(q_l k_l^T)) softmax(q_l k^T) v``; a residual
depth-wise Conv2d(8, 8, (33, 1), no bias) along the sequence on v; output Linear + dropout 0.1.
The iterative pseudo-inverse is initialised per matrix, ``Z_0 = A^T / (||A||_1 ||A||_inf)``, as
in the Nystromformer paper. Padding tokens are not masked (as in the reference configuration).

Encoder / head: the MIL encoder is everything but the final classifier ``head`` (projection,
class token, both TransLayers, PPEG, final LayerNorm). ``embed`` returns the normalised class
token and no attention (Nystrom attention has no per-instance weight to report).

2,949,680 parameters at in_dim=1536, n_bins=32. The network is not permutation invariant (the
grid positions feed PPEG).

Large bags: memory is linear in the number of instances (about 40 kB per instance at
inference), but no exact split of a bag exists: the landmarks are means over segments of n/256
tokens, the third Nystrom kernel is a softmax over all n keys, PPEG and the residual
convolution need neighbouring rows, and each layer needs the whole previous output. The whole
bag is therefore evaluated at once (``eval_in_pieces = False``); an experiment may sample the
patches of bags above ``data.eval_max_instances`` and records it (see steph.experiments.cv).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from steph.models.base import MILNetwork, ceil_sqrt, head_dim
from steph.models.registry import register_model


def moore_penrose_pinv(a: torch.Tensor, iters: int) -> torch.Tensor:
    """Iterative pseudo-inverse of the square matrices ``a`` (..., m, m) (Razavi et al. 2014):
    ``Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4``, cubically convergent from
    ``Z_0 = A^T / (||A||_1 ||A||_inf)`` (each matrix scaled by its own norms)."""
    absa = a.abs()
    norm_1 = absa.sum(dim=-2).amax(dim=-1)  # largest column sum
    norm_inf = absa.sum(dim=-1).amax(dim=-1)  # largest row sum
    z = a.transpose(-1, -2) / (norm_1 * norm_inf)[..., None, None]
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def nystrom_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_landmarks: int,
                      pinv_iterations: int) -> torch.Tensor:
    """Nystrom approximation of ``softmax(q k^T) v`` for (heads, n, d) tensors whose length n is
    a multiple of ``n_landmarks`` (q already scaled). Exact when every segment has one token
    (``n == n_landmarks``) and the pseudo-inverse has converged."""
    h, n, d = q.shape
    seg = n // n_landmarks
    q_l = q.reshape(h, n_landmarks, seg, d).mean(dim=2)
    k_l = k.reshape(h, n_landmarks, seg, d).mean(dim=2)
    kernel_1 = F.softmax(q @ k_l.transpose(-1, -2), dim=-1)  # (h, n, m)
    kernel_2 = F.softmax(q_l @ k_l.transpose(-1, -2), dim=-1)  # (h, m, m)
    kernel_3 = F.softmax(q_l @ k.transpose(-1, -2), dim=-1)  # (h, m, n)
    return (kernel_1 @ moore_penrose_pinv(kernel_2, pinv_iterations)) @ (kernel_3 @ v)


class NystromAttention(nn.Module):
    """Multi-head Nystrom self-attention over one sequence (n, dim) -> (n, dim)."""

    def __init__(self, dim: int, heads: int = 8, n_landmarks: int = 256,
                 pinv_iterations: int = 6, residual_kernel: int | None = 33,
                 dropout: float = 0.1):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim(dim, heads)
        self.n_landmarks, self.pinv_iterations = n_landmarks, pinv_iterations
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        # depth-wise convolution along the sequence on v, one filter per head
        self.res_conv = None
        if residual_kernel:
            self.res_conv = nn.Conv2d(heads, heads, (residual_kernel, 1),
                                      padding=(residual_kernel // 2, 0), groups=heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        pad = -n % self.n_landmarks
        if pad:  # at the front, so that the real tokens keep their segment alignment at the end
            x = F.pad(x, (0, 0, pad, 0))
        q, k, v = (t.reshape(-1, self.heads, self.head_dim).transpose(0, 1)
                   for t in self.to_qkv(x).chunk(3, dim=-1))
        out = nystrom_attention(q * self.head_dim ** -0.5, k, v, self.n_landmarks,
                                self.pinv_iterations)
        if self.res_conv is not None:
            out = out + self.res_conv(v.unsqueeze(0)).squeeze(0)
        out = self.to_out(out.transpose(0, 1).reshape(-1, self.heads * self.head_dim))
        return out[pad:]


class TransLayer(nn.Module):
    """x + NystromAttention(LayerNorm(x))."""

    def __init__(self, dim: int, **attn: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, **attn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm(x))


class PPEG(nn.Module):
    """Pyramid position encoding: depth-wise 7x7, 5x5, 3x3 convolutions plus identity on the
    H x W grid of the tokens after the class token."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj7 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.proj5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.proj3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        cls, feat = x[:1], x[1:]
        grid = feat.transpose(0, 1).reshape(1, -1, side, side)  # row-major token order
        grid = grid + self.proj7(grid) + self.proj5(grid) + self.proj3(grid)
        return torch.cat([cls, grid.flatten(2)[0].transpose(0, 1)], dim=0)


@register_model("transmil", title="TransMIL")
class TransMIL(MILNetwork):
    """TransMIL survival network (see the module docstring)."""

    ENCODER_PREFIXES = ("feat_proj.", "cls_token", "layer1.", "ppeg.", "layer2.", "norm.")

    def __init__(self, in_dim: int = 1536, n_bins: int = 32, dim: int = 512, heads: int = 8,
                 n_landmarks: int = 256, pinv_iterations: int = 6, residual_kernel: int = 33,
                 dropout: float = 0.1):
        super().__init__()
        self.in_dim, self.n_bins, self.dim, self.heads = int(in_dim), int(n_bins), int(dim), int(heads)
        self.n_landmarks, self.pinv_iterations = int(n_landmarks), int(pinv_iterations)
        self.residual_kernel, self.dropout = int(residual_kernel), float(dropout)
        attn = {"heads": self.heads, "n_landmarks": self.n_landmarks,
                "pinv_iterations": self.pinv_iterations,
                "residual_kernel": self.residual_kernel, "dropout": self.dropout}
        self.feat_proj = nn.Sequential(nn.Linear(self.in_dim, self.dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, self.dim))
        self.layer1 = TransLayer(self.dim, **attn)
        self.ppeg = PPEG(self.dim)
        self.layer2 = TransLayer(self.dim, **attn)
        self.norm = nn.LayerNorm(self.dim)
        self.head = nn.Linear(self.dim, self.n_bins)

    def hparams(self) -> dict:
        return {"in_dim": self.in_dim, "n_bins": self.n_bins, "dim": self.dim,
                "heads": self.heads, "n_landmarks": self.n_landmarks,
                "pinv_iterations": self.pinv_iterations,
                "residual_kernel": self.residual_kernel, "dropout": self.dropout}

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Normalised class token (1, dim) of one bag; no per-instance attention."""
        h = self.feat_proj(self._bag(x))
        n = h.shape[0]
        side = ceil_sqrt(n)
        # square the sequence by repeating its first tokens (side^2 - n <= n for every n >= 1)
        h = torch.cat([self.cls_token, h, h[: side * side - n]], dim=0)
        h = self.layer2(self.ppeg(self.layer1(h), side))
        return self.norm(h[:1]), None
