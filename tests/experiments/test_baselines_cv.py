"""End to end: every model-merging baseline through ``run_cv`` on the tiny synthetic fixture, then
its saved artefact through ``steph.inference.predict_patients``."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from steph.data.cohort import Cohort
from steph.experiments.cv import run_cv
from steph.runs import RunDir, RunRef
from steph.inference import predict_patients

BASELINES = ["model_avg", "task_arithmetic", "adamerging", "ties_am", "isoc_am", "isocts_am",
             "surgery_am"]
KINDS = {"surgery_am": "mil_surgery"}


def test_every_baseline_end_to_end(tiny_data, tiny_cfg, tmp_path):
    runs = tmp_path / "runs"
    summary = run_cv(tiny_data, runs, methods=BASELINES, targets=["TGT"], folds=[0], cfg=tiny_cfg,
                     progress=False)
    _check_summary(runs, summary)
    _check_artefacts(runs, tiny_data)


def _check_summary(runs, summary):
    """Every method has a summary row with a finite C-index; the trained ones log coefficients."""
    for name in BASELINES:
        rows = summary[(summary["method"] == name) & (summary["cohort"] == "TGT")]
        assert len(rows) == 1, name
        assert math.isfinite(float(rows["c_index"].iloc[0])), name
    trained = {"adamerging", "ties_am", "isoc_am", "isocts_am", "surgery_am"}
    for name in BASELINES:
        metrics = json.loads((RunRef("TGT", name, 0).path(runs) / "metrics.json").read_text())
        assert metrics["epochs"] == (2 if name in trained else 0), name
        log = RunRef("TGT", name, 0).path(runs) / "log.jsonl"
        if name in trained:  # the coefficients (target + 2 sources) are logged every epoch
            rows = [json.loads(line) for line in log.read_text().splitlines()]
            assert len(rows) == 2 and all(len(r["mean_coef"]) == 3 for r in rows)
        else:
            assert not log.exists()


def _check_artefacts(runs, tiny_data):
    """Every artefact predicts through predict_patients, reproducing the run's test risks."""
    cohort = Cohort.load(tiny_data / "TGT")
    for name in BASELINES:
        path = RunRef("TGT", name, 0).path(runs)
        manifest = json.loads((path / "model.json").read_text())
        assert manifest["kind"] == KINDS.get(name, "abmil"), name
        preds = pd.read_csv(path / RunDir.PREDICTIONS, dtype={"patient_id": str})
        test = preds[preds["split"] == "test"].set_index("patient_id")
        patients = [(pid, cohort.slide_paths(pid)) for pid in test.index]
        table = predict_patients(path, patients).set_index("patient_id")
        assert np.isfinite(table["risk"]).all(), name
        # the artefact alone reproduces the risks the run evaluated
        np.testing.assert_allclose(table.loc[test.index, "risk"], test["risk"], rtol=1e-4,
                                   atol=1e-5, err_msg=name)
