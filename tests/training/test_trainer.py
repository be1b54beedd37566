import math

import pytest
import torch

from steph.config import TrainConfig
from steph.errors import RunError
from steph.models import ABMIL
from steph.training.trainer import CHECKPOINT, cosine_with_warmup, fit, parameter_groups


def make_bags(n=10, d=6, seed=0, n_bins=4):
    g = torch.Generator().manual_seed(seed)
    bags = []
    for i in range(n):
        k = 3 + i % 4
        bags.append({"features": torch.randn(k, d, generator=g), "bin": torch.tensor(i % n_bins),
                     "time": float(10 + 7 * i), "event": int(i % 3 != 0), "patient_id": f"p{i}"})
    return bags


def small_model(seed=0, dropout=0.25):
    torch.manual_seed(seed)
    return ABMIL(6, 4, hidden_dim=8, attn_dim=4, dropout=dropout)


def test_weight_decay_only_on_matrices():
    model = small_model()
    groups = parameter_groups(model, 1e-5)
    by_id = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert by_id[id(p)] == (1e-5 if p.ndim >= 2 else 0.0), name
    assert len(by_id) == len(list(model.parameters()))


def test_cosine_with_warmup_hand_values():
    # 2 warm-up steps then cosine over 4 steps
    assert cosine_with_warmup(0, 2, 6) == pytest.approx(0.5)
    assert cosine_with_warmup(1, 2, 6) == pytest.approx(1.0)
    assert cosine_with_warmup(2, 2, 6) == pytest.approx(1.0)
    assert cosine_with_warmup(4, 2, 6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine_with_warmup(6, 2, 6) == pytest.approx(0.0)
    assert cosine_with_warmup(3, 0, 4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))


class Counting(torch.nn.Module):
    """Wraps a model, records which bags it saw and the step hooks."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.seen, self.begins, self.ends = [], 0, 0

    def forward(self, x):
        if self.training:
            self.seen.append(x.shape[0])
        return self.inner(x)

    def begin_step(self):
        self.begins += 1

    def end_step(self):
        self.ends += 1


def test_steps_remainder_dropped_and_hooks(tmp_path):
    model = Counting(small_model())
    cfg = TrainConfig(epochs=3, bags_per_step=4, eval_every=0)
    res = fit(model, make_bags(10), cfg, tmp_path, progress=False)
    # 10 bags, 4 per step: 2 steps per epoch, the remaining 2 bags dropped
    assert model.begins == model.ends == 6
    assert len(model.seen) == 3 * 8
    assert [r["epoch"] for r in res.history] == [1, 2, 3]
    assert (tmp_path / "log.jsonl").read_text().count("\n") == 3


def test_step_is_mean_of_bag_gradients(tmp_path):
    """One optimiser step of 4 bags with SGD-like check: the accumulated gradient equals the mean
    of the per-bag gradients (computed independently)."""
    from steph.survival.loss import nll_survival_loss

    bags = make_bags(4)
    model = small_model(dropout=0.0)  # no dropout: both computations see the same network
    grads = []
    for b in bags:
        model.zero_grad()
        nll_survival_loss(model(b["features"]), b["bin"].view(1), torch.tensor([b["event"]])).backward()
        grads.append(model.head.weight.grad.clone())
    expected = torch.stack(grads).mean(0)

    captured = {}

    class Capture(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

        def end_step(self):
            captured["g"] = self.inner.head.weight.grad.clone()

    m2 = small_model(dropout=0.0)
    fit(Capture(m2), bags, TrainConfig(epochs=1, bags_per_step=4, eval_every=0, warmup_epochs=0),
        tmp_path, progress=False)
    torch.testing.assert_close(captured["g"], expected)


def test_too_few_bags_is_a_clear_error(tmp_path):
    with pytest.raises(RunError, match="fewer than one optimiser step"):
        fit(small_model(), make_bags(3), TrainConfig(bags_per_step=4), tmp_path, progress=False)


class Interrupt(Exception):
    pass


def test_resume_gives_identical_weights_and_metrics(tmp_path):
    cfg = TrainConfig(epochs=4, bags_per_step=3, eval_every=1)
    bags, test = make_bags(10), make_bags(6, seed=1)
    ref = small_model()
    ref_res = fit(ref, bags, cfg, tmp_path / "ref", test=test, progress=False)

    # killed after epoch 2 (the checkpoint of epoch 2 is on disk), then started again
    run = tmp_path / "run"

    def stop(row):
        if row["epoch"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(small_model(), bags, cfg, run, test=test, progress=False, on_epoch_end=stop)
    assert (run / CHECKPOINT).exists()
    torch.manual_seed(12345)  # a different global RNG state must not matter after resume
    resumed = small_model(seed=99)  # the fresh process builds its model again
    res = fit(resumed, bags, cfg, run, test=test, progress=False)
    assert res.resumed_from == 2
    for (n, a), (_, b) in zip(ref.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(res.history) == strip(ref_res.history)


def test_same_seed_same_weights_different_seed_differs(tmp_path):
    bags = make_bags(8)
    out = []
    for i, seed in enumerate([0, 0, 1]):
        m = small_model()
        fit(m, bags, TrainConfig(epochs=2, bags_per_step=2, seed=seed, eval_every=0),
            tmp_path / str(i), progress=False)
        out.append(m.head.weight.detach().clone())
    assert torch.equal(out[0], out[1])
    assert not torch.equal(out[0], out[2])


class _NeedsMask(torch.nn.Module):
    """A toy MIL module that takes an extra per-bag input: a 0/1 mask over its instances."""

    bag_inputs = ("mask",)

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 4)
        self.seen: list[int] = []

    def forward(self, x, mask):
        self.seen.append(int(mask.sum()))
        return self.lin((x * mask[:, None]).mean(0, keepdim=True))


def test_extra_bag_inputs_reach_the_module(tmp_path):
    bags = make_bags(8)
    for i, b in enumerate(bags):
        n = b["features"].shape[0]
        b["mask"] = (torch.arange(n) < 1 + i % 2).float()  # 1 or 2 instances kept
    model = _NeedsMask()
    fit(model, bags, TrainConfig(epochs=1, bags_per_step=4), tmp_path, progress=False)
    assert len(model.seen) == 8 and set(model.seen) == {1, 2}
    from steph.training.trainer import predict

    model.seen.clear()
    predict(model, bags)
    assert sorted(model.seen) == sorted(1 + i % 2 for i in range(8))


def test_missing_bag_input_is_named(tmp_path):
    with pytest.raises(KeyError, match="mask"):
        fit(_NeedsMask(), make_bags(4), TrainConfig(epochs=1, bags_per_step=4), tmp_path,
            progress=False)


def test_lr_scales_give_named_parameters_their_own_learning_rate():
    model = small_model()
    model.lr_scales = {"head.": 10.0}
    groups = parameter_groups(model, 1e-5, lr=1e-3)
    by_id = {id(p): g for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        g = by_id[id(p)]
        assert g.get("lr", 1e-3) == (1e-2 if name.startswith("head.") else 1e-3), name
        assert g["weight_decay"] == (1e-5 if p.ndim >= 2 else 0.0), name
    # without lr_scales: exactly the two groups of the protocol, in the same order as before
    plain = parameter_groups(small_model(), 1e-5)
    assert [g["weight_decay"] for g in plain] == [1e-5, 0.0] and all("lr" not in g for g in plain)
