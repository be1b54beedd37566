"""Executors without Ray: the local executor's failure handling (a run that fails fails only
the runs that need it), runs held by a live process elsewhere, the CLI's executor options."""

import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from steph.errors import ConfigError
from steph.experiments.cv import Experiment, run_cv
from steph.experiments.executors import (
    GridError,
    LocalExecutor,
    RayExecutor,
    make_executor,
    parse_memory,
)
from steph.experiments.leases import RunLock
from steph.runs import RunDir, RunRef

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import tiny_experiment_config
from test_cli import run as cli  # (args, capsys) -> exit code, stdout, stderr


def broken_data(tiny_data, tmp_path):
    """A copy of the tiny data whose source cohort RELA has a feature file that fails only when
    its values are read (a compressed chunk that does not inflate; its shape reads fine, so the
    check before training passes it and the run fails while training)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    bad = min((data / "RELA" / "features").glob("*.h5"))
    corrupt_values(bad)
    return data, bad


def corrupt_values(path):
    """Rewrite an HDF5 feature file gzip-compressed, then overwrite its data chunk."""
    import h5py

    with h5py.File(path, "r") as f:
        values = f["features"][()]
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=values, chunks=values.shape, compression="gzip")
    with h5py.File(path, "r") as f:
        chunk = f["features"].id.get_chunk_info(0)
    raw = bytearray(path.read_bytes())
    raw[chunk.byte_offset:chunk.byte_offset + chunk.size] = b"\xab" * chunk.size
    path.write_bytes(bytes(raw))


def tiny_config_file(tmp_path):
    cfg = tiny_experiment_config(epochs=1, threads=1).to_dict()
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({k: cfg[k] for k in ("model", "train", "steph")}))
    return path


def check_failure_report(code, out, err, runs, bad_file):
    """What `steph cv` says when RELA's data are broken: only RELA's run and the transfer run
    that needs it fail; the rest finish and are summarised."""
    assert code == 1
    assert "2 of 4 run(s) failed" in err
    lines = err.splitlines()
    rela = next(line for line in lines if line.strip().startswith("RELA/abmil/fold0:"))
    assert bad_file.name in rela  # the one-line error names the file at fault
    steph = next(line for line in lines if line.strip().startswith("TGT/steph/fold0:"))
    assert "not run: needs RELA/abmil/fold0, which failed" in steph
    assert not any(line.strip().startswith(("TGT/abmil", "UNRB/abmil")) for line in lines)
    assert "Traceback" not in err
    for ok in ["TGT/abmil/fold0", "UNRB/abmil/fold0"]:
        assert (runs / ok / "metrics.json").exists(), ok
    assert not (runs / "TGT/steph/fold0").exists()
    summary = pd.read_csv(runs / "summary.csv")
    assert set(summary["method"]) == {"abmil", "oracle"}  # the summary of what finished
    assert "| abmil |" in out  # and its table is printed before the list of failures
    assert not list(runs.rglob(".*.lock"))


def test_local_bad_input_fails_only_its_dependants(tiny_data, tmp_path, capsys):
    data, bad = broken_data(tiny_data, tmp_path)
    runs = tmp_path / "runs"
    code, out, err = cli(["cv", "--data", str(data), "--out", str(runs), "--methods", "abmil,steph",
                          "--targets", "TGT", "--folds", "0", "--config",
                          str(tiny_config_file(tmp_path)), "--quiet"], capsys)
    check_failure_report(code, out, err, runs, bad)


def test_a_run_held_by_a_live_process_is_waited_for_and_read(tiny_data, tmp_path, caplog):
    """The local executor goes on with the runs whose prerequisites are ready, comes back to a
    run another process holds and waits for it up to wait_for_held seconds: past that, that run
    and the runs that need it fail with the holder's name (the others finish); when the holder
    finishes it in time, its results are read, not trained again."""
    cfg = tiny_experiment_config(epochs=1)
    exp = Experiment(tiny_data, tmp_path, cfg, progress=False)
    jobs = exp.plan(["steph"], ["TGT"], [0])
    held = RunRef("RELA", "abmil", 0)
    other = RunLock(RunDir(held.path(tmp_path)).lease, heartbeat=0.05, stale_after=1.0)
    assert other.acquire()
    caplog.set_level("INFO", logger="steph.experiments")
    lease = {"heartbeat": 0.05, "stale_after": 10.0}
    trained = []

    def holder():  # "another process": trains the run it holds, then lets it go
        deadline = time.monotonic() + 120  # once the third grid below has found it held
        while (caplog.text.count("RELA/abmil/fold0 is held by") < 3
               and time.monotonic() < deadline):
            time.sleep(0.05)
        trained.append(Experiment(tiny_data, tmp_path, cfg, progress=False).run(held))
        other.release()

    thread = threading.Thread(target=holder)
    try:
        ex = LocalExecutor(lease=lease, wait_for_held=1.0, poll=0.1)
        outcome = ex.run(exp, jobs)
        with pytest.raises(GridError, match="RELA/abmil/fold0: held by process"):
            exp.run_all(jobs, ex)  # the same through run_all (used by `steph train`)
        assert set(outcome.failed) == {held, RunRef("TGT", "steph", 0)}
        holder_is = (f"held by process {os.getpid()} on host {socket.gethostname()}, whose "
                     "lease is alive")
        assert outcome.failed[held].startswith(holder_is)
        assert "waited 1 s for it (--wait-for-held)" in outcome.failed[held]
        assert "not run: needs RELA/abmil/fold0" in outcome.failed[RunRef("TGT", "steph", 0)]
        assert set(outcome.metrics) == {RunRef("TGT", "abmil", 0), RunRef("UNRB", "abmil", 0)}
        # the runs after the held one went on first; a message named the run and its holder
        assert f"RELA/abmil/fold0 is held by process {os.getpid()}" in caplog.text
        assert "going on with the other runs" in caplog.text
        assert "waiting for 1 run(s)" in caplog.text
        # now the holder finishes the run while this process waits for it: read, not retrained
        thread.start()
        outcome = LocalExecutor(lease=lease, wait_for_held=120, poll=0.1).run(exp, jobs)
    finally:
        if thread.is_alive() or thread.ident is not None:
            thread.join()
        other.release()
    assert not outcome.failed
    assert outcome.metrics[held] == trained[0]  # read from its run directory
    assert "RELA/abmil/fold0: finished by the process that held it" in caplog.text
    assert caplog.text.count("RELA/abmil/fold0: test C-index") == 1  # trained once
    assert outcome.metrics[RunRef("TGT", "steph", 0)]["method"] == "steph"


def test_run_cv_raises_after_writing_the_summary(tiny_data, tmp_path):
    data, _ = broken_data(tiny_data, tmp_path)
    with pytest.raises(GridError) as exc:
        run_cv(data, tmp_path / "runs", ["abmil"], targets=["TGT", "RELA"], folds="0",
               cfg=tiny_experiment_config(epochs=1), progress=False, executor=LocalExecutor())
    assert list(exc.value.failed) == [RunRef("RELA", "abmil", 0)]
    assert list(exc.value.summary["cohort"].unique()) == ["TGT"]
    assert (tmp_path / "runs" / "summary.csv").exists()


def test_executor_choice_and_options():
    assert isinstance(make_executor("local"), LocalExecutor)
    assert isinstance(make_executor("ray"), RayExecutor)
    ex = LocalExecutor()
    assert make_executor(ex) is ex
    with pytest.raises(ConfigError, match="unknown executor"):
        make_executor("slurm")
    assert parse_memory("8G") == 8 * 2**30 and parse_memory("512MiB") == 512 * 2**20
    assert parse_memory(1000) == 1000 and parse_memory(None) is None
    for bad in ["lots", "0", "-1G"]:
        with pytest.raises(ConfigError):
            parse_memory(bad)
    with pytest.raises(ConfigError):
        RayExecutor(cpus_per_run=0)
def test_runs_use_the_cpus_they_get(tiny_data, tmp_path):
    def threads(cpus, **train):
        exp = Experiment(tiny_data, tmp_path, tiny_experiment_config(**train), progress=False)
        exp.use_threads(cpus)
        return exp.cfg.train.threads

    assert threads(2.5) == 2 and threads(0.5) == 1 and threads(None) is None
    assert threads(1, threads=3) == 3  # an explicit train.threads wins


def test_ray_only_options_are_refused_with_the_local_executor(tiny_data, tmp_path, capsys):
    code, _, err = cli(["cv", "--data", str(tiny_data), "--out", str(tmp_path), "--gpus-per-run",
                        "0.25", "--address", "auto"], capsys)
    assert code == 1 and "--address, --gpus-per-run: only with --executor ray" in err
    code, _, err = cli(["cv", "--data", str(tiny_data), "--out", str(tmp_path), "--executor",
                        "dask"], capsys)
    assert code == 2 and "dask" in err


class _FakeRay:
    """Records the task graph RayExecutor builds (no Ray needed): each submitted task's job and
    the refs it depends on; every task succeeds at once."""

    class exceptions:  # stands for the ray.exceptions module
        class RayTaskError(Exception):
            pass

    def __init__(self):
        self.submitted = {}  # ref -> (job, dependency refs, options)

    def remote(self, fn):
        fake = self

        class Task:
            def options(self, **opts):
                self.opts = opts
                return self

            def remote(self, factory, spec, faults, job, token, *deps):
                ref = f"ref-{len(fake.submitted)}"
                fake.submitted[ref] = (job, deps, self.opts)
                return ref

        return Task()

    def wait(self, refs, num_returns):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        return {"job": str(self.submitted[ref][0])}


def test_each_run_depends_on_its_own_prerequisites_only(tiny_data, tmp_path):
    """No barrier between the ABMIL runs and the transfer runs: a transfer task's
    dependencies are the tasks of exactly the runs Experiment.prerequisites names."""
    from steph.experiments.executors import GridOutcome, GridProgress

    exp = Experiment(tiny_data, tmp_path, tiny_experiment_config(), progress=False)
    jobs = exp.plan(["steph"], ["TGT", "RELA"], [0, 1])
    fake = _FakeRay()
    outcome = GridOutcome()
    RayExecutor(cpus_per_run=2, gpus_per_run=0.25, memory_per_run="1G", retries=3) \
        ._submit_and_wait(fake, exp, jobs, outcome, GridProgress(len(jobs), 0, False))
    ref_of = {job: ref for ref, (job, _, _) in fake.submitted.items()}
    assert set(ref_of) == set(jobs) and not outcome.failed
    for job, deps, opts in fake.submitted.values():
        assert set(deps) == {ref_of[p] for p in exp.prerequisites(job)}, job
        assert opts["num_cpus"] == 2 and opts["num_gpus"] == 0.25
        assert opts["memory"] == 2**30 and opts["max_retries"] == 3
        assert opts["retry_exceptions"] is False and opts["name"] == str(job)
    assert len(fake.submitted[ref_of[RunRef("RELA", "steph", 1)]][1]) == 3  # not all 6 ABMIL runs
    assert outcome.metrics[RunRef("TGT", "steph", 1)] == {"job": "TGT/steph/fold1"}


def test_grid_error_names_each_distinct_error_once():
    from steph.experiments.executors import GridError

    full = "cannot write RUNS/theta0.safetensors: No space left on device (errno 28)"
    failed = {RunRef("TGT", m, k): full for m in ("abmil", "steph") for k in (0, 1)}
    failed[RunRef("RELA", "abmil", 0)] = "RELA/labels.csv: not found"
    text = str(GridError(failed, 6))
    assert text.splitlines() == [
        "5 of 6 run(s) failed:",
        f"  TGT/abmil/fold0, TGT/abmil/fold1, TGT/steph/fold0 and 1 more: {full}",
        "  RELA/abmil/fold0: RELA/labels.csv: not found"]
