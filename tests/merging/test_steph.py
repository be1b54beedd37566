"""STEPH against its definition (method.md section 5), computed independently on dicts."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from steph.config import StephConfig
from steph.merging.pool import ModelPool
from steph.merging.steph import STEPH
from steph.models import ABMIL

HP = {"in_dim": 12, "n_bins": 4, "hidden_dim": 8, "attn_dim": 6}


def make_pool(m=4, scale=0.1, seed=0, hp=HP):
    torch.manual_seed(seed)
    theta0 = ABMIL(**hp).state_dict()

    def trained(s):
        g = torch.Generator().manual_seed(s)
        return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in theta0.items()}

    return ModelPool(theta0=theta0, target=trained(100),
                     sources={f"S{i}": trained(i) for i in range(m)}, target_name="T")


def make_steph(m=4, active=False, **cfg):
    """``active``: positive output biases, so every w and r is past its ReLU (all paths live)."""
    pool = make_pool(m)
    model = STEPH(pool.stack(), HP, StephConfig(embed_dim=10, **cfg))
    if active:
        with torch.no_grad():
            for net in ("h_agg", "h_mix"):
                if hasattr(model, net):
                    getattr(model, net)[-1].bias.fill_(1.0)
    return model, pool


def expected_merged(pool, w, lam, selected):
    """theta_0 + sum_{i in S} w_i (lam_i tau_t + (1 - lam_i) tau_i), tensor by tensor."""
    tau_t, taus = pool.task_vectors()
    out = {}
    for name in tau_t:
        acc = pool.theta0[name].clone()
        for i in selected:
            acc = acc + w[i] * (lam[i] * tau_t[name] + (1 - lam[i]) * taus[i][name])
        out[name] = acc
    return out


def test_merged_parameters_equal_the_formula():
    model, pool = make_steph(m=6, top_k=3)
    x = torch.randn(20, HP["in_dim"])
    ex = model.explain(x)
    w, lam = ex.w, ex.lam
    top = torch.topk(w, 3).indices.tolist()
    assert sorted(ex.selected) == sorted(f"S{i}" for i in top)
    exp = expected_merged(pool, w, lam, top)
    assert set(ex.merged) == set(exp) and len(exp) == 8
    for name in exp:
        torch.testing.assert_close(ex.merged[name], exp[name], rtol=1e-5, atol=1e-6)


def test_forward_uses_the_merged_encoder_and_its_own_head():
    model, pool = make_steph()
    model.eval()
    x = torch.randn(15, HP["in_dim"])
    ex = model.explain(x)
    ref = ABMIL(**HP).eval()
    sd = {**pool.theta0, **ex.merged, "head.weight": model.network.head.weight,
          "head.bias": model.network.head.bias}
    ref.load_state_dict(sd)
    torch.testing.assert_close(model(x).logits, ref(x))


def test_head_is_fresh_not_copied():
    model, pool = make_steph()
    for src in [pool.theta0, pool.target, *pool.sources.values()]:
        assert not torch.equal(model.network.head.weight, src["head.weight"])


def test_lambda_is_one_when_r_is_zero():
    model, _ = make_steph()
    with torch.no_grad():  # H_mix's last layer outputs <= 0 -> ReLU gives r = 0
        model.h_mix[-1].weight.zero_()
        model.h_mix[-1].bias.fill_(-1.0)
    _, lam = model.weights(torch.randn(9, HP["in_dim"]))
    assert torch.equal(lam, torch.ones_like(lam))


def test_only_selected_sources_contribute():
    model, _ = make_steph(m=5, top_k=2, active=True)
    model.eval()
    x = torch.randn(10, HP["in_dim"])
    ex = model.explain(x)
    sel = [model.source_names.index(s) for s in ex.selected]
    other = next(i for i in range(5) if i not in sel)
    base = model(x).logits
    with torch.no_grad():
        model.tau[1 + other].add_(torch.randn_like(model.tau[1 + other]))  # a non-selected source
    torch.testing.assert_close(model(x).logits, base)
    with torch.no_grad():
        model.tau[1 + sel[0]].add_(torch.randn_like(model.tau[1 + sel[0]]))  # a selected one
    assert not torch.allclose(model(x).logits, base)
    assert ex.coefficients[f"S{other}"] == 0.0


def test_gradients_reach_exactly_the_trainable_parts():
    model, _ = make_steph(active=True)
    model.train()
    out = model(torch.randn(11, HP["in_dim"]))
    (out.logits.sum() + out.aux_loss).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected_prefixes = ("embed.", "h_agg.", "h_mix.", "network.head.")
    assert trainable and all(n.startswith(expected_prefixes) for n in trainable)
    for n, p in model.named_parameters():
        if n.startswith(expected_prefixes):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n
    assert not model.tau.requires_grad and not model.theta0_flat.requires_grad


def test_frozen_parts_do_not_change_during_training(tmp_path):
    from steph.config import TrainConfig
    from steph.training.trainer import fit

    model, _ = make_steph()
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(("embed", "h_", "network.head"))}
    g = torch.Generator().manual_seed(0)
    bags = [{"features": torch.randn(8, HP["in_dim"], generator=g), "bin": torch.tensor(i % 4),
             "time": float(i + 1), "event": i % 2, "patient_id": str(i)} for i in range(8)]
    fit(model, bags, TrainConfig(epochs=2, bags_per_step=4, lr=1e-2, eval_every=0), tmp_path, progress=False)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k


def test_loss_terms_match_definitions():
    model, _ = make_steph(m=5, top_k=3, gamma=0.3, beta=0.7)
    model.eval()
    x = torch.randn(7, HP["in_dim"])
    w, lam = model.weights(x)
    top = torch.topk(w, 3).indices
    l_agg = torch.log(torch.exp(w).sum()) ** 2 + w[top].sum() / 3
    l_mix = (lam[top] ** 2).mean()
    out = model(x)
    torch.testing.assert_close(out.aux_loss, 0.3 * l_agg + 0.7 * l_mix)


def test_gamma_by_cohort_size():
    pool = make_pool()
    cfg = StephConfig(embed_dim=4)
    assert STEPH(pool.stack(), HP, cfg, n_patients=501).gamma() == 0.005
    assert STEPH(pool.stack(), HP, cfg, n_patients=500).gamma() == 0.05
    assert STEPH(pool.stack(), HP, StephConfig(embed_dim=4, gamma=0.01), n_patients=900).gamma() == 0.01


def test_ablations_change_what_they_claim():
    x = torch.randn(6, HP["in_dim"])
    m, _ = make_steph(mixing="none")
    assert not hasattr(m, "h_mix")
    assert torch.equal(m.weights(x)[1], torch.ones(4))
    m, _ = make_steph(mixing="free")
    assert not hasattr(m, "h_mix") and m.rho_free.requires_grad
    lam = m.weights(x)[1]
    assert torch.allclose(lam, lam[0].expand(4)) and 0.99 < lam[0] < 1.0  # input-independent
    m, _ = make_steph(aggregation="free")
    assert not hasattr(m, "h_agg")
    assert torch.allclose(m.weights(x)[0], torch.full((4,), 0.25))
    m, _ = make_steph(top_k=10_000)
    assert m.top_k == 4 and m.select(torch.rand(4)).sum() == 4
    m, _ = make_steph(top_k=1)
    assert m.select(torch.tensor([0.1, 0.5, 0.2, 0.0])).tolist() == [0, 1, 0, 0]


def test_efficiency_figures_at_paper_scale():
    hp = {"in_dim": 1536, "n_bins": 32}
    pool = make_pool(m=12, scale=0.01, hp=hp)
    model = STEPH(pool.stack(), hp)
    assert model.trainable_parameter_count() == 1_340_984  # Table S4: 1.34 M
    model.eval()
    n = 10_000
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.randn(n, 1536))
    abmil = 2 * n * (1536 * 512 + 2 * 512 * 384 + 384) + 2 * n * 512 + 2 * 512 * 32
    embed = 2 * n * 1536 * 512
    hyper = 2 * (2 * (512 * 512 + 512 * 12))
    # the merge itself is one addmv, which torch's flop counter does not count (2 * 13 * 1.18 M
    # = 0.03 GFLOPs more if it did)
    assert fc.get_total_flops() == abmil + embed + hyper
    assert round(fc.get_total_flops() / 1e9, 1) == 39.3


def test_artefact_round_trip(tmp_path):
    from steph.inference import load_artefact, save_artefact
    from steph.survival.bins import TimeBins

    model, _ = make_steph()
    model.eval()
    x = torch.randn(13, HP["in_dim"])
    save_artefact(tmp_path / "m.safetensors", model, "steph", model.settings(), TimeBins.uniform(4, 100.0), 12)
    loaded, manifest = load_artefact(tmp_path / "m.safetensors")
    assert manifest["settings"]["sources"] == ["S0", "S1", "S2", "S3"]
    torch.testing.assert_close(loaded(x).logits, model(x).logits)


def test_needs_a_source():
    pool = make_pool(m=1)
    stack = pool.stack()
    stack.vectors = stack.vectors[:1]
    stack.labels = stack.labels[:1]
    with pytest.raises(ValueError, match="at least one source"):
        STEPH(stack, HP)


def test_complete_start_sets_w_near_one_over_k():
    pool = make_pool(m=6)
    torch.manual_seed(7)
    model = STEPH(pool.stack(), HP, StephConfig(embed_dim=10, top_k=5, w_init="complete"))
    with torch.no_grad():  # remove the random part of H_agg's output: what is left is the bias
        model.h_agg[-1].weight.zero_()
    w, _ = model.weights(torch.randn(5, HP["in_dim"]))
    torch.manual_seed(7)
    default = STEPH(pool.stack(), HP, StephConfig(embed_dim=10, top_k=5, w_init="default"))
    assert torch.allclose(w, (model.h_agg[-1].bias.detach()).clamp(min=0))
    diff = model.h_agg[-1].bias.detach() - default.h_agg[-1].bias.detach()
    assert torch.allclose(diff, torch.full((6,), 0.2))  # 1/K on top of the same random init


def test_head_bias_is_set_and_weights_stay_fresh():
    pool = make_pool()
    bias = torch.linspace(-3, -1, HP["n_bins"])
    a = STEPH(pool.stack(), HP, StephConfig(embed_dim=10), head_bias=bias)
    b = STEPH(pool.stack(), HP, StephConfig(embed_dim=10))
    assert torch.equal(a.network.head.bias.detach(), bias)
    assert torch.equal(a.network.head.weight, b.network.head.weight)
    assert not torch.equal(b.network.head.bias.detach(), bias)


def test_softplus_keeps_gradient_for_negative_outputs():
    model, _ = make_steph(w_activation="softplus")
    with torch.no_grad():
        model.h_agg[-1].bias.fill_(-20.0)
    w, _ = model.weights(torch.randn(4, HP["in_dim"]))
    assert (w > 0).all() and (w < 1e-6).all()
    w.sum().backward()
    assert model.h_agg[-1].bias.grad.abs().sum() > 0


def test_head_warmup_holds_w_and_lambda():
    model, _ = make_steph(head_warmup_epochs=1, active=True)
    model.train()
    model.on_epoch_start(0)
    out = model(torch.randn(6, HP["in_dim"]))
    (out.logits.sum() + out.aux_loss).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.h_agg.parameters())
    assert model.network.head.weight.grad.abs().sum() > 0
    model.zero_grad()
    model.on_epoch_start(1)
    out = model(torch.randn(6, HP["in_dim"]))
    (out.logits.sum() + out.aux_loss).backward()
    assert model.h_agg[-1].weight.grad.abs().sum() > 0


def test_bag_embedding_in_chunks_equals_one_pass():
    """Prediction on a huge bag sums ReLU(W_e x) chunk by chunk: the same mean (up to float
    rounding), hence the same merge weights, and never the whole (N, d) activation."""
    model, _ = make_steph(m=4, active=True)
    model.chunk_size = model.network.chunk_size = 16
    x = torch.randn(75, HP["in_dim"])  # 4 full chunks and a partial one
    model.eval()
    one_pass = model.bag_embedding(x, chunk_size=0)
    with torch.no_grad():
        chunked = model.bag_embedding(x)  # eval + no grad: chunks of model.chunk_size
        assert torch.allclose(chunked, one_pass, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.bag_embedding(x, chunk_size=7), one_pass)
        seen = []
        hook = model.embed.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
        logits_chunked = model(x).logits
        hook.remove()
        assert max(seen) == 16 and sum(seen) == 75
        model.chunk_size = model.network.chunk_size = 0
        torch.testing.assert_close(logits_chunked, model(x).logits)
    model.train()  # training is never chunked
    seen.clear()
    hook = model.embed.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    model.chunk_size = model.network.chunk_size = 16
    model(x)
    hook.remove()
    assert seen == [75]


def test_merge_stays_float32_under_autocast():
    """bf16 autocast computes the networks in bf16 but w, lambda, the coefficients and the
    merged encoder in float32 (a bf16 merge would round theta_0 + small task vectors)."""
    model, pool = make_steph(m=4, top_k=2, active=True)
    model.eval()
    x = torch.randn(30, HP["in_dim"])
    with torch.no_grad():
        ref = model.explain(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ex = model.explain(x)
            out = model(x)
    assert ex.w.dtype == ex.lam.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in ex.merged.values())
    assert out.logits.dtype == torch.bfloat16 and out.aux_loss.dtype == torch.float32
    assert ex.selected == ref.selected
    torch.testing.assert_close(ex.w, ref.w, rtol=0.05, atol=0.02)
    exp = expected_merged(pool, ex.w, ex.lam, [int(s[1:]) for s in ex.selected])
    for name in exp:  # the merge of the (bf16-derived) weights is exact float32
        torch.testing.assert_close(ex.merged[name], exp[name], rtol=1e-5, atol=1e-6)


def test_crossfit_row_replaces_tau_t_and_export_drops_it():
    """With inner target task vectors, a bag's ``tau_row`` >= 0 merges that row in place of
    tau_t (training patients, cross-fitted); < 0 (test patients) merges tau_t; the exported
    module is a plain STEPH giving the tau_t merge, its settings those of a plain STEPH."""
    pool = make_pool(m=4)
    stack = pool.stack()
    inner = torch.randn(2, stack.vectors.shape[1]) * 0.1
    cfg = StephConfig(embed_dim=10, w_init="complete")
    model = STEPH(stack, HP, cfg, inner_tau=inner).eval()
    assert model.bag_inputs[-1] == "tau_row"
    x = torch.randn(15, HP["in_dim"])
    w, lam = model.weights(x)
    coef = model.coefficients(w, lam, model.select(w))
    full = model.merged_flat(coef)
    torch.testing.assert_close(model.merged_flat(coef, 1) - full,
                               coef[0] * (inner[1] - stack.vectors[0]))
    out_test = model(x, tau_row=torch.tensor(-1)).logits
    out_row = model(x, tau_row=torch.tensor(0)).logits
    z_row = model.head_input(x, tau_row=torch.tensor(0))
    plain = STEPH(stack, HP, cfg).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "tau_inner"})
    torch.testing.assert_close(out_test, plain(x).logits)
    assert not torch.allclose(out_row, out_test)
    assert not torch.allclose(z_row, plain.head_input(x))
    with pytest.raises(ValueError, match="tau_row 2"):
        model(x, tau_row=torch.tensor(2))
    assert model.without_crossfit() is model
    assert "tau_inner" not in model.state_dict() and "tau_row" not in model.bag_inputs
    torch.testing.assert_close(model(x).logits, out_test)
    assert model.settings() == plain.settings()
    assert "crossfit" not in model.settings()["steph"]  # a plain STEPH's settings, as before


def test_crossfit_test_mean_exports_the_mean_inner_tau():
    """``crossfit_test: mean``: the exported module's tau_t is the inner rows' mean."""
    pool = make_pool(m=3)
    stack = pool.stack()
    inner = torch.randn(3, stack.vectors.shape[1]) * 0.1
    model = STEPH(stack, HP, StephConfig(embed_dim=10, crossfit=3, crossfit_test="mean"),
                  inner_tau=inner).without_crossfit()
    torch.testing.assert_close(model.tau[0], inner.mean(dim=0))
    torch.testing.assert_close(model.tau[1:], stack.vectors[1:])
    assert model.settings()["steph"]["crossfit_test"] == "mean"
    with pytest.raises(ValueError, match="inner_tau must be"):
        STEPH(stack, HP, StephConfig(embed_dim=10), inner_tau=inner[:, :5])
    with pytest.raises(ValueError, match="at least 2 inner folds"):
        StephConfig(crossfit=1)


def test_screening_uses_the_crossfitted_encoders_and_the_target_ridge(monkeypatch):
    """Screening with cross-fitting embeds each training patient with theta_0 + the inner
    tau_t^(j) of its fold (+ tau_i), never the fold model's tau_t; ``ridge="target"``: the
    source probes fit with the one ridge the target's probe chose."""
    import steph.training.head_start as H
    from steph.methods.steph import CrossFit, screen_sources

    pool = make_pool(m=2)
    names = pool.encoder_names
    probe_name = names[0]
    tau_t, taus = pool.task_vectors(names)
    inner = [{n: torch.randn_like(t) for n, t in tau_t.items()} for _ in range(2)]
    gen = torch.Generator().manual_seed(0)
    items = [{"patient_id": f"p{i}", "features": torch.randn(5, HP["in_dim"], generator=gen),
              "bin": i % HP["n_bins"], "event": i % 2, "time": float(10 + i)} for i in range(8)]

    class Bags(list):
        @property
        def patient_ids(self) -> list[str]:
            return [it["patient_id"] for it in self]

    xfit = CrossFit(inner, {f"p{i}": i % 2 for i in range(8)}, [0.5, 0.5])
    seen, grids = [], []
    real_inputs, real_fit = H.head_inputs, H.fit_ph_head

    def inputs_spy(model, data, **k):
        data = list(data)
        seen.append(({it["patient_id"] for it in data},
                     model.state_dict()[probe_name] - pool.theta0[probe_name]))
        return real_inputs(model, data, **k)

    def fit_spy(*a, **k):
        grids.append(k.get("grid"))
        return real_fit(*a, **k)

    monkeypatch.setattr(H, "head_inputs", inputs_spy)
    monkeypatch.setattr(H, "fit_ph_head", fit_spy)
    out = screen_sources(pool, HP, "abmil", Bags(items), {}, 0.0, 0, inner=xfit, ridge="target")
    assert out["screen_crossfit"] and set(out["screen_gain"]) == {"S0", "S1"}
    # probes: target, S0, S1; each over the two inner folds
    assert len(seen) == 6
    for k, (pids, delta) in enumerate(seen):
        j = k % 2
        assert pids == {f"p{i}" for i in range(8) if i % 2 == j}
        extra = 0.0 if k < 2 else taus[k // 2 - 1][probe_name]
        torch.testing.assert_close(delta, inner[j][probe_name] + extra)
    assert grids[0] is None and all(g is not None and len(g) == 1 for g in grids[1:])
    seen.clear()
    screen_sources(pool, HP, "abmil", Bags(items), {}, 0.0, 0)  # no cross-fitting: tau_t
    assert len(seen) == 3
    torch.testing.assert_close(seen[0][1], tau_t[probe_name])
