"""A full disk while the grid writes (``STEPH_FAULT=enospc:write:<file>@<n>``: the write fails
with ENOSPC as on a full disk): ``steph cv`` stops the run with one line naming the file, no
traceback, non-zero exit; what was written before stays usable; the rerun, with space again,
ends with the undisturbed results."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import harness as H
import pytest

from steph.training.trainer import _read_checkpoint

FULL = "No space left on device"


def _full_disk(h: H.Harness, spec: str, out: Path) -> tuple[H.Outcome, Path]:
    """Run the grid with a full disk at ``spec``; return the outcome and the file named."""
    got = h.launcher.run(h.argv(out), {**H.base_env(), "STEPH_FAULT": f"enospc:{spec}"}, h.work)
    assert got.returncode == 1, got.tail()
    assert "Traceback" not in got.stderr
    # the error the command ends with (above it: one log line per run as the grid went on)
    error = got.stderr[re.search(r"^error: ", got.stderr, re.MULTILINE).start():]
    lines = [line for line in error.splitlines() if FULL in line]
    assert len(lines) == 1, error  # once, naming the runs it stopped; the runs needing them
    name = spec.split(":", 1)[1].split("@")[0]
    m = re.search(rf"cannot write (\S*/{re.escape(name)}): {FULL} \(errno 28\)", lines[0])
    assert m, lines[0]
    return got, Path(m.group(1))


def _rerun_equals_reference(h: H.Harness, out: Path) -> None:
    again = h.launcher.run(h.argv(out), H.base_env(), h.work)
    assert again.returncode == 0, again.tail()
    assert H.differences(h.reference, H.results(out)) == []
    assert H.leftovers(out) == []


def test_full_disk_while_writing_a_checkpoint(main_grid, tmp_path):
    out = tmp_path / "runs"
    _, path = _full_disk(main_grid, "write:checkpoint.safetensors@2", out)
    # the first run's second checkpoint failed: the first one is as it was, whole and usable
    assert _read_checkpoint(path).epoch == 1
    assert not list(path.parent.glob(".*.tmp"))
    assert not (path.parent / "metrics.json").exists()
    _rerun_equals_reference(main_grid, out)


@pytest.mark.slow  # the checkpoint and theta_0 cases run in make test
def test_full_disk_while_writing_metrics(main_grid, tmp_path):
    out = tmp_path / "runs"
    _, path = _full_disk(main_grid, "write:metrics.json@3", out)
    run = path.parent
    assert not path.exists()  # not finished: the rerun redoes it from its last checkpoint
    assert _read_checkpoint(run / "checkpoint.safetensors").epoch == 2
    _rerun_equals_reference(main_grid, out)


@pytest.mark.slow  # the checkpoint and theta_0 cases run in make test
def test_full_disk_while_writing_the_summary(main_grid, tmp_path):
    out = tmp_path / "runs"
    shutil.copytree(main_grid.reference_dir, out)  # a finished grid, summarised once
    before = (out / "summary.csv").read_bytes()
    got, path = _full_disk(main_grid, "write:summary.csv@1", out)
    error = got.stderr[got.stderr.index("error: "):]  # after the log lines
    assert path == out / "summary.csv" and error.strip().count("\n") == 0
    assert error.startswith("error: cannot write ")
    assert (out / "summary.csv").read_bytes() == before  # the previous summary is untouched
    _rerun_equals_reference(main_grid, out)


def test_full_disk_while_writing_theta0(main_grid, tmp_path):
    out = tmp_path / "runs"
    got, path = _full_disk(main_grid, "write:theta0.safetensors@1", out)
    assert path == out / "theta0.safetensors" and not path.exists()
    # every run of the network stopped (theta_0 is shared): one line names them, not one each
    assert re.search(r"^  TGT/abmil/fold0, TGT/abmil/fold1, RELA/abmil/fold0 and 5 more: "
                     r"cannot write ", got.stderr, re.MULTILINE), got.stderr
    _rerun_equals_reference(main_grid, out)
