import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from steph.errors import ConfigError
from steph.models import ABMIL, create_model, encoder_parameter_names, list_models


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
    enc = encoder_parameter_names(model)
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


def test_count_flops_splits_layers_from_functional_products():
    from steph.models.flops import count_flops

    n, d, h, a = 10_000, 1536, 512, 384
    with torch.device("meta"):  # counted without computing
        model = ABMIL(d, 32)
    flops = count_flops(model, torch.empty(n, d, device="meta"))
    layers = 2 * n * (d * h + 2 * h * a + a) + 2 * h * 32
    assert flops.layers == layers and flops.total == layers + 2 * n * h  # + attention pooling
    assert model.training  # the mode is restored
