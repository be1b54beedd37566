"""The loss landscape of task-vector mixup (steph.analysis.landscape) against direct
computations: a loss whose minimiser is a known grid point, the merged models evaluated one by
one through a plain ``load_state_dict``, and a tiny survival model whose optimum is known in
closed form."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from steph.analysis.landscape import (
    Bag,
    Landscape,
    coefficient_grid,
    evaluate_grid,
    merged_loss_fn,
    smooth,
)
from steph.models import create_model
from steph.survival.loss import nll_survival_loss

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import TINY_NETWORKS  # tests/conftest.py


def test_grid_is_the_papers():
    c = coefficient_grid()
    assert len(c) == 26 and c[0] == 0.0 and c[-1] == 1.0
    assert np.allclose(np.diff(c), 0.04)
    with pytest.raises(ValueError):
        coefficient_grid(0.3)


def test_quadratic_minimum_orientation_and_smoothing():
    # f = (C_s - 0.36)^2 + 2 (C_t - 0.72)^2: minimiser (C_s, C_t) = (0.36, 0.72), i.e. column 9,
    # row 18 of the 26 x 26 grid (rows are C_t)
    def f(cs: torch.Tensor, ct: torch.Tensor) -> torch.Tensor:
        return (cs - 0.36) ** 2 + 2 * (ct - 0.72) ** 2

    calls = []
    losses = evaluate_grid(lambda cs, ct: calls.append(len(cs)) or f(cs, ct), coefficient_grid(),
                           batch=100)
    assert losses.shape == (26, 26) and sum(calls) == 676 and max(calls) == 100
    c = coefficient_grid()
    assert losses[18, 9] == pytest.approx(0.0, abs=1e-12)
    assert losses[3, 20] == pytest.approx((c[20] - 0.36) ** 2 + 2 * (c[3] - 0.72) ** 2)
    ls = Landscape("T", "S", 0, 0, c, losses, 10)
    assert ls.minimum(smoothed=False)[:2] == pytest.approx((0.36, 0.72))
    assert ls.minimum(smoothed=True)[:2] == pytest.approx((0.36, 0.72))
    # smoothing a quadratic with a Gaussian of variance sigma^2 = 1 grid step^2 adds the
    # constant (0.04^2) * (1 + 2) * sigma^2 away from the borders (4 sigma): the smoothing is
    # sigma = 1 *grid step*
    diff = smooth(losses) - losses
    inner = diff[4:-4, 4:-4]
    assert inner == pytest.approx(np.full_like(inner, 0.0016 * 3), abs=2e-6)
    # the lowest point of the mixup segment C_t = lambda, C_s = 1 - lambda: minimise
    # (0.64 - lambda)^2 + 2 (lambda - 0.72)^2 -> lambda = (0.64 + 1.44) / 3 = 0.6933 -> 0.68
    assert ls.mixup_minimum(smoothed=False)[0] == pytest.approx(0.68)


def _bags(n, dim, seed=0, n_bins=8):
    g = torch.Generator().manual_seed(seed)
    return [Bag(torch.randn(int(torch.randint(3, 12, (1,), generator=g)), dim, generator=g), {},
                int(torch.randint(0, n_bins, (1,), generator=g)), i % 2) for i in range(n)]


def _direct(network, theta0, tau_s, tau_t, bags, alpha, cs, ct):
    """The merged model built by load_state_dict and run bag by bag."""
    state = {k: theta0[k] + cs * tau_s[k] + ct * tau_t[k] for k in theta0}
    network.load_state_dict(state)
    network.eval()
    with torch.no_grad():
        losses = [nll_survival_loss(network(b.x), torch.tensor([b.bin]), torch.tensor([b.event]),
                                    alpha=alpha) for b in bags]
    return float(torch.stack(losses).mean())


def test_merged_loss_matches_models_built_one_by_one(one_thread):
    torch.manual_seed(0)
    net = create_model("abmil", in_dim=6, n_bins=8, hidden_dim=5, attn_dim=4)
    theta0 = {k: v.detach().clone() for k, v in net.state_dict().items()}
    tau_s = {k: 0.5 * torch.randn_like(v) for k, v in theta0.items()}
    tau_t = {k: 0.5 * torch.randn_like(v) for k, v in theta0.items()}
    bags = _bags(5, 6)
    fn = merged_loss_fn(create_model("abmil", in_dim=6, n_bins=8, hidden_dim=5, attn_dim=4),
                        theta0, tau_s, tau_t, bags, loss_alpha=0.3, max_elements=40)
    c = coefficient_grid(0.25)
    losses = evaluate_grid(fn, c, batch=7)
    ref = create_model("abmil", in_dim=6, n_bins=8, hidden_dim=5, attn_dim=4)
    for i, ct in enumerate(c):
        for j, cs in enumerate(c):
            assert losses[i, j] == pytest.approx(_direct(ref, theta0, tau_s, tau_t, bags, 0.3,
                                                         cs, ct), rel=1e-5, abs=1e-6)


class _NoVmap(nn.Module):
    """A network whose forward reads a value (.item()), which vmap cannot batch."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3, 4))

    def forward(self, x):
        scale = 1.0 + float(self.w.abs().sum().item()) * 0.0
        return (x.mean(0, keepdim=True) @ self.w.t()) * scale


def test_networks_that_cannot_be_vmapped_are_evaluated_point_by_point(caplog):
    caplog.set_level("INFO", logger="steph.analysis")
    torch.manual_seed(1)
    net = _NoVmap()
    theta0 = {"w": torch.randn(3, 4)}
    tau_s, tau_t = {"w": torch.randn(3, 4)}, {"w": torch.randn(3, 4)}
    bags = _bags(4, 4, n_bins=3)
    losses = evaluate_grid(merged_loss_fn(net, theta0, tau_s, tau_t, bags, 0.5),
                           coefficient_grid(0.5))
    for i, ct in enumerate(coefficient_grid(0.5)):
        for j, cs in enumerate(coefficient_grid(0.5)):
            assert losses[i, j] == pytest.approx(
                _direct(_NoVmap(), theta0, tau_s, tau_t, bags, 0.5, cs, ct), rel=1e-6)
    assert "cannot be vmapped" in caplog.text


class _Logistic(nn.Module):
    """One time bin: hazard logit a * mean(x) + b."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(()))
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return (self.a * x.mean() + self.b).reshape(1, 1)


def test_known_optimum_of_a_survival_model_is_the_grid_minimum():
    # One bin: a patient with an event costs -log h, a censored one -log(1 - h), and the
    # alpha-weighted loss (1 - alpha)(U + C) + alpha U is minimised at h = p / (p + (1 - alpha)
    # (1 - p)) for a group with event share p. Group A (mean feature 0) p = 1/4, group B (mean
    # feature 1) p = 3/4; alpha = 0.5 -> h_A = 0.4, h_B = 6/7: b* = logit(0.4),
    # a* = logit(6/7) - b*. With theta_0 = 0, tau_s = (a* / 0.36, 0), tau_t = (0, b* / 0.72)
    # the optimum is the grid point C_s = 0.36, C_t = 0.72.
    alpha = 0.5

    def logit(h):
        return math.log(h / (1 - h))

    b_star = logit(0.4)
    a_star = logit(6 / 7) - b_star
    bags = [Bag(torch.zeros(3, 2), {}, 0, e) for e in (1, 0, 0, 0)]
    bags += [Bag(torch.ones(5, 2), {}, 0, e) for e in (1, 1, 1, 0)]
    theta0 = {"a": torch.tensor(0.0), "b": torch.tensor(0.0)}
    tau_s = {"a": torch.tensor(a_star / 0.36), "b": torch.tensor(0.0)}
    tau_t = {"a": torch.tensor(0.0), "b": torch.tensor(b_star / 0.72)}
    fn = merged_loss_fn(_Logistic(), theta0, tau_s, tau_t, bags, alpha)
    c = coefficient_grid()
    losses = evaluate_grid(fn, c, batch=676)
    ls = Landscape("T", "S", 0, 0, c, losses, len(bags))
    assert ls.minimum(smoothed=False)[:2] == pytest.approx((0.36, 0.72))
    # the value there is the closed-form optimum of the loss
    h_a, h_b = 0.4, 6 / 7
    best = (-(1 * math.log(h_a) + 3 * (1 - alpha) * math.log(1 - h_a))
            - (3 * math.log(h_b) + 1 * (1 - alpha) * math.log(1 - h_b))) / 8
    assert ls.minimum(smoothed=False)[2] == pytest.approx(best, rel=1e-5)
    s_min = ls.minimum(smoothed=True)
    assert abs(s_min[0] - 0.36) <= 0.04 + 1e-9 and abs(s_min[1] - 0.72) <= 0.04 + 1e-9


# -- the algorithm: each group's tensors built once; the feature projection from three products

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def reference(monkeypatch):
    """``merged_loss_fn`` as it was before (rebuilding the merged tensors for every bag), kept
    in benchmarks/bench_landscape.py."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_landscape

    yield bench_landscape.reference_merged_loss_fn
    sys.modules.pop("bench_landscape", None)


@pytest.mark.parametrize("arch", sorted(TINY_NETWORKS))
def test_values_equal_the_previous_algorithm(arch, reference, one_thread):
    torch.manual_seed(3)
    kw = {"in_dim": 6, "n_bins": 4, **TINY_NETWORKS[arch]}
    net = create_model(arch, **kw)
    theta0 = {k: v.detach().clone() for k, v in net.state_dict().items()}
    tau_s = {k: 0.3 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in theta0.items()}
    tau_t = {k: 0.3 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in theta0.items()}
    bags = _bags(4, 6, seed=5, n_bins=4)
    if arch == "patch_gcn":  # a chain graph over each bag's patches
        for b in bags:
            i = torch.arange(b.x.shape[0] - 1)
            b.inputs["edge_index"] = torch.stack([torch.cat([i, i + 1]), torch.cat([i + 1, i])])
    c = coefficient_grid(0.25)
    # max_elements small enough for several groups of points, block_elements for several
    # vmapped calls per group and bag
    new = evaluate_grid(merged_loss_fn(create_model(arch, **kw), theta0, tau_s, tau_t, bags, 0.4,
                                       max_elements=4000, block_elements=400), c, batch=25)
    old = evaluate_grid(reference(create_model(arch, **kw), theta0, tau_s, tau_t, bags, 0.4,
                                  max_elements=4000), c, batch=25)
    np.testing.assert_allclose(new, old, rtol=1e-5, atol=1e-6)


class _Recorder(nn.Module):
    """Keeps every weight tensor it is called with (alive, so that no two builds share memory);
    ``.item()`` keeps it off the vmapped path."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3, 4))
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        scale = 1.0 + float(self.w.abs().sum().item()) * 0.0  # raises under vmap
        self.seen.append(self.w)
        return (x.mean(0, keepdim=True) @ self.w.t()) * scale


def test_each_points_tensors_are_built_once_for_all_bags(caplog):
    caplog.set_level("INFO", logger="steph.analysis")
    torch.manual_seed(1)
    net = _Recorder()
    theta0 = {"w": torch.randn(3, 4)}
    tau_s, tau_t = {"w": torch.randn(3, 4)}, {"w": torch.randn(3, 4)}
    bags = _bags(5, 4, n_bins=3)
    fn = merged_loss_fn(net, theta0, tau_s, tau_t, bags, 0.5)
    net.seen.clear()  # calls made while preparing
    evaluate_grid(fn, coefficient_grid(0.5), batch=9)  # 9 points, one group
    assert len(net.seen) == 9 * len(bags)
    builds = {t.untyped_storage().data_ptr() for t in net.seen}
    assert len(builds) == 1  # one build of the 9 points' tensors, used by all 5 bags


class _TwoLinears(nn.Module):
    """``first`` is applied to the bag itself; ``again`` to the bag and to its square (twice);
    ``scaled`` to a transformed bag: only ``first`` may be formed from products per bag."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 3)
        self.again = nn.Linear(4, 3)
        self.scaled = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.relu(self.first(x)) + self.again(x) + self.again(x * x) + self.scaled(2 * x)
        return self.head(h.mean(0, keepdim=True))


def test_only_layers_on_the_bag_itself_are_projected(reference, one_thread):
    from steph.analysis.landscape import _input_linears

    torch.manual_seed(2)
    net = _TwoLinears().eval()
    theta0 = {k: v.detach().clone() for k, v in net.state_dict().items()}
    bags = _bags(3, 4, n_bins=2)
    with torch.no_grad():
        assert _input_linears(net, bags, {}, theta0) == ["first"]
        abmil = create_model("abmil", in_dim=4, n_bins=2, hidden_dim=5, attn_dim=3)
        assert _input_linears(abmil, bags, {}, dict(abmil.state_dict())) == ["feat_proj.0"]
    tau_s = {k: torch.randn_like(v) for k, v in theta0.items()}
    tau_t = {k: torch.randn_like(v) for k, v in theta0.items()}
    c = coefficient_grid(0.25)
    new = evaluate_grid(merged_loss_fn(net, theta0, tau_s, tau_t, bags, 0.0), c)
    old = evaluate_grid(reference(_TwoLinears(), theta0, tau_s, tau_t, bags, 0.0), c)
    np.testing.assert_allclose(new, old, rtol=1e-5, atol=1e-6)
    assert isinstance(net.first, nn.Linear)  # the caller's network is left as it was
