"""Every MIL network as a cancer-specific method, and the transfer methods over any of them
(``model.arch``), end to end on the tiny cohorts: one theta_0 per architecture, Patch-GCN's graphs
cached next to the runs and following sampled patches, evaluation of networks that cannot be
split recorded in metrics.json, artefacts that ``steph predict`` rebuilds."""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from steph.cli import main
from steph.config import ModelConfig, build_config, load_config
from steph.errors import ConfigError, RunError
from steph.experiments.cv import Experiment, run_cv
from steph.experiments.workspace import ensure_theta0, load_theta0
from steph.runs import RunDir, RunRef, RunsFolder
from steph.inference import load_artefact, predict_patients
from steph.utils.io import load_tensors

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import TINY_NETWORKS, tiny_experiment_config



def net_config(arch="abmil", data=None, **train):
    """The tiny experiment config with small networks, ``arch`` as backbone, one thread (tiny
    tensors: thread wake-ups would dominate on a busy machine)."""
    d = tiny_experiment_config(threads=1, **train).to_dict()
    d["model"].update(arch=arch, options=TINY_NETWORKS)
    d["data"].update(data or {})
    return build_config(d)


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def metrics(out, cohort, method, fold=0):
    return json.loads((RunRef(cohort, method, fold).path(out) / "metrics.json").read_text())


def test_plan_and_pool_follow_model_arch(tiny_data, tmp_path):
    exp = Experiment(tiny_data, tmp_path, net_config("transmil"))
    assert exp.plan(["steph"], ["TGT"], [1]) == [
        RunRef("TGT", "transmil", 1), RunRef("RELA", "transmil", 0), RunRef("UNRB", "transmil", 0),
        RunRef("TGT", "steph", 1)]
    # cancer-specific runs first, whatever the network; ABMIL is not a prerequisite here
    jobs = exp.plan(["adamerging", "abmil"], ["TGT"], [0])
    assert [j.method for j in jobs] == ["transmil", "transmil", "transmil", "abmil", "adamerging"]
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        Experiment(tiny_data, tmp_path, build_config({"model": {"arch": "nope"}}))


def test_one_theta0_per_architecture(tmp_path):
    cfg = net_config()
    a = ensure_theta0(RunsFolder(tmp_path), cfg.model, 16, 32)
    t = ensure_theta0(RunsFolder(tmp_path), cfg.model, 16, 32, "transmil")
    assert a.name == "theta0.safetensors" and t.name == "theta0-transmil.safetensors"
    theta, meta = load_theta0(RunsFolder(tmp_path), "transmil")
    assert meta["model"] == "transmil" and meta["hparams"]["dim"] == 16
    assert set(theta) == set(load_tensors(t)) and "cls_token" in theta
    assert load_theta0(RunsFolder(tmp_path))[1]["model"] == "abmil"
    other = ModelConfig.model_validate(
        {**cfg.model.model_dump(),
         "options": {**cfg.model.options.model_dump(), "transmil": {"dim": 32, "heads": 2}}})
    with pytest.raises(RunError, match="every transmil model"):
        ensure_theta0(RunsFolder(tmp_path), other, 16, 32, "transmil")
    ensure_theta0(RunsFolder(tmp_path), other, 16, 32)  # ABMIL's is not concerned
    with pytest.raises(ConfigError, match="unknown key 'model.options.ilra.dimm'"):
        build_config({"model": {"options": {"ilra": {"dimm": 3}}}})  # typed: refused at once


def test_configs_written_before_model_arch_still_match(tmp_path):
    cfg = load_config(None, {"model.name": "abmil"})  # the old key is read as arch
    assert cfg.model.arch == "abmil"
    settings = {"run": {"cohort": "X"}, **{k: cfg.to_dict()[k] for k in ("data", "model")}}
    old = json.loads(json.dumps(settings))  # a version-1 record: no format, the old keys
    old["model"] = {"name": "abmil", "hidden_dim": 512, "attn_dim": 384, "dropout": 0.25,
                    "init_seed": 0, "options": {}}
    del old["data"]["eval_max_instances"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    RunDir(tmp_path).check_or_write_settings(settings)  # the same run
    changed = json.loads(json.dumps(settings))
    changed["model"]["arch"] = "transmil"
    with pytest.raises(RunError, match="model.arch"):
        RunDir(tmp_path).check_or_write_settings(changed)


def test_patch_gcn_and_steph_over_patch_gcn(tiny_data, tmp_path, capsys):
    """Graphs built once into RUNS/graphs/<cohort>, STEPH merging Patch-GCN models trained from
    their shared theta_0, and its artefact predicting new patients from their feature files."""
    out = tmp_path / "runs"
    summary = run_cv(tiny_data, out, ["patch_gcn", "steph"], targets=["TGT"], folds="0",
                     cfg=net_config("patch_gcn"), progress=False)
    assert set(summary["method"]) >= {"patch_gcn", "steph"}
    assert (out / "theta0-patch_gcn.safetensors").exists()
    assert not (out / "theta0.safetensors").exists()  # no ABMIL was needed
    for cohort in ("TGT", "RELA", "UNRB"):  # the pool: patch_gcn runs
        assert metrics(out, cohort, "patch_gcn")["eval_policy"] == "exact"
        assert len(list((out / "graphs" / cohort).glob("*.safetensors"))) > 0
    m = metrics(out, "TGT", "steph")
    assert m["eval_policy"] == "exact" and m["eval_sampled_bags"] == 0
    model, manifest = load_artefact(RunRef("TGT", "steph", 0).path(out))
    assert manifest["kind"] == "steph" and manifest["settings"]["arch"] == "patch_gcn"
    assert model.bag_inputs == ("edge_index",)
    # theta_0 inside the artefact is the runs folder's Patch-GCN theta_0 (encoder tensors)
    theta0, _ = load_theta0(RunsFolder(out), "patch_gcn")
    torch.testing.assert_close(model.theta0_flat, model.layout.flatten(theta0))
    # steph predict: graphs from the feature files' coords; the same risks as the run's
    cohort = Experiment(tiny_data, out, net_config("patch_gcn")).workspace.cohort("TGT")
    pred = pd.read_csv(RunRef("TGT", "steph", 0).path(out) / "predictions.csv")
    test = pred[pred["split"] == "test"]
    patients = [(pid, cohort.slide_paths(pid)) for pid in test["patient_id"]]
    assert any(len(files) > 1 for _, files in patients)  # a disjoint union of slide graphs
    got = predict_patients(RunRef("TGT", "steph", 0).path(out), patients)
    np.testing.assert_allclose(got["risk"].to_numpy(), test["risk"].to_numpy(), rtol=1e-5)
    got = predict_patients(RunRef("TGT", "patch_gcn", 0).path(out), patients)
    assert got["risk"].notna().all()
    # steph explain builds the bag's graph too
    main(["explain", "--model", str(RunRef("TGT", "steph", 0).path(out)),
          *map(str, patients[0][1])])
    assert "selected sources" in capsys.readouterr().out


def test_transmil_and_steph_record_sampled_evaluation(tiny_data, tmp_path, caplog):
    """TransMIL cannot be computed in pieces: with data.eval_max_instances its large test bags
    are evaluated on a sample, and metrics.json says so."""
    out = tmp_path / "runs"
    limit = 25
    run_cv(tiny_data, out, ["transmil", "steph"], targets=["TGT"], folds="0",
           cfg=net_config("transmil", data={"eval_max_instances": limit}), progress=False)
    exp = Experiment(tiny_data, out, net_config("transmil"))
    cohort, split = exp.workspace.cohort("TGT"), exp.workspace.split("TGT", 0)
    sizes = cohort.patients.set_index("patient_id")["n_patches"]
    big = int((sizes.loc[list(split.test_ids)] > limit).sum())
    assert big > 0
    for method in ("transmil", "steph"):
        m = metrics(out, "TGT", method)
        assert m["eval_policy"] == f"patches sampled above {limit} per bag"
        assert m["eval_sampled_bags"] == big
        assert m["train_eval_sampled_bags"] == int((sizes.loc[list(split.train_ids)] > limit).sum())
    assert "evaluated on a sample of their patches" in caplog.text
    assert load_artefact(RunRef("TGT", "steph", 0).path(out))[0].network.__class__.__name__ == "TransMIL"


def test_adamerging_over_ilra_and_patch_sampling_of_graphs(tiny_data, tmp_path):
    out = tmp_path / "runs"
    run_cv(tiny_data, out, ["adamerging"], targets=["TGT"], folds="0",
           cfg=net_config("ilra"), progress=False)
    model, manifest = load_artefact(RunRef("TGT", "adamerging", 0).path(out))
    assert manifest["kind"] == "ilra" and type(model).__name__ == "ILRA"
    assert metrics(out, "TGT", "adamerging")["eval_policy"] == "exact"
    # Patch-GCN trained on sampled bags: the graphs of the sampled bags are cached too
    out2 = tmp_path / "runs2"
    run_cv(tiny_data, out2, ["patch_gcn"], targets=["TGT"], folds="0",
           cfg=net_config("patch_gcn", data={"max_instances": 10}), progress=False)
    assert list((out2 / "graphs" / "TGT").glob("*-s*.safetensors"))
    assert metrics(out2, "TGT", "patch_gcn")["eval_sampled_bags"] == 0  # evaluation: whole
