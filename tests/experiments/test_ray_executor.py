"""The grid as a Ray task graph, on one local Ray instance (2 CPUs) shared by this module:
the same results as the local executor, dependencies honoured, a killed worker retried from its
checkpoint, a run with bad input failing only the runs that need it, the start-up node check."""

import json
import logging
import sys
from datetime import datetime
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the Ray tests need the extra: pip install 'steph[ray]'")

from steph.errors import ConfigError
from steph.runs import RunRef
from steph.experiments.cv import Experiment, run_cv
from steph.experiments.executors import (
    CHECK_PREFIX,
    GridError,
    LocalExecutor,
    RayExecutor,
    check_nodes,
)

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import tiny_experiment_config
from test_executors import broken_data, check_failure_report, cli, tiny_config_file

GRID = {"methods": ["abmil", "steph"], "targets": ["TGT"], "folds": "0-1"}


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=100 * 2**20)
    yield
    ray.shutdown()


def grid_cfg():
    return tiny_experiment_config(threads=1)  # one thread under both executors: the same math


@pytest.fixture(scope="module")
def local_runs(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("local-runs")
    run_cv(tiny_data, out, cfg=grid_cfg(), progress=False, executor=LocalExecutor(cpus_per_run=1),
           **GRID)
    return out


@pytest.fixture(scope="module")
def ray_runs(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray-runs")
    run_cv(tiny_data, out, cfg=grid_cfg(), progress=False, executor=RayExecutor(cpus_per_run=1),
           **GRID)
    return out


def metrics_files(root):
    return {p.relative_to(root): p.read_bytes() for p in Path(root).glob("*/*/fold*/metrics.json")}


def test_ray_gives_the_same_metrics_as_local(local_runs, ray_runs):
    local, remote = metrics_files(local_runs), metrics_files(ray_runs)
    assert len(local) == 6  # TGT abmil x 2 folds, RELA + UNRB abmil fold 0, TGT steph x 2 folds
    assert remote.keys() == local.keys()
    for rel in local:
        assert remote[rel] == local[rel], rel
    assert (ray_runs / "summary.csv").read_bytes() == (local_runs / "summary.csv").read_bytes()
    record = json.loads((ray_runs / "TGT/steph/fold1/run.json").read_text())
    assert record["threads"] == 1 and record["resumed_after_epoch"] == 0
    assert not list(ray_runs.rglob(".*.lock")) and not list(ray_runs.glob(f"{CHECK_PREFIX}*"))


def test_every_transfer_run_started_after_its_prerequisites_finished(tiny_data, ray_runs):
    exp = Experiment(tiny_data, ray_runs, grid_cfg())

    def times(job):
        rec = json.loads((job.path(ray_runs) / "run.json").read_text())
        return datetime.fromisoformat(rec["started_at"]), datetime.fromisoformat(rec["finished_at"])

    transfer = [RunRef("TGT", "steph", k) for k in (0, 1)]
    for job in transfer:
        started, _ = times(job)
        prereqs = exp.prerequisites(job)
        assert len(prereqs) == 3
        for p in prereqs:
            assert times(p)[1] < started, f"{job} started before {p} finished"


def test_a_killed_worker_is_retried_and_resumes_from_its_checkpoint(tiny_data, local_runs,
                                                                    tmp_path, monkeypatch):
    """The first worker to finish an epoch is SIGKILLed (like a node that dies); Ray retries
    the task, the retry takes over the run's lease and resumes after epoch 1; the grid ends
    with the same metrics as the undisturbed run."""
    marker = tmp_path / "killed-once"
    monkeypatch.setenv("STEPH_FAULT", "train:epoch")
    monkeypatch.setenv("STEPH_FAULT_ONCE", str(marker))
    out = tmp_path / "runs"
    run_cv(tiny_data, out, ["abmil", "steph"], targets=["TGT"], folds="0", cfg=grid_cfg(),
           progress=False, executor=RayExecutor(cpus_per_run=1, retries=1))
    assert marker.exists()  # a worker did die
    resumed = {rel.parent: json.loads((out / rel.parent / "run.json").read_text())
               for rel in metrics_files(out)}
    killed = [rel for rel, rec in resumed.items() if rec["resumed_after_epoch"]]
    assert len(killed) == 1 and resumed[killed[0]]["resumed_after_epoch"] == 1
    log = (out / killed[0] / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [1, 2]
    reference = metrics_files(local_runs)
    got = metrics_files(out)
    assert len(got) == 4
    for rel, data in got.items():
        assert data == reference[rel], rel
    assert not list(out.rglob(".*.lock"))


def test_without_retries_a_killed_worker_fails_its_run(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("STEPH_FAULT", "train:epoch")
    monkeypatch.setenv("STEPH_FAULT_ONCE", str(tmp_path / "killed-once"))
    with pytest.raises(GridError) as exc:
        run_cv(tiny_data, tmp_path / "runs", ["abmil"], targets=["TGT"], folds="0",
               cfg=grid_cfg(), progress=False, executor=RayExecutor(retries=0))
    assert list(exc.value.failed) == [RunRef("TGT", "abmil", 0)]
    assert "given up after 0 retries" in exc.value.failed[RunRef("TGT", "abmil", 0)]


def test_bad_input_fails_only_its_dependants(tiny_data, tmp_path, capsys):
    """RELA's corrupt feature file fails RELA's model (found by the driver while it makes the
    splits) and the transfer run that needs it; the rest finish; exit status 1 and the list."""
    data, bad = broken_data(tiny_data, tmp_path)
    runs = tmp_path / "runs"
    code, out, err = cli(["cv", "--data", str(data), "--out", str(runs), "--methods", "abmil,steph",
                          "--targets", "TGT", "--folds", "0", "--config",
                          str(tiny_config_file(tmp_path)), "--executor", "ray", "--cpus-per-run",
                          "1", "--quiet"], capsys)
    check_failure_report(code, out, err, runs, bad)


def test_an_input_error_inside_a_task_is_not_retried(tiny_data, tmp_path):
    """A run started earlier with other settings fails in its task with steph's RunError: no
    retry (retrying cannot help), only the runs that need it fail."""
    runs = tmp_path / "runs"
    cfg = tiny_experiment_config(epochs=1)
    unrb = RunRef("UNRB", "abmil", 0).path(runs)
    unrb.mkdir(parents=True)
    (unrb / "config.yaml").write_text("run: {cohort: UNRB}\n")
    with pytest.raises(GridError) as exc:
        run_cv(tiny_data, runs, ["abmil", "steph"], targets=["TGT"], folds="0", cfg=cfg,
               progress=False, executor=RayExecutor(retries=2))
    failed = exc.value.failed
    assert list(failed) == [RunRef("UNRB", "abmil", 0), RunRef("TGT", "steph", 0)]
    assert failed[RunRef("UNRB", "abmil", 0)].startswith(f"{unrb} was started with other settings")
    assert failed[RunRef("TGT", "steph", 0)] == "not run: needs UNRB/abmil/fold0, which failed"
    assert "2 of 4 run(s) failed" in str(exc.value)
    assert (RunRef("RELA", "abmil", 0).path(runs) / "metrics.json").exists()


def test_the_node_check_names_a_node_that_does_not_see_the_paths(tiny_data, tmp_path):
    check_nodes(ray, tiny_data, tmp_path / "runs")  # the local node sees both
    assert not list((tmp_path / "runs").iterdir())  # and the check leaves nothing behind
    node = ray.nodes()[0]
    with pytest.raises(ConfigError) as exc:
        check_nodes(ray, tmp_path / "not-mounted", tmp_path / "runs")
    message = str(exc.value)
    assert node["NodeID"][:12] in message and node["NodeManagerAddress"] in message
    assert f"data root {tmp_path / 'not-mounted'} not found" in message


def test_resources_no_node_offers_are_refused_on_a_local_instance(caplog):
    """This CPU-only instance has no GPU: an error on a local instance (Ray would wait
    forever), a warning on a cluster (an autoscaler may add a GPU node)."""
    executor = RayExecutor(gpus_per_run=1)
    with pytest.raises(ConfigError, match="no node of the Ray cluster offers.*GPU 1"):
        executor._check_resources(ray, local=True)
    steph_log = logging.getLogger("steph")  # the CLI's logger does not propagate to root
    steph_log.addHandler(caplog.handler)
    try:
        executor._check_resources(ray, local=False)
    finally:
        steph_log.removeHandler(caplog.handler)
    assert "wait until such a node joins" in caplog.text
    RayExecutor(cpus_per_run=2)._check_resources(ray, local=True)  # fits
    with pytest.raises(ConfigError):
        RayExecutor(cpus_per_run=3)._check_resources(ray, local=True)


def test_no_cluster_at_the_address_is_a_clear_error(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="no Ray cluster at"):
        RayExecutor(address="127.0.0.1:1")._connect(_Disconnected())


class _Disconnected:
    """Stands for the ray module in a process not yet connected (this one is)."""

    @staticmethod
    def is_initialized():
        return False

    @staticmethod
    def init(address, **_):
        raise ConnectionError(f"could not connect to {address}")
