"""ROUPKT and the expert read-outs (method.md section 6) against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steph.methods import CostSpec, get_method
from steph.models import ABMIL
from steph.models.module import ModelOutput
from steph.transfer import ROUPKT, ExpertBank, ExpertReadout

HP = {"in_dim": 12, "n_bins": 5, "hidden_dim": 8, "attn_dim": 6}


def small_bank(n: int, seed: int = 0) -> ExpertBank:
    torch.manual_seed(seed)
    states = [ABMIL(**HP).state_dict() for _ in range(n)]
    return ExpertBank([f"E{i}" for i in range(n)], HP, states=states)


def small_roupkt(n: int = 7, top_k: int = 5, **kw) -> ROUPKT:
    return ROUPKT(small_bank(n), HP["n_bins"], top_k=top_k,
                  router={"hidden_dim": 8, "attn_dim": 6, "dropout": 0.25}, seed=3, **kw)


def test_trainable_parameter_count_at_1536_with_13_experts():
    """method.md: 4,618,913 trainable parameters with E = 13 at 1536-d, counted by hand."""
    router = (1536 * 512 + 512) + 2 * (512 * 384 + 384) + (384 + 1) + 512 * 13  # bias-free gate
    experts = 13 * (512 * 512 + 512)
    head = 512 * 32 + 32
    assert router + experts + head == 4_618_913
    module, inputs = get_method("roupkt").cost_model(CostSpec(in_dim=1536, n_bins=32, n_sources=12))
    assert inputs == {} and not module.training
    assert module.trainable_parameter_count() == 4_618_913
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == 4_618_913
    # the 13 bundled ABMILs (1,197,729 each, method.md section 3) are frozen, not counted
    frozen = sum(p.numel() for p in module.bank.parameters())
    assert frozen == 13 * 1_197_729 and not any(p.requires_grad for p in module.bank.parameters())
    assert module.encoders_per_bag() == 14  # 13 expert models + the router


def test_cost_models_of_the_simpler_rows():
    spec = CostSpec(in_dim=1536, n_bins=32, n_sources=12)
    zero, _ = get_method("zero_shot").cost_model(spec)
    probe, _ = get_method("linear_probe").cost_model(spec)
    fusion, _ = get_method("fusion_mean").cost_model(spec)
    assert sum(p.numel() for p in zero.parameters() if p.requires_grad) == 0
    assert probe.trainable_parameter_count() == fusion.trainable_parameter_count() == 512 * 32 + 32
    assert (probe.encoders_per_bag(), fusion.encoders_per_bag()) == (1, 13)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _router_logits_by_hand(module: ROUPKT, x: np.ndarray) -> np.ndarray:
    """The router ABMIL written out in numpy: Linear+ReLU, gated attention, softmax pooling,
    bias-free gate."""
    r = module.router

    def w(lin):
        return _np(lin.weight), None if lin.bias is None else _np(lin.bias)

    (w1, b1), (wa, ba) = w(r.feat_proj[0]), w(r.attention.a[0])
    (wb, bb), (ws, bs), (wg, _) = w(r.attention.b[0]), w(r.attention.score), w(r.head)
    h = np.maximum(x @ w1.T + b1, 0)
    s = ((np.tanh(h @ wa.T + ba) * (1 / (1 + np.exp(-(h @ wb.T + bb))))) @ ws.T + bs)[:, 0]
    a = np.exp(s - s.max())
    a /= a.sum()
    return (a @ h) @ wg.T


def test_top5_without_renormalisation_matches_a_hand_computation():
    module = small_roupkt(7).eval()
    torch.manual_seed(1)
    x, z = torch.randn(30, HP["in_dim"]), torch.randn(7, 8)
    out = module(x, experts=z)
    assert isinstance(out, ModelOutput)

    logits = _router_logits_by_hand(module, _np(x))
    p = np.exp(logits - logits.max())
    p /= p.sum()
    top = np.argsort(-p)[:5]
    h = np.zeros(8)
    for i in top:  # p_i ReLU(W_i z_i + b_i), p NOT renormalised over the top 5
        lin = module.experts[int(i)][0]
        h += p[i] * np.maximum(_np(lin.weight) @ _np(z[i]) + _np(lin.bias), 0)
    expected = h @ _np(module.head.weight).T + _np(module.head.bias)
    np.testing.assert_allclose(_np(out.logits)[0], expected, rtol=1e-5, atol=1e-6)
    assert p[top].sum() < 0.999  # the kept probabilities do not sum to one

    lse = logits.max() + np.log(np.exp(logits - logits.max()).sum())
    np.testing.assert_allclose(float(out.aux_loss.detach()), 0.01 * lse ** 2 + 0.01 * p.max(), rtol=1e-5)
    np.testing.assert_allclose(_np(out.stats["p"]), p, rtol=1e-5, atol=1e-7)
    assert sorted(np.flatnonzero(_np(out.stats["selected"]))) == sorted(top)
    # a renormalised mixture would be a different prediction
    renorm = (h / p[top].sum()) @ _np(module.head.weight).T + _np(module.head.bias)
    assert not np.allclose(_np(out.logits)[0], renorm, atol=1e-4)


def test_served_path_equals_cached_inputs_and_only_selected_experts_learn():
    module = small_roupkt(7, top_k=3).eval()
    x = torch.randn(25, HP["in_dim"])
    z = module.bank(x)
    with torch.no_grad():
        served, cached = module(x).logits, module(x, experts=z).logits
    torch.testing.assert_close(served, cached, rtol=0, atol=0)
    assert module.encoders_per_bag() == 8

    module.train()
    out = module(x, experts=z)
    (out.logits.sum() + out.aux_loss).backward()
    chosen = set(np.flatnonzero(_np(out.stats["selected"])).tolist())
    assert len(chosen) == 3
    for i, expert in enumerate(module.experts):
        grad = expert[0].weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == (i in chosen), i
    assert module.router.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.bank.parameters())
    assert module.bank.models[0].training is False  # frozen models never leave eval mode


def test_head_start_interface():
    module = small_roupkt(4)
    x = torch.randn(10, HP["in_dim"])
    z = module.bank(x)
    module.eval()
    with torch.no_grad():
        h = module.head_input(x, experts=z)
        torch.testing.assert_close(module.survival_head(h), module(x, experts=z).logits)


def test_readout_means_its_columns():
    bank = small_bank(4)
    x = torch.randn(9, HP["in_dim"])
    z = bank(x)
    probe = ExpertReadout(bank.subset([2]), HP["n_bins"], columns=[2], seed=1)
    fusion = ExpertReadout(bank, HP["n_bins"], seed=1)
    with torch.no_grad():
        torch.testing.assert_close(probe(x, experts=z), probe.head(z[2:3]))
        torch.testing.assert_close(probe(x), probe(x, experts=z))  # its own bank of one model
        torch.testing.assert_close(fusion(x, experts=z), fusion.head(z.mean(0, keepdim=True)))
    assert (probe.encoders_per_bag(), fusion.encoders_per_bag()) == (1, 4)


def test_bank_equals_direct_forwards_and_refuses_wrong_sizes():
    bank = small_bank(3)
    x = torch.randn(40, HP["in_dim"])
    for i, state in enumerate(m.state_dict() for m in bank.models):
        direct = ABMIL(**HP)
        direct.load_state_dict(state)
        direct.eval()
        with torch.no_grad():
            assert torch.equal(bank(x)[i], direct.embed(x)[0][0])
    module = ROUPKT(bank, HP["n_bins"], router={"hidden_dim": 8, "attn_dim": 6})
    with pytest.raises(ValueError, match="3 experts"):
        module(x, experts=torch.zeros(2, 8))
    assert module.top_k == 3  # K larger than E keeps every expert
