"""Where heads start (train.head_init): checked against the baseline hazard, an independent
optimiser of the same penalised likelihood, and the reference behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from steph.config import TrainConfig
from steph.models import ABMIL, SurvivalModule
from steph.survival.baseline import baseline_hazard_logits
from steph.survival.metrics import concordance_index
from steph.training.head_start import _fit_v, fit_ph_head, initialize_head
from steph.training.trainer import fit


def _bags(n=40, d=6, seed=0, n_bins=4):
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = torch.randn(3 + i % 5, d, generator=g)
        risk = float(x[:, 0].mean())  # the first feature drives the hazard
        t = float(rng.exponential(np.exp(-2 * risk)) * 1000 + 1)
        out.append({"features": x, "bin": torch.tensor(min(int(t // 300), n_bins - 1)),
                    "time": t, "event": int(rng.random() < 0.7), "patient_id": f"p{i}"})
    return out


def _model(seed=0):
    torch.manual_seed(seed)
    return ABMIL(6, 4, hidden_dim=8, attn_dim=4, dropout=0.0)


def test_reference_keeps_the_head_and_baseline_sets_only_the_bias():
    bags = _bags()
    m = _model()
    before = {k: v.clone() for k, v in m.head.state_dict().items()}
    initialize_head(m, bags, "reference", 0.5)
    assert all(torch.equal(before[k], v) for k, v in m.head.state_dict().items())
    initialize_head(m, bags, "baseline", 0.5)
    bins = [int(b["bin"]) for b in bags]
    events = [b["event"] for b in bags]
    torch.testing.assert_close(m.head.bias, baseline_hazard_logits(bins, events, 4))
    assert torch.equal(m.head.weight, before["weight"])
    initialize_head(m, bags, "null", 0.5)
    assert torch.count_nonzero(m.head.weight) == 0


def _numpy_objective(params, x, bins, events, alpha, ridge):
    """The same penalised loss, written independently in numpy (for scipy's optimiser)."""
    d = x.shape[1]
    v, c = params[:d], params[d:]
    logits = c[None, :] + (x @ v)[:, None]
    h = 1 / (1 + np.exp(-logits))
    s = np.cumprod(1 - h, axis=1)
    idx = np.arange(len(x))
    s_prev = np.where(bins > 0, s[idx, np.maximum(bins - 1, 0)], 1.0)
    eps = 1e-7
    unc = -(np.log(np.clip(s_prev, eps, None)) + np.log(np.clip(h[idx, bins], eps, None)))
    cen = -np.log(np.clip(s[idx, bins], eps, None))
    unc, cen = unc * events, cen * (1 - events)
    loss = (1 - alpha) * (unc + cen) + alpha * unc
    return loss.mean() + 0.5 * ridge * v @ v


def test_penalised_fit_matches_an_independent_optimiser():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3))
    bins = rng.integers(0, 4, 60)
    events = (rng.random(60) < 0.6).astype(int)
    c0 = baseline_hazard_logits(bins, events, 4)
    v, c = _fit_v(torch.tensor(x), torch.tensor(bins), torch.tensor(events), c0, 0.5, 0.1)
    ref = minimize(_numpy_objective, np.concatenate([np.zeros(3), c0.double().numpy()]),
                   args=(x, bins, events, 0.5, 0.1), method="L-BFGS-B", tol=1e-12)
    np.testing.assert_allclose(v.numpy(), ref.x[:3], atol=2e-4)
    np.testing.assert_allclose(c.numpy(), ref.x[3:], atol=2e-4)


def test_fitted_head_is_proportional_hazards_and_reads_the_signal():
    rng = np.random.default_rng(1)
    n = 120
    truth = rng.normal(size=n)
    z = np.column_stack([truth * 3 + 10, rng.normal(size=(n, 5)) * 0.1])  # scale/shift: no effect
    t = rng.exponential(np.exp(-truth)) * 1000 + 1
    bins = np.minimum(t // 300, 3).astype(int)
    events = (rng.random(n) < 0.8).astype(int)
    w, b, info = fit_ph_head(torch.tensor(z), bins, events, t,
                             baseline_hazard_logits(bins, events, 4), 0.5)
    assert w.shape == (4, 6) and torch.allclose(w, w[0].expand_as(w))  # one v for every bin
    risk = (torch.tensor(z, dtype=torch.float32) @ w[0]).numpy()
    assert concordance_index(t, events, risk) >= 0.97 * concordance_index(t, events, truth)
    assert info["head_ridge"] in (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    assert set(info["head_cv_cindex"]) == {"0.001", "0.01", "0.1", "1.0", "10.0"}


def test_fit_runs_once_at_a_fresh_start_not_on_resume(tmp_path, monkeypatch):
    import steph.training.trainer as T

    calls = []
    real = T.initialize_head

    def spy(*a, **k):
        calls.append(a[2])
        return real(*a, **k)

    monkeypatch.setattr(T, "initialize_head", spy)
    bags = _bags()
    cfg = TrainConfig(epochs=1, bags_per_step=8, head_init="fit")
    m = _model()
    fit(m, bags, cfg, tmp_path, progress=False)
    assert calls == ["fit"]
    fit(_model(), bags, cfg.model_copy(update={"epochs": 2}), tmp_path, progress=False)  # resumes
    assert calls == ["fit"]


def test_fitted_start_ranks_training_patients_before_any_step():
    bags = _bags(n=80)
    m = _model()
    initialize_head(m, bags, "fit", 0.5)
    m.eval()
    with torch.no_grad():
        risk = [float(-torch.cumprod(1 - torch.sigmoid(m(b["features"])), 1).sum()) for b in bags]
    c = concordance_index([b["time"] for b in bags], [b["event"] for b in bags], risk)
    assert c > 0.6  # theta_0's random features already carry the first feature's signal


def test_unknown_mode():
    with pytest.raises(ValueError):
        initialize_head(_model(), _bags(), "bogus", 0.5)


class _SmallSpread(SurvivalModule):
    """An embedding whose spread between bags (0.01 x the mean of the first feature) is far
    smaller than what training mode adds (noise of sd ``noise``), as Patch-GCN's."""

    def __init__(self, noise: float):
        super().__init__()
        self.head = torch.nn.Linear(6, 4)
        self.noise = noise

    @property
    def survival_head(self):
        return self.head

    def head_input(self, x):
        z = 1.0 + 0.01 * x.mean(0)
        return z + self.noise * torch.randn(6) if self.training else z


def test_a_head_too_sensitive_to_training_noise_is_refitted_on_training_mode_embeddings():
    bags = _bags(n=60)
    quiet = _SmallSpread(noise=0.0)
    info_quiet = initialize_head(quiet, bags, "fit", 0.0)
    assert info_quiet["head_noise_ratio"] == pytest.approx(1.0) and "head_fit_on" not in info_quiet
    noisy = _SmallSpread(noise=0.5)
    rng_before = torch.random.get_rng_state()
    info = initialize_head(noisy, bags, "fit", 0.0)
    assert info["head_noise_ratio"] > 3 and info["head_fit_on"] == "training-mode embeddings"
    # fitted to the noisy embeddings, the head is far less steep than the eval-mode fit
    assert noisy.survival_head.weight.abs().max() < 0.2 * quiet.survival_head.weight.abs().max()
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # training's draws unchanged
