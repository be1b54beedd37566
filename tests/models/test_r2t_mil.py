"""R2T-MIL: regions, R-MSA with EPEG and CR-MSA against loop-by-loop oracles, locality, FLOPs."""

import math

import torch

from steph.models.flops import count_flops
from steph.models.r2t_mil import R2TMIL, merge, partition, region_grid


def test_square_and_regions_by_hand():
    assert region_grid(1, 8) == (8, 1)
    assert region_grid(65, 8) == (16, 2)  # ceil(sqrt(65)) = 9, up to a multiple of 8
    assert region_grid(10_000, 8) == (104, 13)
    x = torch.arange(16.0)[:, None]  # a 4 x 4 grid, 2 x 2 regions of 2 x 2
    regions = partition(x, 4, 2)[..., 0]
    assert regions.tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    torch.testing.assert_close(merge(partition(x, 4, 2), 4, 2), x)


def _region_cells(n, region_num):
    side, size = region_grid(n, region_num)
    cells = [[(a * size + i) * side + b * size + j for i in range(size) for j in range(size)]
             for a in range(side // size) for b in range(side // size)]
    return side, cells


def _attention(t, attn, epeg=None):
    """Multi-head self-attention of the tokens t (P, C) with attn's weights, one head at a time;
    EPEG written out as the explicit sum over the kernel along the query axis."""
    p, c = t.shape
    heads, dh = attn.heads, c // attn.heads
    qkv = t @ attn.qkv.weight.T + attn.qkv.bias
    outs = []
    for h in range(heads):
        q, k, v = (qkv[:, s * c + h * dh: s * c + (h + 1) * dh] for s in range(3))
        logits = q @ k.T / math.sqrt(dh)
        if epeg is not None:
            w, b = epeg.weight[h, 0, :, 0], epeg.bias[h]
            half = len(w) // 2
            pe = torch.zeros_like(logits) + b
            for i in range(p):
                for o in range(len(w)):
                    if 0 <= i + o - half < p:
                        pe[i] += w[o] * logits[i + o - half]
            logits = logits + pe
        outs.append(torch.softmax(logits, dim=-1) @ v)
    return torch.cat(outs, dim=1) @ attn.proj.weight.T + attn.proj.bias


def rmsa_oracle(layer, x):
    n, c = x.shape
    side, cells = _region_cells(n, layer.region_num)
    h = torch.cat([layer.norm(x), x.new_zeros(side * side - n, c)])
    out = torch.zeros_like(h)
    for idx in cells:
        out[idx] = _attention(h[idx], layer.attn, layer.attn.epeg)
    return x + out[:n]


def crmsa_oracle(layer, x):
    n, c = x.shape
    side, cells = _region_cells(n, layer.region_num)
    h = torch.cat([layer.norm(x), x.new_zeros(side * side - n, c)])
    k = layer.phi.shape[1]
    logits = [h[idx] @ layer.phi for idx in cells]  # (P, k) per region
    reps = [[torch.softmax(lg[:, j], 0) @ h[idx] for idx, lg in zip(cells, logits)]
            for j in range(k)]
    outs = [_attention(torch.stack(reps[j]), layer.attn) for j in range(k)]  # (R, C) per j
    back = torch.zeros_like(h)
    for r, (idx, lg) in enumerate(zip(cells, logits)):
        combine = torch.softmax(lg, dim=1)  # over k, per token
        scale = (lg - lg.min(0).values) / (lg.max(0).values - lg.min(0).values + 1e-8)
        for j in range(k):
            back[idx] += (combine[:, j] * scale[:, j])[:, None] * outs[j][r]
    return x + back[:n]


def tiny(**kw):
    torch.manual_seed(0)
    return R2TMIL(12, 4, dim=8, heads=2, region_num=2, epeg_kernel=3, **kw).double().eval()


def test_rmsa_layer_against_loops():
    model = tiny()
    x = torch.randn(11, 8, dtype=torch.float64)  # side 4 (ceil(sqrt 11) = 4), 5 padding tokens
    torch.testing.assert_close(model.rmsa(x), rmsa_oracle(model.rmsa, x))


def test_crmsa_layer_against_loops():
    model = tiny()
    x = torch.randn(11, 8, dtype=torch.float64)
    torch.testing.assert_close(model.crmsa(x), crmsa_oracle(model.crmsa, x))


def test_rmsa_is_local_to_regions():
    """Changing one token changes R-MSA's output in its own region only."""
    model = tiny()
    x = torch.randn(30, 8, dtype=torch.float64)  # side 6, 4 regions of 3 x 3
    y = x.clone()
    y[7] += torch.randn(8, dtype=torch.float64)  # cell (1, 1): region 0 = rows 0-2, cols 0-2
    diff = (model.rmsa(y) - model.rmsa(x)).abs().sum(1) > 0
    _, cells = _region_cells(30, 2)
    assert set(torch.nonzero(diff).flatten().tolist()) == set(cells[0])


def test_flops_at_10k_match_table_s4_counting_layers():
    n, d, c = 10_000, 1536, 512
    with torch.device("meta"):
        model = R2TMIL(d, 32)
    flops = count_flops(model, torch.empty(n, d, device="meta"))
    t = 104 * 104  # the padded square: 64 regions of 13 x 13 = 169 tokens
    p, r, k, heads = 169, 64, 3, 8
    rmsa = 2 * t * c * 3 * c + 2 * t * c * c + 2 * r * heads * p * p * 15  # qkv, proj, EPEG conv
    crmsa = 2 * k * r * c * 3 * c + 2 * k * r * c * c  # qkv and proj over k x 64 region tokens
    layers = 2 * n * d * c + rmsa + crmsa + 2 * n * c * 128 + 2 * n * 128 + 2 * c * 32
    assert flops.layers == layers
    assert round(layers / 1e9, 1) == 40.6  # Table S4: 40.7
    scores = 2 * 2 * r * heads * p * p * (c // heads)  # q k^T and attn v within the regions
    cross = 2 * t * c * k + 2 * r * k * p * c * 2 + 2 * 2 * k * heads * r * r * (c // heads)
    assert flops.total == layers + scores + cross + 2 * n * c
