"""Evaluation must see every patch: ``data.max_instances`` is a training-only sampler.

``Experiment.datasets`` samples the training bags only; ``_finish`` predicts the training
C-index on the full training bags.
"""


from steph.experiments.cv import Experiment


def test_test_dataset_is_never_subsampled(tiny_data, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from conftest import tiny_experiment_config

    cfg = tiny_experiment_config()
    cfg.data.max_instances = 5
    exp = Experiment(tiny_data, tmp_path, cfg)
    cohort = exp.workspace.cohort("TGT")
    split = exp.workspace.split("TGT", 0)
    train_ds, test_ds = exp.workspace.datasets(cohort, split, exp.workspace.bins_for(cohort, split))
    assert train_ds.max_instances == 5  # training keeps its sampler
    assert test_ds.max_instances is None
    for i, pid in enumerate(test_ds.patient_ids):
        assert test_ds[i]["features"].shape[0] == cohort.patient(pid)["n_patches"]
