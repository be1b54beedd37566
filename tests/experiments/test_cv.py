import json
import shutil

import pandas as pd
import pytest
import torch

from steph.errors import ConfigError, RunError
from steph.experiments.cv import Experiment, parse_folds, run_cv
from steph.methods import MethodContext, get_method
from steph.experiments.workspace import ensure_theta0, load_theta0
from steph.runs import RunRef, RunsFolder
from steph.merging.task_vectors import task_vector


@pytest.fixture(scope="module")
def tiny_runs(tiny_data, tmp_path_factory):
    """abmil + steph cross-validated on TGT, folds 0-1 (trains the fold-0 sources too)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from conftest import tiny_experiment_config

    out = tmp_path_factory.mktemp("runs")
    summary = run_cv(tiny_data, out, ["abmil", "steph"], targets=["TGT"], folds="0-1",
                     cfg=tiny_experiment_config(), progress=False)
    return out, summary


def test_parse_folds():
    assert parse_folds("0-4", 5) == [0, 1, 2, 3, 4]
    assert parse_folds("3,1,1", 5) == [3, 1]
    assert parse_folds(None, 3) == [0, 1, 2]
    for bad in ["5", "x", "2-9"]:
        with pytest.raises(ConfigError):
            parse_folds(bad, 5)


def test_plan_orders_prerequisites_first(tiny_data, tmp_path, tiny_cfg):
    exp = Experiment(tiny_data, tmp_path, tiny_cfg)
    jobs = exp.plan(["steph"], ["TGT"], [1])
    assert jobs == [RunRef("TGT", "abmil", 1), RunRef("RELA", "abmil", 0), RunRef("UNRB", "abmil", 0),
                    RunRef("TGT", "steph", 1)]
    exp2 = Experiment(tiny_data, tmp_path, tiny_cfg, sources=["RELA"])
    assert RunRef("UNRB", "abmil", 0) not in exp2.plan(["steph"], ["TGT"], [0])


def test_summary_rows_and_files(tiny_runs):
    out, summary = tiny_runs
    assert {"cohort", "method", "fold", "c_index"} <= set(summary.columns)
    got = summary[summary["method"].isin(["abmil", "steph"])]
    assert sorted(zip(got["method"], got["fold"])) == [("abmil", 0), ("abmil", 1), ("steph", 0), ("steph", 1)]
    assert got["c_index"].between(0, 1).all()
    assert (summary["method"] == "oracle").sum() == 2  # synthetic truth available
    on_disk = pd.read_csv(out / "summary.csv")
    assert len(on_disk) == len(summary)
    md = (out / "summary.md").read_text()
    assert "| abmil |" in md and "| steph |" in md and "Avg." in md
    assert (out / "summary.png").stat().st_size > 1000


def test_run_directory_contents(tiny_runs):
    out, _ = tiny_runs
    d = RunRef("TGT", "steph", 1).path(out)
    for f in ["config.yaml", "log.jsonl", "model.safetensors", "model.json", "predictions.csv", "metrics.json"]:
        assert (d / f).exists(), f
    assert not (d / "checkpoint.safetensors").exists()
    pred = pd.read_csv(d / "predictions.csv")
    assert list(pred.columns) == ["patient_id", "split", "risk", "time", "event"]
    splits = pd.read_csv(out / "splits" / "TGT" / "fold_1.csv")
    test_ids = set(splits.loc[splits["split"] == "test", "patient_id"])
    assert set(pred.loc[pred["split"] == "test", "patient_id"]) == test_ids
    assert not test_ids & set(pred.loc[pred["split"] == "train", "patient_id"])
    metrics = json.loads((d / "metrics.json").read_text())
    assert {"c_index", "train_c_index"} <= set(metrics)
    log = [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
    assert len(log[-1]["mean_w"]) == 2 and len(log[-1]["mean_lambda"]) == 2  # per source


def test_finished_runs_are_skipped(tiny_runs, tiny_data):
    out, _ = tiny_runs
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from conftest import tiny_experiment_config

    stamp = {p: p.stat().st_mtime_ns for p in out.glob("*/*/fold*/metrics.json")}
    run_cv(tiny_data, out, ["abmil", "steph"], targets=["TGT"], folds="0-1",
           cfg=tiny_experiment_config(), progress=False)
    assert stamp == {p: p.stat().st_mtime_ns for p in out.glob("*/*/fold*/metrics.json")}
    # a run started with other settings is refused instead of silently mixed
    with pytest.raises(RunError, match="other settings"):
        run_cv(tiny_data, out, ["abmil"], targets=["TGT"], folds="0",
               cfg=tiny_experiment_config(epochs=3), progress=False)


def test_task_vectors_are_relative_to_the_shared_theta0(tiny_runs):
    out, _ = tiny_runs
    theta0, _ = load_theta0(RunsFolder(out))
    from steph.utils.io import load_tensors

    tgt = load_tensors(RunRef("TGT", "abmil", 1).path(out) / "model.safetensors")
    tau = task_vector(tgt, theta0)
    assert any(v.abs().sum() > 0 for v in tau.values())


def test_two_cohorts_start_bit_identical(tiny_data, tmp_path, tiny_cfg):
    exp = Experiment(tiny_data, tmp_path, tiny_cfg)
    starts = []
    for cohort in ["TGT", "UNRB"]:
        c = exp.workspace.cohort(cohort)
        path = exp.workspace.theta0(c.feature_dim)
        theta0, meta = load_theta0(RunsFolder(tmp_path))
        ctx = MethodContext(cfg=tiny_cfg, target=cohort, fold=0, hparams=meta["hparams"], theta0=theta0,
                            bins=None, n_patients=len(c), n_train=0)
        starts.append(get_method("abmil").build(ctx).module.state_dict())
    for k in starts[0]:
        assert torch.equal(starts[0][k], starts[1][k]), k
    assert path.exists()


def test_theta0_mismatch_is_refused(tmp_path, tiny_cfg):
    ensure_theta0(RunsFolder(tmp_path), tiny_cfg.model, 16, 32)
    ensure_theta0(RunsFolder(tmp_path), tiny_cfg.model, 16, 32)  # same: fine
    with pytest.raises(RunError, match="same theta_0"):
        ensure_theta0(RunsFolder(tmp_path), tiny_cfg.model, 24, 32)


def test_unknown_cohorts_and_methods(tiny_data, tmp_path, tiny_cfg):
    with pytest.raises(ConfigError, match="unknown target"):
        run_cv(tiny_data, tmp_path, ["abmil"], targets=["NOPE"], cfg=tiny_cfg, progress=False)
    with pytest.raises(ConfigError, match="unknown method"):
        run_cv(tiny_data, tmp_path, ["abmil", "magic"], cfg=tiny_cfg, progress=False)


def test_interrupted_run_resumes_to_the_same_result(tiny_data, tmp_path, tiny_cfg):
    """A run killed mid-training (checkpoint on disk, no metrics) finishes on the next call with
    the same metrics as an uninterrupted run."""
    from steph.training import trainer

    cfg = tiny_cfg.model_copy(update={"train": tiny_cfg.train.model_copy(update={"epochs": 3})})
    ref = run_cv(tiny_data, tmp_path / "ref", ["abmil"], targets=["TGT"], folds="0", cfg=cfg, progress=False)

    real_save = trainer._save_checkpoint
    calls = {"n": 0}

    def dying_save(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed right after the checkpoint of epoch 2

    trainer._save_checkpoint = dying_save
    try:
        with pytest.raises(KeyboardInterrupt):
            run_cv(tiny_data, tmp_path / "run", ["abmil"], targets=["TGT"], folds="0", cfg=cfg, progress=False)
    finally:
        trainer._save_checkpoint = real_save
    d = RunRef("TGT", "abmil", 0).path(tmp_path / "run")
    assert (d / "checkpoint.safetensors").exists() and not (d / "metrics.json").exists()
    again = run_cv(tiny_data, tmp_path / "run", ["abmil"], targets=["TGT"], folds="0", cfg=cfg, progress=False)
    a = ref[ref.method == "abmil"].iloc[0]
    b = again[again.method == "abmil"].iloc[0]
    assert a["c_index"] == b["c_index"] and a["train_c_index"] == b["train_c_index"]
    from steph.utils.io import load_tensors

    wa = load_tensors(RunRef("TGT", "abmil", 0).path(tmp_path / "ref") / "model.safetensors")
    wb = load_tensors(d / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    shutil.rmtree(tmp_path / "ref")


def test_performance_settings_do_not_change_a_runs_identity(tiny_runs, tiny_data):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from conftest import tiny_experiment_config

    out, _ = tiny_runs
    cfg = tiny_experiment_config(threads=1)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"cache_mb": 64})})
    stamp = {p: p.stat().st_mtime_ns for p in out.glob("*/*/fold*/metrics.json")}
    run_cv(tiny_data, out, ["abmil", "steph"], targets=["TGT"], folds="0-1", cfg=cfg, progress=False)
    assert stamp == {p: p.stat().st_mtime_ns for p in out.glob("*/*/fold*/metrics.json")}


def test_rerun_gives_the_same_bytes_and_timing_lives_in_run_json(tiny_runs, tiny_data,
                                                                  tmp_path_factory):
    """metrics.json, predictions.csv, model weights and summary.csv depend only on the command
    and the data: a second run of the same grid into another folder writes the same bytes.
    Timing and host go to run.json / timing.csv instead."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from conftest import tiny_experiment_config

    first, _ = tiny_runs
    second = tmp_path_factory.mktemp("runs-again")
    run_cv(tiny_data, second, ["abmil", "steph"], targets=["TGT"], folds="0-1",
           cfg=tiny_experiment_config(), progress=False)
    for rel in ["TGT/abmil/fold1/metrics.json", "TGT/steph/fold0/metrics.json",
                "TGT/steph/fold1/predictions.csv", "TGT/steph/fold1/model.safetensors",
                "TGT/steph/fold1/model.json", "summary.csv"]:
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel
    metrics = json.loads((first / "TGT/steph/fold0/metrics.json").read_text())
    assert "train_seconds" not in metrics
    record = json.loads((first / "TGT/steph/fold0/run.json").read_text())
    assert record["train_seconds"] > 0 and record["host"] and len(record["epoch_seconds"]) == 2
    timing = pd.read_csv(first / "timing.csv")
    assert set(timing["method"]) == {"abmil", "steph"} and (timing["train_seconds"] > 0).all()
    assert "mean s/run" in (first / "summary.md").read_text()


def test_repeats_use_other_split_seeds_and_share_source_models(tiny_data, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from conftest import tiny_experiment_config

    cfg = tiny_experiment_config(epochs=1)
    exp = Experiment(tiny_data, tmp_path, cfg)
    jobs = exp.plan(["steph"], ["TGT"], [0], repeats=2)
    assert RunRef("TGT", "steph", 0, 1) in jobs and RunRef("TGT", "abmil", 0, 1) in jobs
    assert RunRef("RELA", "abmil", 0, 1) not in jobs  # sources: repeat 0's fold-0 models
    assert [j.repeat for j in exp.prerequisites(RunRef("TGT", "steph", 0, 1))] == [1, 0, 0]
    # a different split seed gives different folds
    assert exp.workspace.split("TGT", 0, 1).test_ids != exp.workspace.split("TGT", 0, 0).test_ids
    summary = run_cv(tiny_data, tmp_path, ["abmil"], targets=["TGT"], folds="0", cfg=cfg,
                     progress=False, repeats=2)
    got = summary[summary["method"] == "abmil"]
    assert sorted(got["repeat"]) == [0, 1]
    assert (tmp_path / "TGT" / "abmil" / "rep1" / "fold0" / "metrics.json").exists()
    assert (tmp_path / "splits" / "TGT" / "rep1").is_dir()
    assert "2 repeats" in (tmp_path / "summary.md").read_text()
    # a one-repeat call on the same folder hides nothing: the summary describes every finished
    # result of the folder (issue 19, item 2)
    again = run_cv(tiny_data, tmp_path, ["abmil"], targets=["TGT"], folds="0", cfg=cfg,
                   progress=False)
    assert sorted(again.loc[again["method"] == "abmil", "repeat"]) == [0, 1]


def test_repeats_refuse_cohorts_with_their_own_splits(tiny_data, tmp_path, tiny_cfg):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    exp0 = Experiment(data, tmp_path / "r0", tiny_cfg)
    split_dir = data / "TGT" / "splits"
    split_dir.mkdir()
    exp0.workspace.splits("TGT")  # writes RUNS/splits/TGT/fold_*.csv
    for f in (tmp_path / "r0" / "splits" / "TGT").glob("fold_*.csv"):
        shutil.copy(f, split_dir / f.name)
    exp = Experiment(data, tmp_path / "r1", tiny_cfg)
    with pytest.raises(ConfigError, match="own splits"):
        exp.workspace.splits("TGT", repeat=1)
