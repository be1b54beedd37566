"""A cross-validation grid gives the same bytes with bags read in the main process or by two
worker processes; the device is a performance setting, recorded in run.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from steph.experiments.cv import run_cv
from steph.runs import RunRef

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import tiny_experiment_config


def _cfg(workers, device="cpu"):
    cfg = tiny_experiment_config(device=device)
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"workers": workers})})


def test_zero_or_two_workers_write_the_same_results(tiny_data, tmp_path):
    outs = {}
    for workers in (0, 2):
        outs[workers] = tmp_path / f"w{workers}"
        run_cv(tiny_data, outs[workers], ["abmil", "steph"], targets=["TGT"], folds="0",
               sources=["RELA"], cfg=_cfg(workers), progress=False)
    files = sorted(p.relative_to(outs[0]) for p in outs[0].glob("*/*/fold0/*")
                   if p.name in ("metrics.json", "predictions.csv", "model.safetensors"))
    assert len(files) == 3 * 3
    for f in files:
        assert (outs[0] / f).read_bytes() == (outs[2] / f).read_bytes(), f
    record = json.loads((RunRef("TGT", "steph", 0).path(outs[2]) / "run.json").read_text())
    assert record["device"] == "cpu" and record["epoch_devices"] == ["cpu", "cpu"]
    log = (RunRef("TGT", "steph", 0).path(outs[2]) / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["device"] for line in log] == ["cpu", "cpu"]

    # device and workers are not part of a run's identity: nothing is redone
    stamp = {p: p.stat().st_mtime_ns for p in outs[0].glob("*/*/fold0/metrics.json")}
    run_cv(tiny_data, outs[0], ["abmil", "steph"], targets=["TGT"], folds="0",
           sources=["RELA"], cfg=_cfg(1, device="auto"), progress=False)
    assert stamp == {p: p.stat().st_mtime_ns for p in outs[0].glob("*/*/fold0/metrics.json")}
