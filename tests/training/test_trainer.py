import math

import pytest
import torch

from steph.config import TrainConfig
from steph.errors import RunError
from steph.models import ABMIL, SurvivalModule
from steph.training.trainer import cosine_with_warmup, fit, parameter_groups
from steph.runs import RunDir


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


class Counting(SurvivalModule):
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

    class Capture(SurvivalModule):
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
    assert (run / RunDir.CHECKPOINT).exists()
    torch.manual_seed(12345)  # a different global RNG state must not matter after resume
    resumed = small_model(seed=99)  # the fresh process builds its model again
    res = fit(resumed, bags, cfg, run, test=test, progress=False)
    assert res.resumed_from == 2
    _same_result(ref, ref_res, resumed, res)


def test_resume_after_the_last_epoch_completes_its_log(tmp_path):
    """Killed after the last checkpoint, before the log of that epoch was written: the rerun
    trains nothing more but writes the log of every epoch (the kill harness, tests/faults,
    found the last row missing)."""
    cfg = TrainConfig(epochs=2, bags_per_step=3, eval_every=1)
    bags = make_bags(10)
    fit(small_model(), bags, cfg, tmp_path, progress=False)
    log = tmp_path / "log.jsonl"
    full = log.read_text()
    log.write_text(full.splitlines(keepends=True)[0])  # the state the kill left
    res = fit(small_model(), bags, cfg, tmp_path, progress=False)
    assert res.resumed_from == 2 and log.read_text() == full


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


class _NeedsMask(SurvivalModule):
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


# -- checkpoint integrity ---------------------------------------------------------------------

@pytest.fixture
def steph_log(caplog):
    """Records of the 'steph' loggers (the CLI stops them propagating to the root logger)."""
    import logging

    logger = logging.getLogger("steph")
    logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


CKPT_CFG = TrainConfig(epochs=4, bags_per_step=3, eval_every=1)


def _reference(tmp_path):
    bags, test = make_bags(10), make_bags(6, seed=1)
    ref = small_model()
    res = fit(ref, bags, CKPT_CFG, tmp_path / "ref", test=test, progress=False)
    return bags, test, ref, res


def _killed_after(epoch, bags, test, run):
    def stop(row):
        if row["epoch"] == epoch:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(small_model(), bags, CKPT_CFG, run, test=test, progress=False, on_epoch_end=stop)


def _same_result(a_model, a_res, b_model, b_res):
    """Bit-identical weights and history (but for the timings)."""
    def strip(history):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in history]

    assert strip(a_res.history) == strip(b_res.history)
    for (n, a), (_, b) in zip(a_model.state_dict().items(), b_model.state_dict().items()):
        assert torch.equal(a, b), n


def _damage(path, how):
    raw = path.read_bytes()
    if how == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    else:  # one flipped bit in the tensor data: only the checksum can tell
        flipped = bytearray(raw)
        flipped[-9] ^= 0x04
        path.write_bytes(bytes(flipped))


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_damaged_checkpoint_resumes_from_the_previous_one(how, tmp_path, steph_log):
    from steph.runs import RunDir

    bags, test, ref, ref_res = _reference(tmp_path)
    run = tmp_path / "run"
    _killed_after(3, bags, test, run)
    assert (run / RunDir.CHECKPOINT_PREV).exists()
    _damage(run / RunDir.CHECKPOINT, how)
    again = small_model(seed=7)
    res = fit(again, bags, CKPT_CFG, run, test=test, progress=False)
    assert res.resumed_from == 2
    warned = [r.getMessage() for r in steph_log.records if r.levelname == "WARNING"]
    assert any(str(run / RunDir.CHECKPOINT) in m and ("truncated" if how == "truncate" else "checksum") in m
               and "trying the previous checkpoint" in m for m in warned), warned
    assert any("resuming from the previous checkpoint" in m for m in warned), warned
    _same_result(ref, ref_res, again, res)
    assert not (run / RunDir.CHECKPOINT_PREV).exists()  # removed once the last epoch is written


def test_both_checkpoints_damaged_restarts_from_scratch(tmp_path, steph_log):
    from steph.runs import RunDir

    bags, test, ref, ref_res = _reference(tmp_path)
    run = tmp_path / "run"
    _killed_after(3, bags, test, run)
    _damage(run / RunDir.CHECKPOINT, "flip")
    _damage(run / RunDir.CHECKPOINT_PREV, "truncate")
    again = small_model()  # a fresh process builds the same initial model
    res = fit(again, bags, CKPT_CFG, run, test=test, progress=False)
    assert res.resumed_from == 0
    warned = " | ".join(r.getMessage() for r in steph_log.records if r.levelname == "WARNING")
    assert str(run / RunDir.CHECKPOINT_PREV) in warned and "starting from scratch" in warned
    _same_result(ref, ref_res, again, res)


def test_killed_between_the_renames_resumes_from_the_previous_one(tmp_path, steph_log):
    from steph.runs import RunDir

    bags, test, ref, ref_res = _reference(tmp_path)
    run = tmp_path / "run"
    _killed_after(3, bags, test, run)
    (run / RunDir.CHECKPOINT).unlink()  # the old one was renamed, the new one not yet in place
    again = small_model(seed=3)
    res = fit(again, bags, CKPT_CFG, run, test=test, progress=False)
    assert res.resumed_from == 2
    assert any("is missing" in r.getMessage() and RunDir.CHECKPOINT_PREV in r.getMessage()
               for r in steph_log.records)
    _same_result(ref, ref_res, again, res)


def test_full_disk_while_checkpointing_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import errno
    import os

    from steph.utils.io import read_safetensors

    bags, test, ref, ref_res = _reference(tmp_path)
    run = tmp_path / "run"
    real_fsync = os.fsync
    disk = {"full": False}

    def fsync(fd):
        if disk["full"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    def fill_disk(row):
        if row["epoch"] == 2:
            disk["full"] = True

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(RunError) as err:
        fit(small_model(), bags, CKPT_CFG, run, test=test, progress=False, on_epoch_end=fill_disk)
    monkeypatch.undo()
    assert str(run / RunDir.CHECKPOINT) in str(err.value) and "No space left" in str(err.value)
    assert read_safetensors(run / RunDir.CHECKPOINT)[1]["epoch"] == "2"  # the last good one, intact
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.prev.safetensors", RunDir.CHECKPOINT,
                                                     "log.jsonl"]  # no temporary file left
    again = small_model()
    res = fit(again, bags, CKPT_CFG, run, test=test, progress=False)
    assert res.resumed_from == 2
    _same_result(ref, ref_res, again, res)


def test_thread_count_is_recorded_and_kept_on_resume(tmp_path, restore_threads):
    from steph.utils.io import read_safetensors

    bags = make_bags(10)
    cfg = TrainConfig(epochs=3, bags_per_step=3, eval_every=0, threads=1)

    def stop(row):
        if row["epoch"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(small_model(), bags, cfg, tmp_path, progress=False, on_epoch_end=stop)
    assert read_safetensors(tmp_path / RunDir.CHECKPOINT)[1]["threads"] == "1"
    torch.set_num_threads(2)
    res = fit(small_model(), bags, cfg.model_copy(update={"threads": None}), tmp_path,
              progress=False)
    assert res.resumed_from == 1
    assert res.extra["reproducibility"]["threads"] == 1 and torch.get_num_threads() == 1


def test_a_module_must_keep_the_trainers_contract(tmp_path):
    """fit() refuses a module that is not a SurvivalModule, and one with a hook-like method
    the trainer never calls (a misspelt begin_step would silently do nothing)."""
    from steph.models import check_module

    with pytest.raises(TypeError, match="not a steph.models.SurvivalModule"):
        fit(torch.nn.Linear(3, 4), make_bags(4), TrainConfig(bags_per_step=4), tmp_path,
            progress=False)

    class Misspelt(Counting):
        def begin_steps(self):  # one letter too many
            pass

    with pytest.raises(TypeError, match=r"begin_steps\(\), which the trainer never calls"):
        fit(Misspelt(small_model()), make_bags(4), TrainConfig(bags_per_step=4), tmp_path,
            progress=False)
    assert check_module(Counting(small_model())) is not None
