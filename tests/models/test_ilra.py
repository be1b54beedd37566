"""ILRA: the attention unit against torch's MultiheadAttention, permutation invariance, rank, FLOPs."""

import torch
import torch.nn.functional as F
from torch import nn

from steph.models.flops import count_flops
from steph.models.ilra import ILRA, AttentionUnit


def test_attention_unit_against_torch_multihead_attention():
    torch.manual_seed(0)
    unit = AttentionUnit(dim_q=6, dim_k=10, dim=8, heads=2, gated=True).double()
    query, key = torch.randn(3, 6, dtype=torch.float64), torch.randn(7, 10, dtype=torch.float64)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double()
    a = unit.attn
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
        mha.out_proj.weight.copy_(a.out_proj.weight)
        mha.out_proj.bias.copy_(a.out_proj.bias)
    q = unit.fc_q(query)
    attended, weights = mha(q[None], unit.fc_k(key)[None], unit.fc_v(key)[None],
                            average_attn_weights=False)
    o = q + attended[0]
    o = o + F.relu(unit.fc_o(o))
    o = o * F.silu(unit.gate(query))
    out, w = unit(query, key)
    torch.testing.assert_close(out, o)
    torch.testing.assert_close(w, weights[0])


def test_permutation_invariant():
    torch.manual_seed(0)
    model = ILRA(12, 4, hidden_dim=16, heads=2).double().eval()
    x = torch.randn(25, 12, dtype=torch.float64)
    perm = torch.randperm(25)
    out, z_attn = model(x), model.embed(x)[1]
    torch.testing.assert_close(model(x[perm]), out)
    torch.testing.assert_close(model.embed(x[perm])[1], z_attn[perm])  # attention follows


def test_rank_one_makes_the_back_projection_keys_inert_rank_two_does_not():
    """With one latent token every instance's softmax is [1]: the back-projection's queries and
    keys cannot matter. With two they do."""
    torch.manual_seed(0)
    x = torch.randn(10, 12)
    for rank, inert in ((1, True), (2, False)):
        model = ILRA(12, 4, hidden_dim=16, heads=2, rank=rank)
        model(x).sum().backward()
        g = model.blocks[0].to_instances.attn.k_proj.weight.grad
        assert (g is None or not g.any()) == inert


def test_flops_at_10k_match_table_s4():
    n, d, h = 10_000, 1536, 256
    with torch.device("meta"):
        model = ILRA(d, 32)
    flops = count_flops(model, torch.empty(n, d, device="meta"))
    big, small, row = 2 * n * d * h, 2 * n * h * h, 2 * h * h  # Linear over the instances, over one token
    # block 1, latent reads X: fc_k, fc_v (big), inner k, v (small); fc_q, inner q, out, fc_o,
    # gate on the latent token (5 rows). X reads the latent: fc_q, gate (big); inner q, out,
    # fc_o (small); fc_k, fc_v, inner k, v on the latent token (4 rows)
    block1 = 4 * big + 5 * small + 9 * row
    block2 = 9 * small + 9 * row
    pool = 4 * small + 4 * row  # the seed reads X: fc_k, fc_v, inner k, v; seed rows
    assert flops.layers == block1 + block2 + pool + 2 * h * 32
    # attention scores and weighted sums (5 units, one side of each is a single token)
    assert flops.total - flops.layers == 5 * 4 * h * n
    assert round(flops.total / 1e9, 1) == 55.1  # Table S4: 55.3
