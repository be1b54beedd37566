"""The lease on a run directory: alive while its holder renews it, taken over when the holder
died (judged by its content not changing, never by comparing clocks), at once by the retry of
the same task."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from steph.experiments.leases import RunLock
from steph.runs import RunDir

BEAT, STALE = 0.05, 0.6
LIVE = 10.0  # judging a live lease returns at its first renewal: a long limit costs nothing


def fast(path, owner=None, stale_after=STALE):
    return RunLock(path, owner=owner, heartbeat=BEAT, stale_after=stale_after)


def lease(owner="someone", host="elsewhere", pid=4242, beat=1):
    return json.dumps({"owner": owner, "host": host, "pid": pid, "beat": beat}) + "\n"


def elapsed(fn):
    t = time.monotonic()
    out = fn()
    return out, time.monotonic() - t


def test_lock_path_is_beside_the_run(tmp_path):
    run = tmp_path / "TGT" / "abmil" / "fold0"
    assert RunDir(run).lease == tmp_path / "TGT" / "abmil" / ".fold0.lock"


def test_a_free_lease_is_taken_renewed_and_released(tmp_path):
    path = tmp_path / ".fold0.lock"
    a = fast(path)
    assert a.acquire()
    first = json.loads(path.read_text())
    assert first["owner"] == a.owner and first["pid"] == os.getpid()
    end = time.monotonic() + 10
    while json.loads(path.read_text())["beat"] == first["beat"] and time.monotonic() < end:
        time.sleep(BEAT)
    assert json.loads(path.read_text())["beat"] > first["beat"]  # the heartbeat renews it
    a.release()
    assert not path.exists()
    assert not list(tmp_path.iterdir())  # no temporary files left


def test_a_live_lease_is_not_taken_over(tmp_path):
    path = tmp_path / ".fold0.lock"
    a = fast(path)
    assert a.acquire()
    try:
        b = fast(path, stale_after=LIVE)
        got, seconds = elapsed(b.acquire)
        assert got is False
        assert seconds < LIVE / 2  # judged alive as soon as it changed, without waiting it out
        assert b.holder["pid"] == os.getpid() and b.holder["host"] == socket.gethostname()
        assert "process" in b.describe_holder()
        assert json.loads(path.read_text())["owner"] == a.owner
    finally:
        a.release()


def test_a_live_lease_of_another_host_is_not_taken_over(tmp_path):
    """A holder elsewhere, whose process we cannot ask: only its renewals say it is alive."""
    path = tmp_path / ".fold0.lock"
    path.write_text(lease(beat=0))
    stop = threading.Event()

    def renew():
        beat = 0
        while not stop.wait(BEAT):
            beat += 1
            path.write_text(lease(beat=beat))

    t = threading.Thread(target=renew)
    t.start()
    try:
        b = fast(path, stale_after=LIVE)
        assert b.acquire() is False
        assert b.holder["host"] == "elsewhere"
    finally:
        stop.set()
        t.join()


def test_a_stale_lease_is_taken_over_after_watching_it(tmp_path):
    path = tmp_path / ".fold0.lock"
    path.write_text(lease(beat=7))  # a holder on another host that stopped renewing
    b = fast(path)
    got, seconds = elapsed(b.acquire)
    try:
        assert got is True
        assert seconds >= STALE  # it watched the lease for stale_after before judging
        assert b.took_over["host"] == "elsewhere"
        assert json.loads(path.read_text())["owner"] == b.owner
    finally:
        b.release()


def test_a_lock_of_an_older_steph_is_judged_the_same_way(tmp_path):
    path = tmp_path / ".fold0.lock"
    path.write_text(f"elsewhere 4242 {time.time()}\n")
    b = fast(path)
    assert b.acquire()
    b.release()


def test_a_dead_process_of_this_host_loses_its_lease_at_once(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    path = tmp_path / ".fold0.lock"
    path.write_text(lease(host=socket.gethostname(), pid=int(proc.stdout)))
    b = fast(path, stale_after=30.0)
    got, seconds = elapsed(b.acquire)
    b.release()
    assert got is True and seconds < 5.0


def test_the_retry_of_the_same_task_takes_over_its_own_lease_at_once(tmp_path):
    """The attempt that held the lease died (on any host); its retry carries the same token."""
    path = tmp_path / ".fold0.lock"
    path.write_text(lease(owner="task-7", host="another-node", beat=12))
    retry = fast(path, owner="task-7", stale_after=30.0)
    got, seconds = elapsed(retry.acquire)
    try:
        assert got is True and seconds < 5.0
        assert retry.took_over["host"] == "another-node"
        assert json.loads(path.read_text())["host"] == socket.gethostname()
    finally:
        retry.release()
    # any other owner would have had to watch it for stale_after first
    path.write_text(lease(owner="task-7", host="another-node", beat=12))
    other = fast(path, owner="task-8", stale_after=1.0)
    got, seconds = elapsed(other.acquire)
    other.release()
    assert got is True and seconds >= 1.0


def test_release_leaves_a_lease_that_was_taken_over(tmp_path):
    path = tmp_path / ".fold0.lock"
    a = fast(path)
    assert a.acquire()
    path.write_text(lease(owner="new-holder"))  # judged dead and taken over meanwhile
    time.sleep(3 * BEAT)
    a.release()
    assert json.loads(path.read_text())["owner"] == "new-holder"  # neither renewed nor removed


def test_bad_timing_is_refused(tmp_path):
    with pytest.raises(ValueError):
        RunLock(tmp_path / "x", heartbeat=5, stale_after=5)
