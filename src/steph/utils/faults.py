"""Fault injection for tests: stop this process at a named point of the code, or make a write
fail there as on a full disk, or list every point it reaches.

One variable, ``STEPH_FAULT``, says what to do:

  ``<point>[@<n>]``          the n-th time (default the first) the process reaches ``<point>``
                             it kills itself with SIGKILL (no cleanup, no atexit, no flushing:
                             like a node that dies)
  ``enospc:<point>[@<n>]``   there, raise ``OSError(ENOSPC)`` instead ("No space left on
                             device"): at a ``write:`` point the write fails as on a full disk
  ``trace:<file>``           kill nothing; append ``<point><TAB><occurrence>`` to ``<file>`` for
                             every point reached, so that a harness can list the moments of a
                             command and kill it later at any of them with ``<point>@<occurrence>``

With ``STEPH_FAULT_ONCE=<marker file>`` too, a kill or an error happens only if that file does
not exist yet (it is created just before), so a rerun or a retried task proceeds.

Points (``<point>`` may end in ``*`` to match a prefix; ``*@<n>`` is the n-th point of any name):
  ``write:<file name>``  inside an atomic write, after the bytes are in the temporary file and
                         before it replaces ``<file name>`` (utils/io.py): every checkpoint,
                         log, artefact, prediction, metrics, theta_0, split and summary file
  ``backup:<file name>`` ... of a write that keeps the previous version (a checkpoint): after
                         that version was renamed to the backup name, before the new file
                         takes its place
  ``train:bag``          after each bag's backward pass, between the bags of an optimiser step
  ``train:step``         after each optimiser step (training/trainer.py)
  ``train:epoch``        after an epoch's checkpoint and log are written
  ``restart:checkpoint`` a restart of a run (STEPH's collapse guard, experiments/runner.py
                         ``start_over``): after each checkpoint file is removed
  ``restart:log``        ... after the finished attempt's log is renamed, before
                         ``attempts.json`` is written
  ``search:target``      an inner search (experiments/runner.py): after an inner target model's
                         weights are written, before its checkpoint is removed
  ``search:candidate``   ... after a candidate's score is written, before the next candidate
Unset (the default), every call is one dictionary lookup and nothing else.

A process that runs units of work for another one (a Ray worker running run after run for the
``steph cv`` driver) takes the driver's settings with :func:`adopt`, which also restarts the
count, so that ``<point>@<n>`` counts within each unit of work.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Mapping
from pathlib import Path

ENV = "STEPH_FAULT"
ONCE_ENV = "STEPH_FAULT_ONCE"
ENOSPC = "enospc:"
TRACE = "trace:"
_counts: dict[str, int] = {}


def _parse(spec: str) -> tuple[str, int]:
    """(point, n) of ``<point>[@<n>]`` (without the ``enospc:`` action)."""
    point, _, nth = spec.rpartition("@") if "@" in spec else (spec, "", "1")
    try:
        n = int(nth)
    except ValueError:
        n = 0
    if not point or n < 1:
        raise ValueError(f"{ENV} must look like [enospc:]<point>[@<n>] with n >= 1, or "
                         f"trace:<file>; got {spec!r}")
    return point, n


def settings() -> dict[str, str]:
    """This process's fault settings (empty when none), to hand to :func:`adopt` elsewhere."""
    return {k: os.environ[k] for k in (ENV, ONCE_ENV) if os.environ.get(k)}


def adopt(given: Mapping[str, str]) -> None:
    """Use the fault settings ``given`` (from :func:`settings` in another process) instead of
    this process's, and count every point from zero again."""
    for key in (ENV, ONCE_ENV):
        if given.get(key):
            os.environ[key] = given[key]
        else:
            os.environ.pop(key, None)
    _counts.clear()


def read_trace(path: str | os.PathLike) -> list[tuple[str, int]]:
    """The points a traced process reached, in order: (point, its occurrence, 1-based)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        name, _, nth = line.rpartition("\t")
        if name:
            out.append((name, int(nth)))
    return out


def _trace(file: str, name: str) -> None:
    _counts[name] = n = _counts.get(name, 0) + 1
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{name}\t{n}\n".encode())  # one write of a line: whole, in order
    finally:
        os.close(fd)


def fault_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    if spec.startswith(TRACE):
        _trace(spec[len(TRACE):], name)
        return
    io_error = spec.startswith(ENOSPC)
    point, nth = _parse(spec[len(ENOSPC):] if io_error else spec)
    hit = point == name or (point.endswith("*") and name.startswith(point[:-1]))
    if not hit:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] != nth:
        return
    marker = os.environ.get(ONCE_ENV)
    if marker:
        try:
            fd = os.open(Path(marker), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # this fault already happened once
        os.write(fd, f"{name} pid {os.getpid()}\n".encode())
        os.close(fd)
    if io_error:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{name} (injected by {ENV})")
    os.kill(os.getpid(), signal.SIGKILL)
