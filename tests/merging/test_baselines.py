"""Tests of steph.merging.baselines: Model Avg, Task Arithmetic, AdaMerging (+ TIES / Iso-C /
Iso-CTS preprocessing, + Representation Surgery).

Expected merged weights are computed here with plain state-dict arithmetic, and the expected
coefficient gradients with a per-bag autograd merge written in this file: never with the code
under test.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.func import functional_call

from steph.config import ExperimentConfig, TrainConfig, build_config
from steph.inference import load_artefact, save_artefact
from steph.merging import baselines as B
from steph.merging.pool import ModelPool
from steph.merging.preprocess import iso_c_pair, iso_cts_pair, ties_pair
from steph.methods import MethodContext, get_method
from steph.models.abmil import ABMIL

ENCODER_PREFIXES = ABMIL.ENCODER_PREFIXES
from steph.survival.bins import TimeBins
from steph.survival.loss import nll_survival_loss
from steph.training.trainer import fit

HP = {"in_dim": 12, "n_bins": 5, "hidden_dim": 8, "attn_dim": 6, "dropout": 0.25}
SOURCES = ("S1", "S2", "S3")


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _perturbed(theta0: dict[str, torch.Tensor], seed: int, scale: float = 0.2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in theta0.items()}


def _pool(identical: bool = False) -> ModelPool:
    torch.manual_seed(123)
    theta0 = _state(ABMIL(**HP))
    target = _perturbed(theta0, 1)
    sources = {name: (dict(target) if identical else _perturbed(theta0, 10 + i))
               for i, name in enumerate(SOURCES)}
    return ModelPool(theta0=theta0, target=target, sources=sources, target_name="T", hparams=HP)


def _encoder(names) -> list[str]:
    return [n for n in names if n.startswith(ENCODER_PREFIXES)]


def _bag(seed: int, n: int = 7) -> torch.Tensor:
    return torch.randn(n, HP["in_dim"], generator=torch.Generator().manual_seed(seed))


def _ctx(pool: ModelPool, cfg: ExperimentConfig | None = None) -> MethodContext:
    cfg = cfg or build_config({})
    return MethodContext(cfg=cfg, target="T", fold=0, hparams=HP, theta0=pool.theta0,
                         bins=TimeBins.uniform(HP["n_bins"], 1000.0), n_patients=20, n_train=16,
                         pool_loader=lambda: pool, train_bins=np.arange(16) % HP["n_bins"],
                         train_events=np.arange(16) % 2)


# ------------------------------------------------------------------------------------------------
# Model Avg and Task Arithmetic
# ------------------------------------------------------------------------------------------------

def test_model_avg_of_identical_models_is_that_model():
    pool = _pool(identical=True)
    merged = B.model_average(pool)
    assert set(merged) == set(pool.theta0)
    for k, v in pool.target.items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=1e-6)


def test_model_avg_equals_the_plain_average_over_all_tensors():
    pool = _pool()
    models = [pool.target, *pool.sources.values()]
    merged = B.model_average(pool)
    for k in pool.theta0:
        mean = sum(m[k] for m in models) / len(models)
        formula = pool.theta0[k] + sum(m[k] - pool.theta0[k] for m in models) / len(models)
        torch.testing.assert_close(merged[k], mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(merged[k], formula, rtol=1e-5, atol=1e-6)
    # heads are merged too (they differ from theta_0's and the target's head)
    assert not torch.allclose(merged["head.weight"], pool.theta0["head.weight"])
    assert not torch.allclose(merged["head.weight"], pool.target["head.weight"])


def test_task_arithmetic_formula():
    pool = _pool()
    merged = B.task_arithmetic(pool, 0.3)
    models = [pool.target, *pool.sources.values()]
    for k in pool.theta0:
        expected = pool.theta0[k] + 0.3 * sum(m[k] - pool.theta0[k] for m in models)
        torch.testing.assert_close(merged[k], expected, rtol=1e-5, atol=1e-6)


def test_static_methods_build_plain_abmil_with_the_formula():
    pool = _pool()
    cfg = build_config({"merge": {"ta_coef": 0.7}})
    models = [pool.target, *pool.sources.values()]
    for name, c in [("model_avg", 1.0 / len(models)), ("task_arithmetic", 0.7)]:
        method = get_method(name)
        assert method.needs_pool and not method.trains and "merge" in method.config_sections
        built = method.build(_ctx(pool, cfg))
        assert built.kind == "abmil" and isinstance(built.module, ABMIL)
        state = built.module.state_dict()
        for k in pool.theta0:
            expected = pool.theta0[k] + c * sum(m[k] - pool.theta0[k] for m in models)
            torch.testing.assert_close(state[k], expected, rtol=1e-5, atol=1e-6)
        assert built.settings() == HP


# ------------------------------------------------------------------------------------------------
# AdaMerging
# ------------------------------------------------------------------------------------------------

def _adamerging(pool: ModelPool, **kw) -> B.AdaMerging:
    return B.AdaMerging(B.adamerging_stack(pool), HP, init_coef=0.3, head_seed=5, **kw)


def test_adamerging_init_merge_is_theta0_plus_03_sum_of_task_vectors():
    pool = _pool()
    model = _adamerging(pool)
    assert model.labels == ["T", *SOURCES]  # the target's own task vector is a coefficient
    torch.testing.assert_close(model.coef.detach(), torch.full((4,), 0.3))
    merged = model.merged_encoder()
    names = _encoder(pool.theta0)
    assert sorted(merged) == sorted(names) and len(names) == 8
    models = [pool.target, *pool.sources.values()]
    for k in names:
        expected = pool.theta0[k] + 0.3 * sum(m[k] - pool.theta0[k] for m in models)
        torch.testing.assert_close(merged[k], expected, rtol=1e-5, atol=1e-6)
    # a fresh head: not copied from theta_0 or any model of the pool
    for m in [pool.theta0, *models]:
        assert not torch.allclose(model.network.head.weight, m["head.weight"])


def _reference_grads(pool: ModelPool, head: dict[str, torch.Tensor], coef0: torch.Tensor,
                     bags, bins, events, seed: int):
    """Per-bag merge through autograd with plain dict arithmetic (independent of the module)."""
    names = _encoder(pool.theta0)
    models = [pool.target, *pool.sources.values()]
    taus = [{k: m[k] - pool.theta0[k] for k in names} for m in models]
    c = coef0.clone().requires_grad_(True)
    hw = head["head.weight"].clone().requires_grad_(True)
    hb = head["head.bias"].clone().requires_grad_(True)
    net = ABMIL(**HP).train()
    torch.manual_seed(seed)  # after building ``net``: the same dropout masks as the module's
    for x, b, e in zip(bags, bins, events):
        merged = {k: pool.theta0[k] + sum(c[j] * tau[k] for j, tau in enumerate(taus))
                  for k in names}
        params = {**merged, "head.weight": hw, "head.bias": hb}
        logits = functional_call(net, params, (x,))
        loss = nll_survival_loss(logits, torch.tensor([b]), torch.tensor([e]), alpha=0.5)
        (loss / len(bags)).backward()
    return c.grad, hw.grad, hb.grad


def test_per_step_merge_gradients_equal_naive_autograd():
    pool = _pool()
    model = _adamerging(pool).train()
    with torch.no_grad():
        model.coef.copy_(torch.tensor([0.4, -0.1, 0.25, 0.6]))  # not all equal
    head = {k: v.detach().clone() for k, v in model.network.state_dict().items()
            if k.startswith("head.")}
    coef0 = model.coef.detach().clone()
    bags = [_bag(i, n=5 + i) for i in range(4)]
    bins, events = [0, 3, 1, 4], [1, 0, 1, 0]

    torch.manual_seed(7)  # the same dropout masks on both paths
    model.begin_step()
    for x, b, e in zip(bags, bins, events):
        loss = nll_survival_loss(model(x).logits, torch.tensor([b]), torch.tensor([e]), alpha=0.5)
        (loss / len(bags)).backward()
    assert model.coef.grad is None  # pushed to the coefficients only at the end of the step
    model.end_step()

    gc, gw, gb = _reference_grads(pool, head, coef0, bags, bins, events, seed=7)
    assert gc.abs().max() > 1e-6  # a real gradient, not two zeros
    torch.testing.assert_close(model.coef.grad, gc, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.network.head.weight.grad, gw, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.network.head.bias.grad, gb, rtol=1e-4, atol=1e-6)

    # the module's own per-bag path (training mode, no open step) agrees as well
    naive = _adamerging(pool).train()
    naive.load_state_dict(model.state_dict())
    torch.manual_seed(7)
    for x, b, e in zip(bags, bins, events):
        loss = nll_survival_loss(naive(x).logits, torch.tensor([b]), torch.tensor([e]), alpha=0.5)
        (loss / len(bags)).backward()
    torch.testing.assert_close(naive.coef.grad, gc, rtol=1e-4, atol=1e-6)


def test_only_coefficients_and_head_are_trained_and_frozen_tensors_never_change():
    pool = _pool()
    model = _adamerging(pool)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"coef", "network.head.weight", "network.head.bias"}
    frozen = {k: v.clone() for k, v in model.state_dict().items()
              if not k.startswith("network.head.") and k != "coef"}
    coef0, head0 = model.coef.detach().clone(), model.network.head.weight.detach().clone()

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        model.begin_step()
        for i in range(3):
            out = model(_bag(10 * step + i))
            loss = nll_survival_loss(out.logits, torch.tensor([i]), torch.tensor([1]), alpha=0.5)
            loss.backward()
        model.end_step()
        got = {n for n, p in model.named_parameters() if p.grad is not None}
        assert got == {"coef", "network.head.weight", "network.head.bias"}
        opt.step()
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), f"{k} changed"
    assert not torch.equal(model.coef.detach(), coef0)
    assert not torch.equal(model.network.head.weight.detach(), head0)


def test_stats_return_the_coefficients():
    model = _adamerging(_pool()).eval()
    out = model(_bag(0))
    assert out.logits.shape == (1, HP["n_bins"])
    torch.testing.assert_close(out.stats["coef"], model.coef.detach())


def test_export_gives_the_same_logits_as_the_module_in_eval_mode():
    pool = _pool()
    model = _adamerging(pool)
    with torch.no_grad():
        model.coef.copy_(torch.tensor([0.9, 0.1, -0.2, 0.5]))
        model.network.head.weight.add_(0.3)
    model.eval()
    exported = model.export()
    assert type(exported) is ABMIL and not exported.training
    names = _encoder(pool.theta0)
    models = [pool.target, *pool.sources.values()]
    c = [0.9, 0.1, -0.2, 0.5]
    for k in names:
        expected = pool.theta0[k] + sum(cj * (m[k] - pool.theta0[k]) for cj, m in zip(c, models))
        torch.testing.assert_close(exported.state_dict()[k], expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        for i in range(3):
            x = _bag(i)
            torch.testing.assert_close(exported(x), model(x).logits, rtol=1e-5, atol=1e-6)


def test_eval_cache_follows_the_coefficients():
    pool = _pool()
    model = _adamerging(pool).eval()
    x = _bag(3)
    with torch.no_grad():
        before = model(x).logits.clone()
        model.coef.data.add_(0.5)  # .data does not bump the version counter: values are checked
        after = model(x).logits.clone()
        fresh = model.export()(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, fresh, rtol=1e-5, atol=1e-6)


def test_adamerging_merge_stays_float32_under_autocast():
    pool = _pool()
    model = _adamerging(pool)
    x = _bag(2)
    outside = model.merged_flat().detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model.merged_flat().detach(), outside)
        model.begin_step()
        assert all(p.dtype == torch.float32 for p in model._step_params.values())
        logits = model(x).logits
        model.eval()
        with torch.no_grad():
            assert all(v.dtype == torch.float32 for v in model._eval_params().values())
    assert logits.dtype == torch.bfloat16


def test_trainer_runs_adamerging_one_merge_per_step(tmp_path):
    pool = _pool()
    model = _adamerging(pool)
    calls = {"merge": 0}
    original = model.merged_flat

    def counting(coef=None):
        calls["merge"] += 1
        return original(coef)

    model.merged_flat = counting
    frozen = {k: v.clone() for k, v in model.state_dict().items()
              if not k.startswith("network.head.") and k != "coef"}
    train = [{"features": _bag(i), "bin": torch.tensor(i % HP["n_bins"]),
              "time": float(100 * i + 5),
              "event": i % 2, "patient_id": f"p{i}"} for i in range(8)]
    cfg = TrainConfig(epochs=2, bags_per_step=4, lr=1e-2, eval_every=0,
                      head_init="reference")  # the head start merges once more (eval mode)
    result = fit(model, train, cfg, tmp_path, progress=False)
    assert calls["merge"] == 2 * 2  # 2 steps per epoch, 2 epochs, one merge each
    assert len(result.history[-1]["mean_coef"]) == 4
    assert not torch.allclose(model.coef.detach(), torch.full((4,), 0.3))
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), f"{k} changed"


# ------------------------------------------------------------------------------------------------
# TIES AM / Iso-C AM / Iso-CTS AM
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, fn, kw", [
    ("ties_am", lambda t, s: ties_pair(t, s, density=0.3), {"ties_density": 0.3}),
    ("isoc_am", iso_c_pair, {}),
    ("isocts_am", lambda t, s: iso_cts_pair(t, s, common_space_fraction=0.5),
     {"iso_cts_fraction": 0.5}),
])
def test_preprocessed_adamerging_uses_the_preprocessed_vectors(method, fn, kw):
    pool = _pool()
    built = get_method(method).build(_ctx(pool, build_config({"merge": kw})))
    model = built.module
    assert isinstance(model, B.AdaMerging) and built.kind == "abmil"
    names = _encoder(pool.theta0)
    tau_t = {k: pool.target[k] - pool.theta0[k] for k in names}
    rows = [model.layout.unflatten(model.tau[j]) for j in range(model.tau.shape[0])]
    for k in names:  # the target's row stays the raw tau_t
        torch.testing.assert_close(rows[0][k], tau_t[k], rtol=1e-6, atol=1e-7)
    for j, src in enumerate(pool.sources.values(), start=1):
        tau_s = {k: src[k] - pool.theta0[k] for k in names}
        expected = fn(tau_t, tau_s)
        for k in names:
            torch.testing.assert_close(rows[j][k], expected[k], rtol=1e-5, atol=1e-6)
        assert any(not torch.allclose(rows[j][k], tau_s[k]) for k in names)  # really changed
    # and the merge at init uses them
    merged = model.merged_encoder()
    for k in names:
        expected = pool.theta0[k] + 0.3 * sum(r[k] for r in rows)
        torch.testing.assert_close(merged[k], expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Surgery AM
# ------------------------------------------------------------------------------------------------

def test_surgery_starts_at_adamerging_and_trains_w_up():
    pool = _pool()
    plain = _adamerging(pool)
    surg = _adamerging(pool, surgery_rank=3)
    assert torch.count_nonzero(surg.surgery.up.weight) == 0
    assert torch.count_nonzero(surg.surgery.down.weight) > 0
    assert surg.surgery.down.bias is None and surg.surgery.up.bias is None
    torch.testing.assert_close(surg.network.head.weight, plain.network.head.weight)
    for mode in ("eval", "train"):
        getattr(plain, mode)()
        getattr(surg, mode)()
        for i in range(3):
            torch.manual_seed(i)
            a = plain(_bag(i)).logits
            torch.manual_seed(i)
            b = surg(_bag(i)).logits
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    surg.train()
    surg.begin_step()
    out = surg(_bag(0))
    nll_survival_loss(out.logits, torch.tensor([2]), torch.tensor([1]), alpha=0.5).backward()
    surg.end_step()
    assert surg.surgery.up.weight.grad is not None
    assert surg.surgery.up.weight.grad.abs().sum() > 0
    assert surg.coef.grad is not None and surg.coef.grad.abs().sum() > 0
    trainable = {n for n, p in surg.named_parameters() if p.requires_grad}
    assert trainable == {"coef", "network.head.weight", "network.head.bias", "surgery.down.weight",
                         "surgery.up.weight"}


def _trained_surgery(pool: ModelPool) -> B.AdaMerging:
    built = get_method("surgery_am").build(_ctx(pool, build_config({"merge": {"surgery_rank": 3}})))
    model = built.module
    with torch.no_grad():  # move away from the initial point so the surgery matters
        model.surgery.up.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
        model.coef.copy_(torch.tensor([0.7, 0.2, 0.1, -0.3]))
    return model.eval()


def test_surgery_export_round_trips_through_load_artefact(tmp_path):
    pool = _pool()
    model = _trained_surgery(pool)
    built_kind = model.export_kind  # "mil_surgery"
    exported = model.export()
    assert isinstance(exported, B.SurgeryMIL)
    bins = TimeBins.uniform(HP["n_bins"], 1000.0)
    path = save_artefact(tmp_path / "model.safetensors", exported, built_kind,
                         model.export_settings(), bins, HP["in_dim"])
    loaded, manifest = load_artefact(path)
    assert manifest["kind"] == built_kind and isinstance(loaded, B.SurgeryMIL)
    with torch.no_grad():
        for i in range(3):
            x = _bag(i)
            ref = model(x).logits
            torch.testing.assert_close(exported(x), ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(loaded(x), ref, rtol=1e-5, atol=1e-6)
            plain_head = loaded.network(x)  # without surgery the output differs: surgery is saved
            assert not torch.allclose(plain_head, ref)


def test_surgery_artefact_loads_in_a_fresh_process(tmp_path):
    """``steph predict`` never imports the baselines itself: load_artefact must find the kind."""
    pool = _pool()
    model = _trained_surgery(pool)
    path = save_artefact(tmp_path / "model.safetensors", model.export(), model.export_kind,
                         model.export_settings(), TimeBins.uniform(HP["n_bins"], 1000.0),
                         HP["in_dim"])
    x = _bag(4)
    torch.save(x, tmp_path / "bag.pt")
    with torch.no_grad():
        expected = model(x).logits
    code = textwrap.dedent(f"""
        import sys, torch
        from steph.inference import load_artefact
        assert "steph.merging.baselines" not in sys.modules
        module, _ = load_artefact({str(path)!r})
        with torch.no_grad():
            out = module(torch.load({str(tmp_path / 'bag.pt')!r}))
        torch.save(out, {str(tmp_path / 'out.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=1e-5, atol=1e-6)
