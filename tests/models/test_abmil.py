import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from steph.errors import ConfigError
from steph.models import ABMIL, create_model, list_models


def expected_params(d, h=512, a=384, nb=32):
    # feat_proj + two gated branches + score + head, written out independently
    return (d * h + h) + 2 * (h * a + a) + (a + 1) + (h * nb + nb)


def test_parameter_count_matches_method_md():
    assert sum(p.numel() for p in ABMIL(1536, 32).parameters()) == 1_197_729
    for d, nb in [(384, 4), (1024, 20)]:
        assert sum(p.numel() for p in ABMIL(d, nb).parameters()) == expected_params(d, nb=nb)


def test_flops_on_10k_bag():
    model = ABMIL(1536, 32).eval()
    n, d, h, a = 10_000, 1536, 512, 384
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.randn(n, d))
    # multiply-add = 2 FLOPs: projections, the two gates, the score, pooling, head
    hand = 2 * n * (d * h + 2 * h * a + a) + 2 * n * h + 2 * h * 32
    assert fc.get_total_flops() == hand
    assert round(fc.get_total_flops() / 1e9, 1) == 23.6


def test_encoder_and_head_are_addressable():
    model = ABMIL(64, 8)
    enc = model.encoder_names()
    assert len(enc) == 8
    assert all(n.startswith(("feat_proj.", "attention.")) for n in enc)
    names = [n for n, _ in model.named_parameters()]
    assert set(names) - set(enc) == {"head.weight", "head.bias"}


def plain_abmil(x, sd):
    """An independent functional ABMIL on the same weights (eval mode)."""
    h = F.relu(x @ sd["feat_proj.0.weight"].T + sd["feat_proj.0.bias"])
    a = torch.tanh(h @ sd["attention.a.0.weight"].T + sd["attention.a.0.bias"])
    b = torch.sigmoid(h @ sd["attention.b.0.weight"].T + sd["attention.b.0.bias"])
    s = (a * b) @ sd["attention.score.weight"].T + sd["attention.score.bias"]
    w = torch.softmax(s[:, 0], dim=0)
    return (w @ h) @ sd["head.weight"].T + sd["head.bias"]


def test_forward_matches_plain_implementation_and_is_permutation_invariant():
    torch.manual_seed(0)
    model = ABMIL(32, 6, hidden_dim=16, attn_dim=8).eval()
    x = torch.randn(50, 32)
    out = model(x)
    assert out.shape == (1, 6)
    torch.testing.assert_close(out[0], plain_abmil(x, model.state_dict()))
    torch.testing.assert_close(model(x[torch.randperm(50)]), out)
    torch.testing.assert_close(model(x[None]), out)
    _, attn = model.embed(x)
    assert torch.isclose(attn.sum(), torch.tensor(1.0))


def test_bad_shapes_are_clear_errors():
    model = ABMIL(8, 4)
    with pytest.raises(ValueError, match="one bag at a time"):
        model(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        model(torch.randn(8))


def test_registry():
    assert "abmil" in list_models()
    assert isinstance(create_model("abmil", in_dim=8, n_bins=4), ABMIL)
    with pytest.raises(ConfigError, match="unknown model"):
        create_model("nope")


# -- chunked (online-softmax) pooling ---------------------------------------------------------


def _sharp_model(seed=0, **kw):
    """Small ABMIL with large score weights, so attention logits span a wide range (a running
    maximum that moves between chunks is exercised, and exp() would overflow without it)."""
    torch.manual_seed(seed)
    model = ABMIL(12, 5, hidden_dim=16, attn_dim=8, **kw).eval()
    with torch.no_grad():
        model.attention.score.weight.mul_(400.0)
    return model


@pytest.mark.parametrize("n", [1, 6, 7, 8, 14, 15, 50, 103])
def test_chunked_pooling_equals_one_pass(n):
    model = _sharp_model(n)
    x = torch.randn(n, 12, dtype=torch.float64)
    model.double()
    with torch.no_grad():
        z1, a1 = model.embed(x, chunk_size=0)
        z2, a2 = model.embed(x, chunk_size=7)
        s = model.attention(model.feat_proj(x))
    assert s.max() - s.min() > 20 or n < 6  # a wide score range
    torch.testing.assert_close(z2, z1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a2, a1, rtol=1e-12, atol=1e-12)
    assert z2.shape == (1, 16) and a2.shape == (n,)
    # and against an independent computation on the same weights
    torch.testing.assert_close(model.head(z2)[0],
                               plain_abmil(x, model.state_dict()), rtol=1e-10, atol=1e-10)


def test_chunked_pooling_float32_tolerance_and_reversed_order():
    model = _sharp_model(3)
    x = torch.randn(200, 12)
    with torch.no_grad():
        z1, a1 = model.embed(x, chunk_size=0)
        for c in (1, 7, 64, 199):
            z2, a2 = model.embed(x, chunk_size=c)
            torch.testing.assert_close(z2, z1, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a2, a1, rtol=1e-5, atol=1e-7)
        # the running maximum is overtaken in later chunks when the order is reversed
        z3, _ = model.embed(x.flip(0), chunk_size=7)
    torch.testing.assert_close(z3, z1, rtol=1e-5, atol=1e-6)


def test_chunking_is_automatic_only_in_eval_without_autograd(monkeypatch):
    model = _sharp_model(1, chunk_size=7)
    x = torch.randn(30, 12)
    calls = []
    real = ABMIL._embed_chunked

    def spy(self, x, c):
        calls.append((x.shape[0], c))
        return real(self, x, c)

    monkeypatch.setattr(ABMIL, "_embed_chunked", spy)
    with torch.no_grad():
        out = model(x)
    assert calls == [(30, 7)]
    torch.testing.assert_close(out[0], plain_abmil(x, model.state_dict()))
    with torch.no_grad():
        model(x[:7])  # not above the threshold
    model(x)  # eval with autograd: one pass
    model.train()
    with torch.no_grad():
        model(x)  # training mode: one pass (dropout draws unchanged)
    model.eval()
    model.chunk_size = 0
    with torch.no_grad():
        model(x)  # 0 = never
    assert calls == [(30, 7)]


def test_chunk_size_is_not_a_hyperparameter_or_a_tensor():
    model = ABMIL(12, 5, chunk_size=3)
    assert model.chunk_size == 3 and "chunk_size" not in model.hparams()
    assert [n for n, _ in model.named_parameters()] == [
        n for n, _ in ABMIL(12, 5).named_parameters()]
    assert set(model.state_dict()) == set(ABMIL(12, 5).state_dict())
    with pytest.raises(ValueError, match="chunk_size"):
        ABMIL(12, 5, chunk_size=-1)


def test_forced_chunking_is_differentiable_with_the_same_gradients():
    x = torch.randn(40, 12, dtype=torch.float64)
    grads = []
    for c in (0, 9):
        model = _sharp_model(5).double()
        model.head(model.embed(x, chunk_size=c)[0]).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-10, atol=1e-12)


def test_chunking_reaches_models_that_call_abmil_with_merged_parameters(monkeypatch):
    """STEPH runs ABMIL through torch.func.functional_call with merged tensors: eval-mode
    prediction is chunked there too, with the same result."""
    from steph.config import StephConfig
    from steph.merging.pool import ModelPool
    from steph.merging.steph import STEPH

    torch.manual_seed(0)
    hp = {"in_dim": 12, "n_bins": 4, "hidden_dim": 8, "attn_dim": 6}
    theta0 = ABMIL(**hp).state_dict()
    noisy = {f"S{i}": {k: v + 0.1 * torch.randn_like(v) for k, v in theta0.items()}
             for i in range(4)}
    pool = ModelPool(theta0=theta0, target=noisy.pop("S3"), sources=noisy, target_name="T")
    model = STEPH(pool.stack(), hp, StephConfig(embed_dim=10)).eval()
    x = torch.randn(60, 12)
    with torch.no_grad():
        model.network.chunk_size = 0
        one = model(x).logits
        model.network.chunk_size = 7
        calls = []
        real = ABMIL._embed_chunked
        monkeypatch.setattr(ABMIL, "_embed_chunked",
                            lambda self, x, c: calls.append(c) or real(self, x, c))
        chunked = model(x).logits
    assert calls == [7]
    torch.testing.assert_close(chunked, one, rtol=1e-5, atol=1e-6)
def test_count_flops_splits_layers_from_functional_products():
    from steph.models.flops import count_flops

    n, d, h, a = 10_000, 1536, 512, 384
    with torch.device("meta"):  # counted without computing
        model = ABMIL(d, 32)
    flops = count_flops(model, torch.empty(n, d, device="meta"))
    layers = 2 * n * (d * h + 2 * h * a + a) + 2 * h * 32
    assert flops.layers == layers and flops.total == layers + 2 * n * h  # + attention pooling
    assert model.training  # the mode is restored
