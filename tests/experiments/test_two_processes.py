"""Issue 19, item 3: two `steph cv` on one runs folder (the README's advice for several GPUs)
share the work: a run one process trains is waited for by the other and read, not failed; both
exit 0 with the results one process gets."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import tiny_experiment_config

RUNS = ["TGT/abmil/fold0", "TGT/abmil/fold1", "RELA/abmil/fold0", "UNRB/abmil/fold0",
        "TGT/steph/fold0", "TGT/steph/fold1"]


def test_two_processes_on_one_runs_folder_both_finish(tiny_data, tiny_grid, tmp_path):
    cfg = tiny_experiment_config(threads=1).to_dict()  # tiny_grid's settings, one thread each
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({k: cfg[k] for k in ("data", "model", "train", "steph")}))
    runs = tmp_path / "runs"
    argv = [sys.executable, "-m", "steph", "cv", "--data", str(tiny_data), "--out", str(runs),
            "--methods", "abmil,steph", "--targets", "TGT", "--folds", "0,1", "--config",
            str(config), "--quiet"]
    # leases renewed every 0.2 s: a live holder is recognised long before a tiny run ends (as
    # it is with the default 10 s in runs of real size)
    env = {**os.environ, "STEPH_LEASE_HEARTBEAT": "0.2", "STEPH_LEASE_STALE_AFTER": "30"}
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert "failed" not in err and "not run" not in err
    # every run trained once, by one of the two
    logs = outs[0][1] + outs[1][1]
    for run in RUNS:
        assert logs.count(f"{run}: test C-index") == 1, run
    # the two printed the same table, of the same results as one process
    tables = [[line for line in out.splitlines() if line.startswith("|")] for out, _ in outs]
    assert tables[0] == tables[1]
    both = pd.read_csv(runs / "summary.csv").set_index(["method", "fold"])
    one = pd.read_csv(tiny_grid / "summary.csv").set_index(["method", "fold"])
    for key in both.index:
        assert np.isclose(both.loc[key, "c_index"], one.loc[key, "c_index"], atol=1e-6), key
    assert not list(runs.rglob(".*.lock"))
