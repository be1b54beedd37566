"""The requests record of a runs folder (steph.runs.requests): which runs are results."""

import json
import threading

import pytest

from steph.errors import RunError
from steph.experiments.plan import Planner
from steph.runs import RunsFolder
from steph.runs.requests import REQUESTS_FILE, infer_results


def fake_run(root, cohort, method, fold, sources=()):
    run = root / cohort / method / f"fold{fold}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(json.dumps({"run": {"sources": list(sources)}}))
    (run / "metrics.json").write_text("{}")
    return (cohort, method, fold, 0, run)


def test_result_pairs_are_the_targets_and_their_own_models():
    planner = Planner("abmil", ("A", "B", "C"))
    assert planner.result_pairs(["steph", "transmil"], ["A"]) == [
        ("A", "steph"), ("A", "abmil"), ("A", "transmil")]
    assert planner.result_pairs(["abmil"], ["A", "B"]) == [("A", "abmil"), ("B", "abmil")]


def test_inference_from_the_runs(tmp_path):
    runs = [fake_run(tmp_path, "T", "abmil", 0), fake_run(tmp_path, "T", "abmil", 1),
            fake_run(tmp_path, "T", "steph", 0, ["S"]), fake_run(tmp_path, "T", "transmil", 0),
            fake_run(tmp_path, "S", "abmil", 0)]
    roles = infer_results(runs)
    # T/transmil fold 0 only, in a cohort with more folds: a source model of another network
    assert roles.results == {("T", "abmil"), ("T", "steph")} and roles.inferred
    assert roles.role("S", "abmil") == "input"
    # nothing tells runs apart (every run is fold 0 of a cancer-specific method): all results
    only0 = [fake_run(tmp_path / "b", "A", "abmil", 0), fake_run(tmp_path / "b", "B", "abmil", 0)]
    assert infer_results(only0).results == {("A", "abmil"), ("B", "abmil")}


def test_requests_accumulate_once_each_and_concurrently(tmp_path):
    folder = RunsFolder(tmp_path)
    folder.record_request(["A"], ["abmil"], [("A", "abmil")], folds=[0, 1])
    folder.record_request(["A"], ["abmil"], [("A", "abmil")], folds=[0, 1])  # same: once
    threads = [threading.Thread(target=folder.record_request,
                                args=([f"C{i}"], ["abmil"], [(f"C{i}", "abmil")]))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    record = json.loads((tmp_path / REQUESTS_FILE).read_text())
    assert len(record["requests"]) == 9  # none lost to a concurrent rewrite
    assert len(folder.roles().results) == 9


def test_a_broken_or_newer_record_is_one_clear_error(tmp_path):
    (tmp_path / REQUESTS_FILE).write_text(json.dumps({"format": "steph-requests/9",
                                                      "requests": []}))
    with pytest.raises(RunError, match="requests.json.*newer than this steph"):
        RunsFolder(tmp_path).roles()
    (tmp_path / REQUESTS_FILE).write_text("{not json")
    with pytest.raises(RunError, match="requests.json"):
        RunsFolder(tmp_path).roles()
