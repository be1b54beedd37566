"""The fault-injection hook kills the process at the named point, once (marker file)."""

import subprocess
import sys

import pytest

from steph.errors import RunError
from steph.utils.faults import _parse, read_trace

CODE = """
from steph.utils.io import write_text
for i in range(3):
    write_text({d!r} + f"/f{{i}}.txt", "x")
"""


def _run(tmp_path, spec, once=None):
    env = {"STEPH_FAULT": spec, "PATH": "/usr/bin:/bin"}
    if once:
        env["STEPH_FAULT_ONCE"] = str(once)
    return subprocess.run([sys.executable, "-c", CODE.format(d=str(tmp_path))], env=env,
                          check=False, timeout=60).returncode


def test_kill_at_the_nth_write_once(tmp_path):
    marker = tmp_path / "marker"
    assert _run(tmp_path, "write:f1.txt", marker) == -9
    assert (tmp_path / "f0.txt").exists() and not (tmp_path / "f1.txt").exists()
    assert marker.read_text().startswith("write:f1.txt")
    assert _run(tmp_path, "write:f1.txt", marker) == 0  # the marker exists: no second fault
    assert (tmp_path / "f2.txt").exists()


def test_prefix_and_count(tmp_path):
    assert _run(tmp_path, "write:f*@3") == -9
    assert (tmp_path / "f1.txt").exists() and not (tmp_path / "f2.txt").exists()


def test_trace_lists_every_point_reached_and_kills_nothing(tmp_path):
    trace = tmp_path / "trace"
    assert _run(tmp_path, f"trace:{trace}") == 0
    assert read_trace(trace) == [("write:f0.txt", 1), ("write:f1.txt", 1), ("write:f2.txt", 1)]
    assert _run(tmp_path, f"trace:{trace}") == 0  # appended: the counts are the process's
    assert read_trace(trace)[3:] == [("write:f0.txt", 1), ("write:f1.txt", 1), ("write:f2.txt", 1)]


def test_enospc_fails_that_write_as_a_full_disk_would(tmp_path, monkeypatch):
    from steph.utils import faults
    from steph.utils.io import write_text

    monkeypatch.setenv("STEPH_FAULT", "enospc:write:b.txt@2")
    monkeypatch.setattr(faults, "_counts", {})
    write_text(tmp_path / "b.txt", "first")  # the first time: written
    with pytest.raises(RunError, match=r"cannot write .*b\.txt: No space left on device "
                                       r"\(errno 28\); the previous version, if any, is unchanged"):
        write_text(tmp_path / "b.txt", "second")
    assert (tmp_path / "b.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["b.txt"]  # no temporary file left
    write_text(tmp_path / "b.txt", "third")  # only the n-th time
    assert (tmp_path / "b.txt").read_text() == "third"


def test_bad_spec():
    for bad in ["train:step@0", "train:step@x", "@2"]:
        with pytest.raises(ValueError):
            _parse(bad)
    assert _parse("train:step@4") == ("train:step", 4)
    assert _parse("write:a.csv") == ("write:a.csv", 1)


def test_adopt_takes_another_process_settings_and_counts_afresh(monkeypatch):
    """A Ray worker takes the driver's settings for each task it runs (steph.experiments)."""
    import os

    from steph.utils import faults

    monkeypatch.setenv("STEPH_FAULT", "write:x.txt")  # restored after the test
    monkeypatch.setenv("STEPH_FAULT_ONCE", "/tmp/marker")
    monkeypatch.setattr(faults, "_counts", {"train:epoch": 3})
    faults.adopt({"STEPH_FAULT": "train:epoch@2"})
    assert faults.settings() == {"STEPH_FAULT": "train:epoch@2"}
    assert "STEPH_FAULT_ONCE" not in os.environ and faults._counts == {}
    faults.fault_point("train:epoch")  # the first of two: no kill
    assert faults._counts == {"train:epoch": 1}
    faults.adopt({})
    assert faults.settings() == {} and "STEPH_FAULT" not in os.environ
