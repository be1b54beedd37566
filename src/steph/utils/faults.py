"""Fault injection for tests: kill this process at a named point of the code.

Set ``STEPH_FAULT="<point>[@<n>]"``: the n-th time (default the first) the process reaches
``<point>`` it kills itself with SIGKILL (no cleanup, no atexit, no flushing: like a node that
dies). With ``STEPH_FAULT_ONCE=<marker file>`` too, the fault happens only if that file does not
exist yet (it is created just before the kill), so a rerun or a retried task proceeds.

Points (``<point>`` may end in ``*`` to match a prefix):
  ``write:<file name>``  inside an atomic write, after the bytes are in the temporary file and
                         before it replaces ``<file name>`` (utils/io.py)
  ``train:step``         after each optimiser step (training/trainer.py)
  ``train:epoch``        after an epoch's checkpoint and log are written
Unset (the default), every call is a dictionary lookup and nothing else.

A process that runs units of work for another one (a Ray worker running run after run for the
``steph cv`` driver) takes the driver's settings with :func:`adopt`, which also restarts the
count, so that ``<point>@<n>`` counts within each unit of work.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from pathlib import Path

ENV = "STEPH_FAULT"
ONCE_ENV = "STEPH_FAULT_ONCE"
_counts: dict[str, int] = {}


def _parse(spec: str) -> tuple[str, int]:
    point, _, nth = spec.rpartition("@") if "@" in spec else (spec, "", "1")
    try:
        n = int(nth)
    except ValueError:
        n = 0
    if not point or n < 1:
        raise ValueError(f"{ENV} must look like <point>[@<n>] with n >= 1, got {spec!r}")
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


def fault_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, nth = _parse(spec)
    hit = name == point or (point.endswith("*") and name.startswith(point[:-1]))
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
    os.kill(os.getpid(), signal.SIGKILL)
