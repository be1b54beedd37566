"""End to end: the representation-transfer rows through ``run_cv`` on the tiny fixture, their
served artefacts, the cache on resume, and that no test patient's label reaches a choice or a
training."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from steph.data.cohort import Cohort
from steph.experiments.cv import Experiment, run_cv
from steph.experiments.workspace import load_theta0
from steph.runs import RunDir, RunRef, RunsFolder
from steph.inference import predict_patients
from steph.methods import get_method
from steph.transfer import CACHE_FILE
from steph.utils.io import load_tensors

METHODS = ["roupkt", "zero_shot", "linear_probe", "fusion_mean"]
KINDS = {"roupkt": "roupkt", "zero_shot": "abmil", "linear_probe": "expert_readout",
         "fusion_mean": "expert_readout"}
ENCODERS = {"roupkt": 4, "zero_shot": 1, "linear_probe": 1, "fusion_mean": 3}  # E = 3 here


@pytest.fixture(scope="module")
def world(tiny_data, tmp_path_factory):
    """A private copy of the tiny data (its labels get permuted below) and the four rows run
    on TGT fold 0 (sources RELA, UNRB)."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from conftest import tiny_experiment_config

    base = tmp_path_factory.mktemp("transfer")
    data = base / "data"
    shutil.copytree(tiny_data, data)
    runs = base / "runs"
    cfg = tiny_experiment_config()
    summary = run_cv(data, runs, methods=METHODS, targets=["TGT"], folds=[0], cfg=cfg,
                     progress=False)
    return {"data": data, "runs": runs, "cfg": cfg, "summary": summary}


def _metrics(runs, method):
    return json.loads((RunRef("TGT", method, 0).path(runs) / "metrics.json").read_text())


def test_every_row_end_to_end(world):
    runs, summary = world["runs"], world["summary"]
    for name in METHODS:
        rows = summary[(summary["method"] == name) & (summary["cohort"] == "TGT")]
        assert len(rows) == 1 and math.isfinite(float(rows["c_index"].iloc[0])), name
        path = RunRef("TGT", name, 0).path(runs)
        assert (path / CACHE_FILE).exists(), name
        assert json.loads((path / "model.json").read_text())["kind"] == KINDS[name]
    m = _metrics(runs, "roupkt")
    assert m["epochs"] == 2 and m["experts"] == ["TGT", "RELA", "UNRB"]
    p = m["router_p_last_epoch"]
    assert set(p) == {"TGT", "RELA", "UNRB"} and abs(sum(p.values()) - 1) < 1e-5
    log = [json.loads(line) for line in (RunRef("TGT", "roupkt", 0).path(runs) / "log.jsonl")
           .read_text().splitlines()]
    assert all(len(r["mean_p"]) == 3 and r["train_aux_loss"] > 0 for r in log)

    z = _metrics(runs, "zero_shot")
    assert z["epochs"] == 0 and set(z["source_test_c_index"]) == {"RELA", "UNRB"}
    train_c = z["source_train_c_index"]
    assert z["zero_shot_source"] == max(train_c, key=lambda k: (train_c[k], k == "RELA"))
    # the chosen source, applied as it is, has the training C-index it was chosen by
    assert z["train_c_index"] == pytest.approx(train_c[z["zero_shot_source"]], abs=1e-9)
    assert z["c_index"] == pytest.approx(z["source_test_c_index"][z["zero_shot_source"]],
                                         abs=1e-9)
    lp = _metrics(runs, "linear_probe")
    assert lp["probe_selection"] == "inner_cv" and lp["probe_source"] in lp["probe_scores"]


def test_artefacts_reproduce_the_runs_risks(world):
    cohort = Cohort.load(world["data"] / "TGT")
    for name in METHODS:
        path = RunRef("TGT", name, 0).path(world["runs"])
        preds = pd.read_csv(path / RunDir.PREDICTIONS, dtype={"patient_id": str})
        test = preds[preds["split"] == "test"].set_index("patient_id")
        table = predict_patients(path, [(pid, cohort.slide_paths(pid)) for pid in test.index])
        assert table.attrs["encoders_per_bag"] == ENCODERS[name], name
        np.testing.assert_allclose(table.set_index("patient_id").loc[test.index, "risk"],
                                   test["risk"], rtol=1e-5, atol=1e-6, err_msg=name)


def test_served_roupkt_in_a_fresh_process_without_the_runs(world, tmp_path):
    """The artefact alone (copied out, the runs directory moved away) predicts the risks the
    training-time module gave, with `steph predict` in another process."""
    runs, data = world["runs"], world["data"]
    path = RunRef("TGT", "roupkt", 0).path(runs)
    served = tmp_path / "served"
    served.mkdir()
    for f in ("model.safetensors", "model.json"):
        shutil.copy(path / f, served / f)
    preds = pd.read_csv(path / RunDir.PREDICTIONS, dtype={"patient_id": str})
    hidden = runs.with_name("runs-hidden")
    runs.rename(hidden)
    try:
        out = tmp_path / "pred.csv"
        res = subprocess.run(
            [sys.executable, "-m", "steph", "predict", "--model", str(served), "--labels",
             str(data / "TGT" / "labels.csv"), "--features", str(data / "TGT" / "features"),
             "--out", str(out)], capture_output=True, text=True, timeout=300, check=False)
    finally:
        hidden.rename(runs)
    assert res.returncode == 0, res.stderr
    assert "ran 4 MIL encoders per bag" in res.stdout
    table = pd.read_csv(out, dtype={"patient_id": str}).set_index("patient_id")
    both = preds.set_index("patient_id")
    assert len(table) == 30
    np.testing.assert_allclose(table.loc[both.index, "risk"], both["risk"], rtol=1e-5, atol=1e-6)


def test_resume_reuses_the_cache(world):
    """An unfinished run (metrics.json gone) trains again from the same cached embeddings, to
    the same weights."""
    path = RunRef("TGT", "roupkt", 0).path(world["runs"])
    cache = path / CACHE_FILE
    stamp = cache.stat().st_mtime_ns
    weights = load_tensors(path / "model.safetensors")
    (path / "metrics.json").unlink()
    run_cv(world["data"], world["runs"], methods=["roupkt"], targets=["TGT"], folds=[0],
           cfg=world["cfg"], progress=False)
    assert cache.stat().st_mtime_ns == stamp  # read, not written again
    again = load_tensors(path / "model.safetensors")
    assert all(np.array_equal(weights[k].numpy(), again[k].numpy()) for k in weights)


class LabelFree:
    """A test set whose labels cannot be read: only its patients and cohort are there."""

    def __init__(self, dataset):
        self.patient_ids, self.cohort = dataset.patient_ids, dataset.cohort

    def __getattr__(self, name):
        raise AssertionError(f"a build read the test set's {name!r}")

    def __getitem__(self, i):
        raise AssertionError("a build read a test item")

    def __len__(self):
        return len(self.patient_ids)


def test_building_never_reads_a_test_label(world):
    exp = Experiment(world["data"], world["runs"], world["cfg"], progress=False)
    for name in METHODS:
        job = RunRef("TGT", name, 0)
        cohort, split = exp.workspace.cohort("TGT"), exp.workspace.split("TGT", 0)
        bins = exp.workspace.bins_for(cohort, split)
        train, test = exp.workspace.datasets(cohort, split, bins)
        theta0, meta = load_theta0(RunsFolder(exp.runs_root))
        ctx = exp.runner.context(job, world["cfg"], cohort, bins, theta0, meta, train,
                                 LabelFree(test), job.path(world["runs"]),
                                 pool=lambda j=job: exp.workspace.pool(j))
        built = get_method(name).build(ctx)  # the choices and the cache: no test label read
        assert built.module is not None


def _permute_test_labels(data, test_ids, seed=0):
    """Shuffle (time, event) among the test patients in TGT's label table (every slide row)."""
    path = data / "TGT" / "labels.csv"
    table = pd.read_csv(path, dtype={"patient_id": str, "slide_id": str})
    per = table.drop_duplicates("patient_id").set_index("patient_id")[["time", "event"]]
    ids = list(test_ids)
    shuffled = per.loc[ids].sample(frac=1.0, random_state=seed)
    assert not (shuffled.to_numpy() == per.loc[ids].to_numpy()).all()
    new = dict(zip(ids, map(tuple, shuffled.to_numpy())))
    for col, j in (("time", 0), ("event", 1)):
        table[col] = [new[p][j] if p in new else v for p, v in zip(table["patient_id"], table[col])]
    table.to_csv(path, index=False)


def test_permuted_test_labels_change_nothing_but_the_scores(world):
    """Shuffle the test patients' labels and run the four rows again (the prerequisite models
    stay; they only ever saw training patients): the chosen sources, every trained weight and
    every prediction are the same."""
    runs, data = world["runs"], world["data"]
    before = {}
    for name in METHODS:
        path = RunRef("TGT", name, 0).path(runs)
        before[name] = (_metrics(runs, name), load_tensors(path / "model.safetensors"),
                        pd.read_csv(path / RunDir.PREDICTIONS, dtype={"patient_id": str}))
    test_ids = before["roupkt"][2].query("split == 'test'")["patient_id"]
    _permute_test_labels(data, test_ids)
    for name in METHODS:
        shutil.rmtree(RunRef("TGT", name, 0).path(runs))
    run_cv(data, runs, methods=METHODS, targets=["TGT"], folds=[0], cfg=world["cfg"],
           progress=False)
    for name in METHODS:
        m0, w0, p0 = before[name]
        path = RunRef("TGT", name, 0).path(runs)
        m1, w1 = _metrics(runs, name), load_tensors(path / "model.safetensors")
        p1 = pd.read_csv(path / RunDir.PREDICTIONS, dtype={"patient_id": str})
        assert set(w0) == set(w1) and all(np.array_equal(w0[k].numpy(), w1[k].numpy())
                                          for k in w0), name
        np.testing.assert_array_equal(p0["risk"], p1["risk"])
        for key in ("zero_shot_source", "source_train_c_index", "probe_source", "probe_scores",
                    "train_c_index"):
            assert m0.get(key) == m1.get(key), (name, key)
        test0, test1 = p0[p0["split"] == "test"], p1[p1["split"] == "test"]
        assert not np.array_equal(test0[["time", "event"]].to_numpy(),
                                  test1[["time", "event"]].to_numpy())  # the labels did change
