"""What each network does with a bag above its chunk size (``chunk_size``, eval mode without
autograd): ILRA and Patch-GCN compute it exactly in chunks, R2T-MIL region by region, TransMIL
whole (it cannot be split). Chunked results are checked against the one-pass path, which the
other test files check against independent computations."""

import pytest
import torch

from steph.models import create_model
from steph.models.base import OnlineSoftmax
from steph.models.ilra import MultiHeadAttention
from steph.models.r2t_mil import RegionAttention

PIECES = {"abmil": True, "ilra": True, "patch_gcn": True, "r2t_mil": True, "transmil": False}


def _sharpened(model, factor=30.0):
    """Scale every weight matrix up so that attention logits span a wide range: the running
    maxima of the online softmaxes move between chunks, and exp() would overflow without them."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(factor ** (1 / 3))
    return model


def _one_pass_and_chunked(model, x, chunk, **extra):
    with torch.no_grad():
        model.chunk_size = 0
        z1, a1 = model.embed(x, **extra)
        model.chunk_size = chunk
        z2, a2 = model.embed(x, **extra)
    return (z1, a1), (z2, a2)


@pytest.mark.parametrize("name", sorted(PIECES))
def test_each_network_declares_its_policy(name, tiny_net):
    model = tiny_net(name)
    assert type(model).eval_in_pieces is PIECES[name]
    assert "chunk_size" not in model.hparams()  # a performance setting, not a hyper-parameter
    if PIECES[name]:
        assert model.chunk_size == 65_536
        assert create_model(name, in_dim=12, n_bins=4, chunk_size=0).chunk_size == 0


def test_online_softmax_against_one_pass():
    torch.manual_seed(0)
    s = torch.randn(3, 2, 50, dtype=torch.float64) * 40  # (heads, queries, keys)
    v = torch.randn(3, 50, 4, dtype=torch.float64)
    pool = OnlineSoftmax()
    for a in range(0, 50, 7):
        pool.add(s[..., a:a + 7], v[:, a:a + 7])
    torch.testing.assert_close(pool.result(), torch.softmax(s, -1) @ v)


def test_streamed_attention_equals_attention():
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2).double()
    q, k, v = (torch.randn(n, 8, dtype=torch.float64) * 5 for n in (3, 40, 40))
    out, w = mha(q, k, v)
    out2, w2 = mha.forward_streamed(q, ((k[a:a + 6], v[a:a + 6]) for a in range(0, 40, 6)))
    torch.testing.assert_close(out2, out)
    torch.testing.assert_close(w2, w)


@pytest.mark.parametrize("n", [1, 7, 8, 50, 121])
def test_ilra_chunked_equals_one_pass(n, tiny_net):
    torch.manual_seed(n)
    model = _sharpened(tiny_net("ilra").double().eval())
    x = torch.randn(n, 12, dtype=torch.float64)
    (z1, a1), (z2, a2) = _one_pass_and_chunked(model, x, 7)
    torch.testing.assert_close(z2, z1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a2, a1, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n", [1, 7, 8, 50, 121])
@pytest.mark.parametrize("grouped", [True, False])
def test_patch_gcn_chunked_equals_one_pass(n, grouped, tiny_net, ring):
    torch.manual_seed(n)
    model = _sharpened(tiny_net("patch_gcn").double().eval())
    edges = ring(n, 3)  # grouped by destination, uniform degree (the dense path)
    if not grouped and n > 2:  # shuffled, and a node without in-edges (the scatter path)
        edges = edges[:, edges[1] != n // 2]
        edges = edges[:, torch.randperm(edges.shape[1])]
    x = torch.randn(n, 12, dtype=torch.float64)
    (z1, a1), (z2, a2) = _one_pass_and_chunked(model, x, 7, edge_index=edges)
    torch.testing.assert_close(z2, z1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a2, a1, rtol=1e-10, atol=1e-12)


def test_r2t_goes_region_by_region_above_the_chunk_size(tiny_net, monkeypatch):
    torch.manual_seed(0)
    model = tiny_net("r2t_mil").double().eval()  # region_num 2: 4 regions
    x = torch.randn(50, 12, dtype=torch.float64)
    batches = []
    real = RegionAttention.forward
    monkeypatch.setattr(RegionAttention, "forward",
                        lambda self, r: batches.append(r.shape[0]) or real(self, r))
    (z1, a1), (z2, a2) = _one_pass_and_chunked(model, x, 7)
    # one pass: R-MSA on the 4 regions at once, then CR-MSA on 3 representative sequences;
    # region by region: R-MSA on one region at a time
    assert batches == [4, 3, 1, 1, 1, 1, 3]
    torch.testing.assert_close(z2, z1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a2, a1, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["ilra", "patch_gcn", "r2t_mil"])
def test_pieces_only_in_eval_without_autograd(name, tiny_net, bag_inputs):
    """Training (and any forward with autograd) is the one-pass computation: the same numbers
    as with chunk_size 0, and gradients flow."""
    torch.manual_seed(0)
    model = _sharpened(tiny_net(name, chunk_size=5).double())
    x = torch.randn(40, 12, dtype=torch.float64)
    extra = bag_inputs(model, 40)
    model.eval()
    out = model(x, **extra)  # eval with autograd: one pass
    out.sum().backward()
    model.chunk_size = 0
    torch.testing.assert_close(model(x, **extra), out, rtol=0, atol=0)


def test_chunk_decision(tiny_net):
    model = tiny_net("ilra", chunk_size=5)
    assert model._eval_chunk(40) == 0  # training mode
    with torch.no_grad():
        assert model._eval_chunk(40) == 0  # training mode without autograd
        model.eval()
        assert model._eval_chunk(40) == 5 and model._eval_chunk(5) == 0  # not above: one pass
        model.chunk_size = 0
        assert model._eval_chunk(40) == 0  # 0: never
    model.chunk_size = 5
    assert model._eval_chunk(40) == 0  # eval with autograd
