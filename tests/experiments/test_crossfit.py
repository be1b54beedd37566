"""STEPH's cross-fitted target task vectors through the experiment grid (``steph_xfit``): the
runner trains the inner target models, STEPH merges every training patient with the one that
never saw it, and the saved artefact is a plain STEPH with the fold model's tau_t."""

from __future__ import annotations

import copy
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import torch

from steph.data.dataset import BagDataset
from steph.experiments.cv import Experiment, run_cv
from steph.inference import load_artefact
from steph.methods import get_method
from steph.methods.steph import InnerRows
from steph.runs import RunRef, RunsFolder

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import tiny_experiment_config


def test_steph_xfit_declares_its_inner_targets():
    cfg = tiny_experiment_config()
    assert get_method("steph_xfit").inner_targets(cfg) == 5
    assert get_method("steph").inner_targets(cfg) is None  # off by default
    on = cfg.model_copy(update={"steph": cfg.steph.model_copy(update={"crossfit": 3})})
    assert get_method("steph").inner_targets(on) == 3
    # the per-bag input travels to the data workers
    rows = pickle.loads(pickle.dumps(InnerRows({"a": 2})))
    assert int(rows("a")) == 2 and int(rows("test patient")) == -1


def test_steph_xfit_run_trains_inner_targets_and_saves_a_plain_steph(tiny_data, tmp_path,
                                                                     monkeypatch):
    import steph.experiments.runner as R

    seen: dict = {}
    real_fit, real_write = R.fit, R.write_run

    def fit_spy(module, train, *a, **k):
        if hasattr(module, "tau_inner"):  # the STEPH run, not a target model
            seen["rows"] = {item["patient_id"]: int(item["tau_row"]) for item in train}
        return real_fit(module, train, *a, **k)

    def write_spy(run, ref, trained, **k):
        if ref.method == "steph_xfit":  # the trained module before its export
            seen["module"] = copy.deepcopy(trained.built.module)
        return real_write(run, ref, trained, **k)

    monkeypatch.setattr(R, "fit", fit_spy)
    monkeypatch.setattr(R, "write_run", write_spy)
    cfg = tiny_experiment_config(epochs=1)
    run_cv(tiny_data, tmp_path, ["steph_xfit"], targets=["TGT"], folds="0", cfg=cfg,
           progress=False)
    run = RunsFolder(tmp_path).run(RunRef("TGT", "steph_xfit", 0))
    metrics = run.read_metrics()
    assert metrics["crossfit_folds"] == 5 and len(metrics["crossfit_inner_cindex"]) == 5
    assert metrics["screen_crossfit"] is True  # w_init "screened" probed the inner encoders
    exp = Experiment(tiny_data, tmp_path, cfg, progress=False)
    ws = exp.workspace
    split = ws.split("TGT", 0)
    # every training patient merged with the inner model that never saw it: each inner fold
    # holds out as many as its model's score.json says, and together they are the training
    # patients, once each
    rows = seen["rows"]
    assert set(rows) == set(split.train_ids) and set(rows.values()) == set(range(5))
    for j in range(5):
        inner = run.path / "crossfit" / f"inner{j}"
        assert (inner / "model.safetensors").exists()
        score = json.loads((inner / "score.json").read_text())
        assert score["n_held_out"] == sum(r == j for r in rows.values())
        assert score["n_train"] == len(split.train_ids) - score["n_held_out"]
    # the artefact: a plain STEPH, predicting as the in-memory module with the full tau_t
    saved, manifest = load_artefact(run.weights)
    assert manifest["kind"] == "steph"
    assert "tau_row" not in saved.bag_inputs and not hasattr(saved, "tau_inner")
    memory = seen["module"].eval()
    assert memory.tau_inner.shape[0] == 5
    torch.testing.assert_close(saved.tau, memory.tau)
    cohort = ws.cohort("TGT")
    _, test = ws.datasets(cohort, split, ws.bins_for(cohort, split))
    with torch.no_grad():
        for item in test:
            x = item["features"]
            torch.testing.assert_close(saved(x).logits,
                                       memory(x, tau_row=torch.tensor(-1)).logits,
                                       rtol=0, atol=0)
        # a training patient: its cross-fitted merge (what STEPH trained on) is not the saved one
        pid = split.train_ids[0]
        x = BagDataset(cohort, [pid], test.bins)[0]["features"]
        assert not torch.allclose(memory(x, tau_row=torch.tensor(rows[pid])).logits,
                                  saved(x).logits)
    pred = run.read_predictions()
    assert set(pred.loc[pred["split"] == "test", "patient_id"]) == set(split.test_ids)
    assert np.isfinite(pred["risk"]).all()
