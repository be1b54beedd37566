"""Leases on run directories: one process trains a run at a time, on any number of hosts, and a
lease left by a process that died is taken over (see :class:`RunLock`). The lease file of a run
is :attr:`steph.runs.RunDir.lease`, beside the run directory."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

# seconds between two renewals of a held lease, and how long a lease seen unchanged means its
# process died; STEPH_LEASE_HEARTBEAT / STEPH_LEASE_STALE_AFTER change them (every process
# sharing a runs folder must use the same: e.g. a shared file system that shows writes late)
LOCK_HEARTBEAT = float(os.environ.get("STEPH_LEASE_HEARTBEAT", "10"))
LOCK_STALE_AFTER = float(os.environ.get("STEPH_LEASE_STALE_AFTER", "60"))


class RunLock:
    """A lease on a run directory shared by processes on any number of hosts.

    The holder writes ``{"owner", "host", "pid", "beat"}`` into the lease file and a background
    thread rewrites it every ``heartbeat`` seconds with the next ``beat``. Another process that
    finds the file watches its *content* (never a clock: hosts' clocks and a shared file
    system's timestamps need not agree): a lease that changes within ``stale_after`` seconds is
    alive and stays with its holder; one that does not change belongs to a process that died and
    is taken over. Two shortcuts: a lease whose ``owner`` is this lock's own ``owner`` token (the
    retry of the same task, after the attempt that held it died) is taken over at once, and so is
    a lease held by a process of this host that no longer exists.

    ``acquire()`` returns False when a live process holds the lease; ``holder`` then says which.
    """

    def __init__(self, path: str | Path, owner: str | None = None,
                 heartbeat: float = LOCK_HEARTBEAT, stale_after: float = LOCK_STALE_AFTER):
        if not 0 < heartbeat < stale_after:
            raise ValueError(f"need 0 < heartbeat ({heartbeat}) < stale_after ({stale_after})")
        self.path = Path(path)
        self.owner = owner or uuid.uuid4().hex
        self.heartbeat = heartbeat
        self.stale_after = stale_after
        self.holder: dict[str, Any] | None = None
        self.took_over: dict[str, Any] | None = None  # the dead holder whose lease we took
        self._beat = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the file ------------------------------------------------------------------------------
    def _content(self) -> str:
        self._beat += 1
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "beat": self._beat}) + "\n"

    def _tmp(self) -> Path:
        return self.path.with_name(f"{self.path.name}.{self.owner}.{os.getpid()}.tmp")

    def _read(self) -> str | None:
        try:
            return self.path.read_text()
        except FileNotFoundError:
            return None

    def _create(self) -> bool:
        """Create the lease file with its whole content, only if there is none (link(2) is
        atomic, on NFS too, and a reader never sees a half-written lease)."""
        tmp = self._tmp()
        tmp.write_text(self._content())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _overwrite(self) -> None:
        tmp = self._tmp()
        tmp.write_text(self._content())
        os.replace(tmp, self.path)

    def _break(self, seen: str) -> None:
        """Remove a dead lease, unless it changed since it was judged (then leave it)."""
        grave = self.path.with_name(f"{self.path.name}.{self.owner}.stale")
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return  # someone else removed it first
        if grave.read_text() != seen:  # a new holder wrote it meanwhile: put it back
            with contextlib.suppress(FileExistsError):
                os.link(grave, self.path)
        grave.unlink(missing_ok=True)

    # -- judging a lease -----------------------------------------------------------------------
    def _changes_within(self, seen: str, seconds: float) -> bool:
        """Watch the lease for ``seconds``: True as soon as it changes or disappears."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(min(max(self.heartbeat / 4, 0.01), 1.0, max(end - time.monotonic(), 0)))
            if self._read() != seen:
                return True
        return False

    @staticmethod
    def _parse(text: str) -> dict[str, Any]:
        try:
            info = json.loads(text)
            return info if isinstance(info, dict) else {}
        except ValueError:  # a lock of an older steph ("host pid time") or a torn file
            parts = text.split()
            return {"host": parts[0], "pid": parts[1]} if len(parts) == 3 else {}

    @staticmethod
    def _dead_here(info: dict[str, Any]) -> bool:
        if info.get("host") != socket.gethostname():
            return False
        try:
            os.kill(int(info["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, TypeError, ValueError):
            return False
        return False

    # -- public --------------------------------------------------------------------------------
    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            if self._create():
                break
            seen = self._read()
            if seen is None:
                continue  # released meanwhile
            info = self._parse(seen)
            if info.get("owner") == self.owner:  # our own earlier attempt, which died
                self.took_over = info
                self._overwrite()
                break
            if not self._dead_here(info) and self._changes_within(seen, self.stale_after):
                if self._read() is None:
                    continue
                self.holder = self._parse(self._read() or seen)
                return False
            self.took_over = info
            self._break(seen)
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, name=f"lease {self.path.name}",
                                        daemon=True)
        self._thread.start()
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.heartbeat):
            current = self._read()
            if current is None or self._parse(current).get("owner") != self.owner:
                return  # taken over (we were judged dead): stop renewing someone else's lease
            with contextlib.suppress(OSError):
                self._overwrite()

    def live_holder_here(self) -> dict[str, Any] | None:
        """The holder of the lease when it is a live process of this host other than this lock
        (known alive without watching the lease), else None: no lease, or a holder whose
        liveness only watching can tell (another host) or that died. Sets ``holder``."""
        seen = self._read()
        if seen is None:
            return None
        info = self._parse(seen)
        if (info.get("owner") == self.owner or info.get("host") != socket.gethostname()
                or self._dead_here(info) or "pid" not in info):
            return None
        self.holder = info
        return info

    def describe_holder(self) -> str:
        h = self.holder or {}
        return f"process {h.get('pid', '?')} on host {h.get('host', '?')}"

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        current = self._read()
        if current is not None and self._parse(current).get("owner") == self.owner:
            self.path.unlink(missing_ok=True)
