"""STEPH's collapse guard and the inner-CV gamma search, through the experiment grid."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from steph.experiments.cv import Experiment, run_cv
from steph.runs import RunRef
from steph.experiments.search import choose
from steph.merging.steph import STEPH
from steph.methods.steph import CollapseGuard
from steph.training import TrainingRestart

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import tiny_experiment_config  # noqa: E402


def _steph(gamma, guard=True, grid=(0.0, 0.0025, 0.005, 0.01, 0.05)):
    from steph.config import StephConfig
    from steph.merging.task_vectors import TaskVectorStack
    from steph.models import ABMIL

    hp = {"in_dim": 4, "n_bins": 3, "hidden_dim": 4, "attn_dim": 2, "dropout": 0.0}
    theta0 = ABMIL(**hp).state_dict()
    names = [n for n in theta0 if not n.startswith("head.")]
    taus = [{n: torch.randn_like(theta0[n]) for n in names} for _ in range(3)]
    stack = TaskVectorStack.from_dicts({n: theta0[n] for n in names}, taus, ["T", "A", "B"], names)
    return STEPH(stack, hp, StephConfig(gamma=gamma, guard=guard, gamma_grid=grid, embed_dim=4))


def test_guard_asks_for_the_next_smaller_gamma(caplog):
    """The collapse guard is the STEPH recipe's on_epoch_end callback (not a module hook)."""
    guard = CollapseGuard(_steph(0.05))
    guard({"epoch": 3, "mean_alive": 0.4})  # alive: nothing happens
    with pytest.raises(TrainingRestart) as info:
        guard({"epoch": 3, "mean_alive": 0.0})
    assert info.value.overrides == {"steph.gamma": 0.01} and "epoch 3" in info.value.reason
    with pytest.raises(TrainingRestart) as info:
        CollapseGuard(_steph(0.003))({"epoch": 1, "mean_alive": 0.0})  # between grid values
    assert info.value.overrides == {"steph.gamma": 0.0025}
    with caplog.at_level("WARNING", logger="steph.methods"):
        CollapseGuard(_steph(0.0))({"epoch": 2, "mean_alive": 0.0})  # nothing smaller: warn
        CollapseGuard(_steph(0.05, guard=False))({"epoch": 2, "mean_alive": 0.0})
    assert sum("merge weight was 0" in r.message for r in caplog.records) == 2
    assert "guard is off" in caplog.text


def test_alive_statistic_is_logged_per_bag():
    model = _steph(0.05)
    out = model(torch.randn(5, 4))
    assert out.stats["alive"].item() in (0.0, 1.0)
    with torch.no_grad():
        model.h_agg[-1].bias.fill_(-100.0)  # every w under its ReLU
    assert model(torch.randn(5, 4)).stats["alive"].item() == 0.0


def test_choose_ties_to_the_larger_value():
    assert choose({0.0: 0.6, 0.005: 0.7, 0.05: 0.7}) == 0.05
    assert choose({0.0: 0.6, 0.005: 0.7, 0.05: 0.7}, prefer="smaller") == 0.005
    assert choose({0.0: float("nan"), 0.01: 0.5}) == 0.01


def test_collapse_restarts_the_run_with_a_smaller_gamma(tiny_data, tmp_path):
    # a huge gamma and learning rate drive every w under its ReLU within the first epoch
    cfg = tiny_experiment_config(lr=0.05, epochs=2, head_init="baseline")
    cfg = cfg.model_copy(update={"steph": cfg.steph.model_copy(
        update={"gamma": 1000.0, "gamma_grid": (0.0, 1000.0)})})
    summary = run_cv(tiny_data, tmp_path, ["steph"], targets=["TGT"], folds="0", cfg=cfg,
                     progress=False)
    run = tmp_path / "TGT" / "steph" / "fold0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["gamma"] == 0.0
    assert metrics["restarts"][0]["overrides"] == {"steph.gamma": 0.0}
    assert metrics["restarts"][0]["stopped_after_epoch"] >= 1
    assert (run / "log.attempt0.jsonl").exists() and (run / "log.jsonl").exists()
    first = [json.loads(x) for x in (run / "log.attempt0.jsonl").read_text().splitlines()]
    assert first[-1]["mean_alive"] == 0.0
    assert len(summary[summary["method"] == "steph"]) == 1


def test_gamma_search_inner_cv_and_resume(tiny_data, tmp_path, monkeypatch):
    """The inner cross-validation of gamma: interrupted in the middle, it resumes with only the
    candidates not scored yet; its selection is recorded; it reads only the outer training
    patients. (One search serves both checks: each costs about 19 STEPH runs.)"""
    from steph.data import dataset as D

    seen: list[str] = []
    orig = D.BagDataset.__init__

    def spy(self, cohort, patient_ids, *a, **k):
        if cohort.name == "TGT":
            seen.append(("ds", tuple(patient_ids)))
        orig(self, cohort, patient_ids, *a, **k)

    monkeypatch.setattr(D.BagDataset, "__init__", spy)
    cfg = tiny_experiment_config(epochs=1)
    cfg = cfg.model_copy(update={"steph": cfg.steph.model_copy(
        update={"gamma": "search", "gamma_grid": (0.0, 0.05), "search_folds": 2})})
    exp = Experiment(tiny_data, tmp_path, cfg, progress=False)
    exp.run_all(exp.plan(["abmil"], ["TGT"], [0]) + exp.plan(["abmil"], ["RELA", "UNRB"], [0]))
    calls = []
    real = exp.runner.score_candidate

    def counting(*a, **kw):
        calls.append(a[4:6])  # (key, value)
        if len(calls) == 3:
            raise KeyboardInterrupt  # interrupted in the middle of the search
        return real(*a, **kw)

    monkeypatch.setattr(exp.runner, "score_candidate", counting)
    with pytest.raises(KeyboardInterrupt):
        exp.run(RunRef("TGT", "steph", 0))
    done_before = len(list((tmp_path / "TGT/steph/fold0/search").glob("*/*/score.json")))
    assert done_before == 2
    calls.clear()
    exp.run(RunRef("TGT", "steph", 0))
    assert len(calls) == 2  # only the two candidates not scored before
    run = tmp_path / "TGT" / "steph" / "fold0"
    sel = json.loads((run / "search" / "selection.json").read_text())
    assert sel["value"] in (0.0, 0.05) and set(sel["scores"]) == {"0.0", "0.05"}
    assert len(sel["per_fold"]["0.0"]) == 2
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["gamma_selected"] == sel["value"] == metrics["gamma"]
    assert (run / "search" / "inner0" / "target" / "model.safetensors").exists()
    # the search reads only the outer training patients: no outer test patient is part of any
    # inner dataset (inner target models, candidates, validation sets)
    outer_train = set(exp.workspace.split("TGT", 0).train_ids)
    outer_test = set(exp.workspace.split("TGT", 0).test_ids)
    inner = [set(ids) for _, ids in seen if set(ids) not in (outer_train, outer_test)]
    assert len(inner) >= 2 * 2 + 2  # per inner fold: target train, candidates' train + val
    assert all(ids <= outer_train for ids in inner)
    assert set().union(*inner) == outer_train
