"""Executors: who runs the runs of a planned grid.

An executor gets a :class:`Grid` (what it needs of an experiment, declared here:
:class:`steph.experiments.cv.Experiment` is one) and its planned runs (prerequisites first;
``grid.prerequisites(ref)`` says what each one needs) and returns a :class:`GridOutcome`: the
metrics of every finished run and a one-line error for every run that failed. A run that fails fails the runs that need it, never the others. The run directories
stay the record whatever the executor: a run is finished when its ``metrics.json`` exists.

- :class:`LocalExecutor` (the default): this process, one run after another in dependency
  order.
- :class:`RayExecutor`: the grid as a Ray task graph, on a local Ray instance or on a cluster.
  Each run is a Ray task whose prerequisite runs' tasks are its dependencies, so a transfer
  run starts as soon as its own prerequisites are finished. Workers that die are retried and
  the retry resumes from the run's last checkpoint; a run failing on its input is not retried.

Both hold each run with a lease (:class:`~steph.experiments.leases.RunLock`) while it trains, so
processes that share a runs folder never train one run twice, and a lease left by a dead
process is taken over. A run another live process holds is waited for (up to
``wait_for_held`` seconds), then read when that process finished it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from steph.errors import ConfigError, RunError, StephError, one_line
from steph.experiments.leases import RunLock
from steph.runs import RunRef
from steph.utils.faults import adopt as adopt_faults
from steph.utils.faults import settings as fault_settings
from steph.utils.logs import configure_logging

log = logging.getLogger("steph.experiments")

EXECUTORS = ("local", "ray")


class Grid(Protocol):
    """What an executor needs of an experiment."""

    data_root: Path
    runs_root: Path
    progress: bool

    def prerequisites(self, ref: RunRef) -> list[RunRef]:
        """The runs that must be finished before ``ref`` starts."""

    def prepare(self, refs: Sequence[RunRef]) -> dict[RunRef, str]:
        """Make what runs share (splits, theta_0) before any starts; the runs that cannot
        start, with their one-line error."""

    def is_finished(self, ref: RunRef) -> bool: ...

    def lease_path(self, ref: RunRef) -> Path: ...

    def finished_metrics(self, ref: RunRef) -> dict[str, Any] | None:
        """A finished run's metrics (None: unfinished); an error for other settings."""

    def run(self, ref: RunRef) -> dict[str, Any]:
        """Train and record one run in this process; its metrics."""

    def use_threads(self, cpus_per_run: float | None) -> None:
        """Runs use this many CPU threads (performance only)."""

    def spec(self) -> dict[str, Any]:
        """Small picklable arguments that rebuild the grid in a worker (``from_spec``)."""

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Grid: ...


@dataclass
class GridOutcome:
    """What an executor did: metrics of finished runs, one-line errors of failed ones."""

    metrics: dict[RunRef, dict[str, Any]] = field(default_factory=dict)
    failed: dict[RunRef, str] = field(default_factory=dict)

    def in_order(self, jobs: Sequence[RunRef]) -> GridOutcome:
        """The failures listed in plan order (a prerequisite before the runs that need it)."""
        self.failed = {job: self.failed[job] for job in jobs if job in self.failed}
        return self


class GridError(RunError):
    """Some runs of the grid failed; ``failed`` maps each to its one-line error and ``summary``
    is the summary of the runs that finished (when it was written). The message has a line
    per distinct error, naming the runs it stopped (e.g. a full disk while theta_0 was
    written stops every run of the network: one line, not one per run)."""

    def __init__(self, failed: Mapping[RunRef, str], total: int, summary: Any = None,
                 where: str | Path | None = None):
        self.failed = dict(failed)
        self.summary = summary
        head = f"{len(self.failed)} of {total} run(s) failed"
        if where is not None:
            head += f" (the summary of the {total - len(self.failed)} finished is in {where})"
        runs_of: dict[str, list[str]] = {}
        for job, err in self.failed.items():
            runs_of.setdefault(err, []).append(str(job))
        lines = [f"{head}:"] + [f"  {_some(runs)}: {err}" for err, runs in runs_of.items()]
        super().__init__("\n".join(lines))


def _some(names: Sequence[str], shown: int = 3) -> str:
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


class Executor(Protocol):
    def run(self, exp: Grid, jobs: Sequence[RunRef]) -> GridOutcome:
        """Run ``jobs`` (prerequisites listed before the runs that need them)."""


def make_executor(spec: str | Executor) -> Executor:
    """``"local"``, ``"ray"`` (a local Ray instance, or the cluster Ray is connected to) or an
    executor object."""
    if isinstance(spec, str):
        if spec == "local":
            return LocalExecutor()
        if spec == "ray":
            return RayExecutor()
        raise ConfigError(f"unknown executor {spec!r}; choose one of {', '.join(EXECUTORS)}")
    if callable(getattr(spec, "run", None)):
        return spec
    raise ConfigError(f"an executor must be 'local', 'ray' or an object with run(); got {spec!r}")


# -- shared by the executors -----------------------------------------------------------------------

def blocked_by(exp: Grid, job: RunRef, failed: Mapping[RunRef, str]) -> str | None:
    """Why ``job`` cannot run: a prerequisite failed (None: it can)."""
    bad = [str(p) for p in exp.prerequisites(job) if p in failed]
    return f"not run: needs {', '.join(bad)}, which failed" if bad else None


class RunHeld(RunError):
    """A live process elsewhere holds the run's lease (it is training it)."""

    def __init__(self, job: RunRef, holder: str):
        self.job, self.holder = job, holder
        super().__init__(f"held by {holder}, whose lease is alive (another steph process is "
                         f"training {job})")


def run_held(exp: Grid, job: RunRef, owner: str | None = None,
             lease: Mapping[str, float] | None = None, wait: float = 0.0,
             poll: float = 2.0) -> dict[str, Any]:
    """Run one job under its lease (a finished run is only read). ``owner``: the lease token;
    a lease of the same token left by an attempt that died is taken over at once.

    A lease a live process holds: :class:`RunHeld` at once when ``wait`` is 0; else wait up to
    ``wait`` seconds (checking every ``poll`` seconds) for the holder to finish the run (then it
    is read, not trained again) or to let it go (then this process trains it)."""
    deadline = time.monotonic() + wait
    announced = False
    while True:
        done = exp.finished_metrics(job)
        if done is not None:
            if announced:
                log.info("%s: finished by the process that held it; its results are read", job)
            return done
        lock = RunLock(exp.lease_path(job), owner=owner, **(lease or {}))
        if lock.live_holder_here() is None and lock.acquire():
            break
        if time.monotonic() >= deadline:
            err = RunHeld(job, lock.describe_holder())
            if wait > 0:
                raise RunError(f"{err}; waited {wait:.0f} s for it (--wait-for-held)")
            raise err
        if not announced:
            log.info("%s is held by %s (another steph process is training it): waiting up to "
                     "%.0f s for it (--wait-for-held)", job, lock.describe_holder(), wait)
            announced = True
        time.sleep(max(0.0, min(poll, deadline - time.monotonic())))
    try:
        if lock.took_over:
            log.info("%s: took over the lease of process %s on %s, which died", job,
                     lock.took_over.get("pid", "?"), lock.took_over.get("host", "?"))
        return exp.run(job)
    finally:
        lock.release()


class GridProgress:
    """One progress bar for the grid: runs done / total and how many failed (one log line per
    run instead when there is no terminal, e.g. in a cluster job's log)."""

    def __init__(self, total: int, done: int, enabled: bool):
        from tqdm.auto import tqdm

        self.total, self.done, self.failed, self.enabled = total, done, 0, enabled
        self.bar = tqdm(total=total, initial=done, desc="grid", unit="run",
                        disable=None if enabled else True, dynamic_ncols=True)
        self.bar.set_postfix(failed=0)

    def update(self, job: RunRef, error: str | None = None) -> None:
        self.done += 1
        self.failed += error is not None
        self.bar.update(1)
        self.bar.set_postfix(failed=self.failed)
        if error is not None:
            log.error("%s failed: %s", job, error)
        if self.bar.disable and self.enabled:
            log.info("grid: %d/%d run(s) done, %d failed (%s %s)", self.done, self.total,
                     self.failed, job, "failed" if error else "finished")

    def close(self) -> None:
        self.bar.close()


def _unfinished(exp: Grid, jobs: Sequence[RunRef], outcome: GridOutcome) -> list[RunRef]:
    """Read the finished runs into ``outcome``; return the others."""
    todo = []
    for job in jobs:
        if not exp.is_finished(job):
            todo.append(job)
            continue
        try:
            outcome.metrics[job] = exp.finished_metrics(job)  # refuses other settings
        except StephError as err:
            outcome.failed[job] = one_line(err)
    return todo


# -- in this process -------------------------------------------------------------------------------

DEFAULT_WAIT_FOR_HELD = 24 * 3600.0  # seconds a run held by another live process is waited for


class LocalExecutor:
    """Runs one after another in this process, prerequisites first.

    A run held by a live process elsewhere (another ``steph cv`` on the same runs folder, e.g.
    one per GPU) is not trained twice: this process goes on with the runs whose prerequisites
    are ready, comes back to the held run, and when nothing else is left waits for it (a log
    line names the run and its holder) up to ``wait_for_held`` seconds from when it was first
    found held; a run the other process finished is read, not trained again; one it let go
    unfinished (it failed or stopped) is trained here. Past the wait, that run fails naming its
    holder, and so do the runs that need it. A lease left by a process that died is taken over
    (judged from its content within ``stale_after`` seconds, 60 by default; at once for a
    process of this host).
    """

    def __init__(self, cpus_per_run: float | None = None,
                 lease: Mapping[str, float] | None = None,
                 wait_for_held: float = DEFAULT_WAIT_FOR_HELD, poll: float = 1.0):
        if wait_for_held < 0:
            raise ConfigError(f"wait for held runs must be >= 0 seconds, got {wait_for_held}")
        self.cpus_per_run = cpus_per_run
        self.lease = dict(lease or {})
        self.wait_for_held = float(wait_for_held)
        self.poll = float(poll)
        # re-judge a held lease by acquiring it at least this often (another host's holder
        # that died is seen only by watching its lease)
        self.rejudge = float(self.lease.get("stale_after", 60.0))

    def run(self, exp: Grid, jobs: Sequence[RunRef]) -> GridOutcome:
        exp.use_threads(self.cpus_per_run)
        outcome = GridOutcome()
        todo = _unfinished(exp, jobs, outcome)
        outcome.failed.update(exp.prepare(todo))
        progress = GridProgress(len(jobs), len(jobs) - len(todo), exp.progress)
        pending = list(todo)
        held: dict[RunRef, float] = {}  # run -> when it was first found held elsewhere
        try:
            while pending:
                if not self._pass(exp, pending, held, outcome, progress) and pending:
                    self._wait(exp, [j for j in pending if j in held], held)
        finally:
            progress.close()
        return outcome.in_order(jobs)

    def _pass(self, exp: Grid, pending: list[RunRef], held: dict[RunRef, float],
              outcome: GridOutcome, progress: GridProgress) -> bool:
        """One pass over the pending runs in plan order: run each whose prerequisites are done;
        a run held elsewhere stays pending. Whether any run was settled."""
        settled = False
        for job in list(pending):
            error = outcome.failed.get(job) or blocked_by(exp, job, outcome.failed)
            if error is None:
                if any(p in pending for p in exp.prerequisites(job)):
                    continue  # a prerequisite is held elsewhere: come back to it
                try:
                    outcome.metrics[job] = run_held(exp, job, lease=self.lease)
                    if job in held:
                        log.info("%s: finished by the process that held it; its results are "
                                 "read", job)
                except RunHeld as err:
                    if job not in held:
                        held[job] = time.monotonic()
                        log.info("%s is held by %s (another steph process is training it): "
                                 "going on with the other runs, then waiting up to %.0f s for "
                                 "it (--wait-for-held)", job, err.holder, self.wait_for_held)
                    if time.monotonic() - held[job] < self.wait_for_held:
                        continue
                    error = f"{err}; waited {self.wait_for_held:.0f} s for it (--wait-for-held)"
                except Exception as err:  # one run's failure never stops the grid
                    log.debug("%s failed", job, exc_info=True)
                    error = one_line(err)
            if error is not None:
                outcome.failed[job] = error
            pending.remove(job)
            progress.update(job, error)
            settled = True
        return settled

    def _wait(self, exp: Grid, waiting: Sequence[RunRef], held: Mapping[RunRef, float]) -> None:
        """Sleep until a held run changes (finished, its lease gone or its holder dead here),
        its wait is over, or it is time to judge the leases again."""
        if not waiting:  # pragma: no cover (a pass without progress always leaves a held run)
            return
        log.info("waiting for %d run(s) other processes hold: %s", len(waiting),
                 ", ".join(map(str, waiting[:4])) + (" ..." if len(waiting) > 4 else ""))
        now = time.monotonic()
        until = min(min(held[j] + self.wait_for_held for j in waiting), now + self.rejudge)
        while time.monotonic() < until:
            time.sleep(max(0.0, min(self.poll, until - time.monotonic())))
            for job in waiting:
                lock = RunLock(exp.lease_path(job), **self.lease)
                if (exp.is_finished(job) or not exp.lease_path(job).exists()
                        or lock.live_holder_here() is None and _holder_here(lock)):
                    return


def _holder_here(lock: RunLock) -> bool:
    """Whether the lease's holder was a process of this host (then live_holder_here() being
    None means it died); False for another host's, which only watching can judge."""
    try:
        info = json.loads(lock.path.read_text())
    except (OSError, ValueError):
        return True  # gone or torn: look again now
    return isinstance(info, dict) and info.get("host") == socket.gethostname()


# -- Ray -------------------------------------------------------------------------------------------

_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_memory(value: float | str | None) -> int | None:
    """Bytes from ``8G``, ``512M``, ``1.5GiB`` or a number of bytes (binary units)."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(value), re.IGNORECASE)
        if not m:
            raise ConfigError(f"memory per run must look like 8G, 512M or a number of bytes; "
                              f"got {value!r}")
        number, unit = float(m.group(1)), m.group(2).lower()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"memory per run must be positive, got {value!r}")
    return size


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'steph[ray]'") from None
    return ray


class RayExecutor:
    """The grid as a Ray task graph.

    ``address``: None starts a local Ray instance on this machine (unless this process is
    already connected to Ray, or ``RAY_ADDRESS`` names a cluster); ``"auto"`` or
    ``"HOST:PORT"`` joins a running cluster. Per run:
    ``cpus_per_run`` (also its thread count), ``gpus_per_run`` (fractions share a GPU),
    ``memory_per_run`` (bytes or ``"8G"``; Ray schedules by it, it is not a hard limit).
    ``retries``: how many times a run is retried after its worker process or node died.
    ``wait_for_held``: how long a task waits for a run another steph process holds.
    """

    def __init__(self, address: str | None = None, cpus_per_run: float = 1.0,
                 gpus_per_run: float = 0.0, memory_per_run: float | str | None = None,
                 retries: int = 2, lease: Mapping[str, float] | None = None,
                 init_options: Mapping[str, Any] | None = None,
                 wait_for_held: float = DEFAULT_WAIT_FOR_HELD):
        if not cpus_per_run > 0:
            raise ConfigError(f"cpus per run must be > 0, got {cpus_per_run}")
        if gpus_per_run < 0:
            raise ConfigError(f"gpus per run must be >= 0, got {gpus_per_run}")
        if retries < 0:
            raise ConfigError(f"retries must be >= 0, got {retries}")
        self.address = address
        self.cpus_per_run = float(cpus_per_run)
        self.gpus_per_run = float(gpus_per_run)
        self.memory_per_run = parse_memory(memory_per_run)
        self.retries = int(retries)
        self.lease = dict(lease or {})
        self.init_options = dict(init_options or {})
        self.wait_for_held = float(wait_for_held)

    # -- connection --------------------------------------------------------------------------
    def _connect(self, ray) -> tuple[bool, bool]:
        """Connect to Ray or start it. Returns (whether this call connected, and so must
        disconnect; whether it started a local instance of its own)."""
        if ray.is_initialized():
            return False, False
        address = self.address or os.environ.get("RAY_ADDRESS")  # as `ray` itself does
        if not address:
            # "local": a new instance even if another one runs on this machine
            ray.init(address="local", include_dashboard=False, **self.init_options)
            return True, True
        try:
            ray.init(address=address, **self.init_options)
        except ConnectionError as err:
            raise ConfigError(f"no Ray cluster at {address!r} ({one_line(err)}); start one "
                              "with `ray start --head`, or leave --address out to run on a "
                              "local Ray instance") from None
        return True, False

    def _run_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.cpus_per_run, "max_retries": self.retries,
                                "retry_exceptions": False}
        if self.gpus_per_run:
            opts["num_gpus"] = self.gpus_per_run
        if self.memory_per_run:
            opts["memory"] = self.memory_per_run
        return opts

    def _check_resources(self, ray, local: bool) -> None:
        """A run must fit on some node, or Ray would wait for one forever: an error on a local
        instance, a warning on a cluster (an autoscaler may add such a node)."""
        need = {"CPU": self.cpus_per_run, "GPU": self.gpus_per_run,
                "memory": float(self.memory_per_run or 0)}
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        if any(all(r.get(k, 0.0) >= v for k, v in need.items() if v) for r in nodes):
            return
        asked = ", ".join(f"{k} {v:g}" for k, v in need.items() if v)
        offered = "; ".join(", ".join(f"{k} {r.get(k, 0):g}" for k in need) for r in nodes)
        message = (f"no node of the Ray cluster offers what one run asks for ({asked}); "
                   f"nodes: {offered}")
        if local:
            raise ConfigError(message)
        log.warning("%s. Runs wait until such a node joins the cluster.", message)

    # -- the grid ----------------------------------------------------------------------------
    def run(self, exp: Grid, jobs: Sequence[RunRef]) -> GridOutcome:
        ray = import_ray()
        outcome = GridOutcome()
        todo = _unfinished(exp, jobs, outcome)
        if not todo:
            return outcome  # nothing to run: no need for Ray
        started, local = self._connect(ray)
        progress = GridProgress(len(jobs), len(jobs) - len(todo), exp.progress)
        try:
            self._check_resources(ray, local)
            check_nodes(ray, exp.data_root, exp.runs_root)
            # shared state, made once by the driver before any task starts
            outcome.failed.update(exp.prepare(todo))
            self._submit_and_wait(ray, exp, todo, outcome, progress)
        finally:
            progress.close()
            if started:
                ray.shutdown()
        return outcome.in_order(jobs)

    def _submit_and_wait(self, ray, exp: Grid, todo: Sequence[RunRef], outcome: GridOutcome,
                         progress: GridProgress) -> None:
        exp.use_threads(self.cpus_per_run)
        spec = {"grid": exp.spec(), "lease": self.lease, "wait_for_held": self.wait_for_held}
        factory = type(exp)
        # the driver's fault-injection settings (steph.utils.faults) hold in its tasks
        faults = fault_settings()
        task = ray.remote(_run_task)
        opts = self._run_options()
        refs: dict[RunRef, Any] = {}
        for job in todo:  # prerequisites come first, so their refs exist
            error = outcome.failed.get(job) or blocked_by(exp, job, outcome.failed)
            if error is not None:
                outcome.failed[job] = error
                progress.update(job, error)
                continue
            deps = [refs[p] for p in exp.prerequisites(job) if p in refs]
            # the lease token travels with the task's arguments: its retries hold the same
            refs[job] = task.options(name=str(job), **opts).remote(factory, spec, faults, job,
                                                                   uuid.uuid4().hex, *deps)
        pending = {ref: job for job, ref in refs.items()}
        try:
            while pending:
                # ready refs come in the order given: a failed prerequisite before its dependants
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    job = pending.pop(ref)
                    try:
                        outcome.metrics[job] = ray.get(ref)
                        progress.update(job)
                    except Exception as err:  # noqa: BLE001 (whatever failed, only this run)
                        log.debug("%s failed: %s", job, err)  # --debug: the remote traceback
                        # a run whose prerequisite failed never ran: say so, not the cause
                        outcome.failed[job] = (blocked_by(exp, job, outcome.failed)
                                               or self._describe(ray, err))
                        progress.update(job, outcome.failed[job])
        except BaseException:  # interrupted: stop the runs (they release their leases)
            for ref in pending:
                with contextlib.suppress(Exception):
                    ray.cancel(ref)
            raise

    def _describe(self, ray, err: BaseException) -> str:
        """One line for a failed task: the run's own error, or the system failure that
        outlived its retries."""
        if isinstance(err, ray.exceptions.RayTaskError):
            cause = getattr(err, "cause", None)
            return one_line(cause) if cause is not None else one_line(err)
        text = one_line(err)
        return f"{text} (given up after {self.retries} retr{'y' if self.retries == 1 else 'ies'})"


# -- inside Ray tasks ------------------------------------------------------------------------------

_GRIDS: dict[str, Grid] = {}


def _grid(factory: type[Grid], spec: Mapping[str, Any]) -> Grid:
    """The grid a task runs in, rebuilt from small arguments (kept for the worker's next task
    of the same grid)."""
    key = json.dumps([factory.__module__, factory.__qualname__, spec], sort_keys=True)
    if key not in _GRIDS:
        _GRIDS.clear()
        _GRIDS[key] = factory.from_spec(spec)
    return _GRIDS[key]


def _run_task(factory: type[Grid], spec: Mapping[str, Any], faults: Mapping[str, str],
              job: RunRef, owner: str, *prerequisites: Any) -> dict[str, Any]:
    """One run as a Ray task; ``prerequisites`` are the metrics of the runs it needs (Ray
    starts it only once they exist). Returns the run's small metrics dict."""
    adopt_faults(faults)  # a worker runs task after task: each counts its fault points afresh
    configure_logging(logging.INFO if spec["grid"]["progress"] else logging.WARNING)
    exp = _grid(factory, spec["grid"])
    lease = spec.get("lease") or {}
    # a run another steph process holds: the task waits for it (then reads its results)
    return run_held(exp, job, owner=owner, lease=lease, wait=spec.get("wait_for_held", 0.0))


CHECK_PREFIX = ".steph-node-check-"


def _check_node(data_root: str, runs_root: str, name: str, token: str, node_id: str) -> str | None:
    """On one node: the data root exists, the driver's token in the runs folder reads back and
    a reply can be written there. Returns the problem, or None."""
    runs = Path(runs_root)
    if not Path(data_root).is_dir():
        return f"data root {data_root} not found"
    try:
        seen = (runs / name).read_text()
    except OSError:
        return (f"runs folder {runs_root} is not the driver's: {name}, which the driver wrote "
                "there, cannot be read")
    if seen != token:
        return f"runs folder {runs_root} is not the driver's (another {name})"
    try:
        (runs / f"{name}.{node_id}").write_text(socket.gethostname())
    except OSError as err:
        return f"runs folder {runs_root} is not writable ({one_line(err)})"
    return None


def check_nodes(ray, data_root: str | Path, runs_root: str | Path, timeout: float = 300.0) -> None:
    """Check that every alive node of the cluster sees the data root and the runs folder at the
    same paths as this driver (one small task pinned to each node). Raises ConfigError naming
    each node that does not."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    data_root, runs = Path(data_root).resolve(), Path(runs_root).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    name = f"{CHECK_PREFIX}{token[:12]}"
    (runs / name).write_text(token)
    check = ray.remote(_check_node)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [check.options(num_cpus=0, name="steph node check",
                          scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"],
                                                                             soft=False))
            .remote(str(data_root), str(runs), name, token, n["NodeID"]) for n in nodes]
    problems = []
    try:
        for node, ref in zip(nodes, refs):
            where = (f"node {node.get('NodeManagerHostname') or '?'} "
                     f"({node.get('NodeManagerAddress')}, id {node['NodeID'][:12]})")
            try:
                problem = ray.get(ref, timeout=timeout)
            except Exception as err:  # noqa: BLE001 (e.g. steph not installed there, no answer)
                problem = f"the check task failed: {one_line(getattr(err, 'cause', None) or err)}"
            if problem is None and not (runs / f"{name}.{node['NodeID']}").exists():
                problem = f"what it wrote into {runs} does not reach the driver"
            if problem:
                problems.append(f"  {where}: {problem}")
    finally:
        for f in runs.glob(f"{name}*"):
            f.unlink(missing_ok=True)
    if problems:
        raise ConfigError("every node of the Ray cluster must see the data root and the runs "
                          f"folder at the driver's paths ({data_root}, {runs}):\n"
                          + "\n".join(problems))
