"""joint: one model on the target's training patients plus every source cohort's patients."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from steph.data.dataset import BagDataset, ConcatBags
from steph.experiments.cv import Experiment, run_cv
from steph.runs import RunRef, RunsFolder

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import tiny_experiment_config  # noqa: E402


def test_concat_bags_concatenates_items_and_labels(tiny_data):
    from steph.data.cohort import Cohort
    from steph.survival.bins import TimeBins

    bins = TimeBins.uniform(8, 4000.0)
    a, b = Cohort.load(tiny_data / "TGT"), Cohort.load(tiny_data / "RELA")
    da = BagDataset(a, a.patient_ids[:5], bins)
    db = BagDataset(b, b.patient_ids[:7], bins)
    both = ConcatBags([da, db])
    assert len(both) == 12 and both.patient_ids == [*da.patient_ids, *db.patient_ids]
    np.testing.assert_array_equal(both.times, np.concatenate([da.times, db.times]))
    np.testing.assert_array_equal(both.bin_indices, np.concatenate([da.bin_indices,
                                                                    db.bin_indices]))
    for i, (part, j) in enumerate([(da, k) for k in range(5)] + [(db, k) for k in range(7)]):
        item, ref = both[i], part[j]
        assert item["patient_id"] == ref["patient_id"] and item["event"] == ref["event"]
        torch.testing.assert_close(item["features"], ref["features"])
    with pytest.raises(IndexError):
        both[12]


def test_joint_trains_on_the_target_and_every_source(tiny_data, tmp_path, monkeypatch):
    """The trainer sees the fold's training patients of the target and all patients of the
    sources, never a test patient of the target; the run is evaluated on the target's test
    patients; the sources are part of its identity."""
    import steph.experiments.runner as R

    seen = {}
    real_fit = R.fit

    def spy(module, train, *a, **k):
        seen["train"] = list(train.patient_ids)
        return real_fit(module, train, *a, **k)

    monkeypatch.setattr(R, "fit", spy)
    cfg = tiny_experiment_config(epochs=1)
    run_cv(tiny_data, tmp_path, ["joint"], targets=["TGT"], folds="0", cfg=cfg, progress=False)
    exp = Experiment(tiny_data, tmp_path, cfg, progress=False)
    split = exp.workspace.split("TGT", 0)
    sources = {c: set(exp.workspace.cohort(c).patient_ids) for c in ("RELA", "UNRB")}
    assert set(seen["train"]) == set(split.train_ids) | sources["RELA"] | sources["UNRB"]
    assert not set(seen["train"]) & set(split.test_ids)
    run = RunsFolder(tmp_path).run(RunRef("TGT", "joint", 0))
    metrics = run.read_metrics()
    assert metrics["joint_train_patients"] == {"TGT": len(split.train_ids),
                                               "RELA": len(sources["RELA"]),
                                               "UNRB": len(sources["UNRB"])}
    pred = run.read_predictions()
    assert set(pred.loc[pred["split"] == "test", "patient_id"]) == set(split.test_ids)
    assert run.read_settings()["run"]["sources"] == ["RELA", "UNRB"]
    # other sources: another run
    with pytest.raises(Exception, match="other settings"):
        run_cv(tiny_data, tmp_path, ["joint"], targets=["TGT"], folds="0", cfg=cfg,
               sources=["RELA"], progress=False)
