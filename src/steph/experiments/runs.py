"""Run directories: the unit of work and of resumption.

``RUNS/<cohort>/<method>/fold<k>/`` holds ``config.yaml`` (the effective settings), the training
``log.jsonl`` and ``checkpoint.safetensors`` while it trains, then ``model.safetensors`` +
``model.json`` (a self-contained artefact), ``predictions.csv``, ``run.json`` (how long it took,
where and with what software: everything that may differ between two runs of the same command)
and, written last, ``metrics.json`` (only what the command and the data decide, so reruns give
the same bytes): a run is finished when its metrics file exists.

``RUNS/theta0.safetensors`` (+ ``theta0.json``) is the shared initialisation of every
cancer-specific ABMIL of the experiment directory, created once; each other network has its own,
``RUNS/theta0-<arch>.safetensors`` (+ ``.json``), created once too (ABMIL keeps the old names).
``RUNS/splits/<cohort>/`` holds the folds when the cohort brings none; ``RUNS/graphs/<cohort>/``
the patch graphs of graph networks (Patch-GCN).
"""

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

import torch
import yaml

from steph.config import ModelConfig, without_performance_keys
from steph.errors import RunError
from steph.models import create_model
from steph.utils.faults import fault_point
from steph.utils.io import load_tensors, read_json, save_tensors, write_json, write_text

THETA0 = "theta0.safetensors"  # ABMIL's; theta0-<arch>.safetensors for the other networks
GRAPHS = "graphs"
METRICS = "metrics.json"
CONFIG = "config.yaml"
PREDICTIONS = "predictions.csv"
WEIGHTS = "model.safetensors"
MANIFEST = "model.json"
RUN_RECORD = "run.json"


def run_dir(root: str | Path, cohort: str, method: str, fold: int, repeat: int = 0) -> Path:
    """``RUNS/<cohort>/<method>/fold<k>``; repeats of the cross-validation with other split
    seeds (``--repeats``) live in ``RUNS/<cohort>/<method>/rep<r>/fold<k>`` (r >= 1)."""
    base = Path(root) / cohort / method
    return (base / f"rep{repeat}" if repeat else base) / f"fold{fold}"


def is_finished(path: str | Path) -> bool:
    return (Path(path) / METRICS).exists()


# -- theta_0 ------------------------------------------------------------------------------------

def theta0_path(root: str | Path, arch: str = "abmil") -> Path:
    """``RUNS/theta0.safetensors`` for ABMIL, ``RUNS/theta0-<arch>.safetensors`` otherwise."""
    return Path(root) / (THETA0 if arch == "abmil" else f"theta0-{arch}.safetensors")


def graph_cache(root: str | Path, cohort: str) -> Path:
    """Where the patch graphs of a cohort are cached: ``RUNS/graphs/<cohort>``."""
    return Path(root) / GRAPHS / cohort


def theta0_identity(model_cfg: ModelConfig, in_dim: int, n_bins: int,
                    arch: str = "abmil") -> dict[str, Any]:
    with torch.device("meta"):  # hparams only: nothing allocated
        net = create_model(arch, in_dim=in_dim, n_bins=n_bins, **model_cfg.network_kwargs(arch))
    return {"hparams": net.hparams(), "init_seed": model_cfg.init_seed, "model": arch}


def ensure_theta0(root: str | Path, model_cfg: ModelConfig, in_dim: int, n_bins: int,
                  arch: str = "abmil") -> Path:
    """Create network ``arch``'s theta_0 once; afterwards check it matches the requested
    network (same architecture, hyper-parameters and seed)."""
    path = theta0_path(root, arch)
    meta_path = path.with_suffix(".json")
    ident = theta0_identity(model_cfg, in_dim, n_bins, arch)
    if path.exists() and meta_path.exists():
        found = read_json(meta_path)
        if (found.get("hparams") != ident["hparams"] or found.get("init_seed") != ident["init_seed"]
                or found.get("model", "abmil") != arch):
            raise RunError(
                f"{path} was created for {found.get('model', 'abmil')} {found.get('hparams')} "
                f"(seed {found.get('init_seed')}) but this run needs {arch} {ident['hparams']} "
                f"(seed {ident['init_seed']}): every {arch} model of an experiment directory must "
                "start from the same theta_0; use another --out"
            )
        return path
    torch.manual_seed(model_cfg.init_seed)
    model = create_model(arch, **ident["hparams"])
    save_tensors(path, model.state_dict())
    write_json(meta_path, ident)
    return path


def load_theta0(root: str | Path, arch: str = "abmil"
                ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = theta0_path(root, arch)
    if not path.exists():
        raise RunError(f"no shared initialisation of {arch} at {path}")
    return load_tensors(path), read_json(path.with_suffix(".json"))


# -- run config -------------------------------------------------------------------------------

def check_or_write_config(path: Path, settings: dict[str, Any]) -> None:
    """Save the effective settings; a run started with other settings is an error, not a mix."""
    cfg_path = path / CONFIG
    if cfg_path.exists():
        # performance-only keys (data.cache_mb, train.threads) never make two runs differ
        found = without_performance_keys(_upgrade(yaml.safe_load(cfg_path.read_text()) or {}))
        settings = without_performance_keys(settings)
        if _canon(found) != _canon(settings):
            diff = sorted(_diff_keys(found, settings))
            raise RunError(
                f"{path} was started with other settings (differences: {', '.join(diff[:8])}); "
                "delete that run directory or use another --out"
            )
        return
    path.mkdir(parents=True, exist_ok=True)
    write_text(cfg_path, yaml.safe_dump(settings, sort_keys=False))


def _upgrade(found: dict[str, Any]) -> dict[str, Any]:
    """A run's recorded settings in today's names: ``model.name`` is now ``model.arch``, and
    runs recorded before ``model.options`` / ``data.eval_max_instances`` existed ran with their
    defaults (none)."""
    model, data = found.get("model"), found.get("data")
    if isinstance(model, dict):
        model = dict(model)
        if "name" in model and "arch" not in model:
            model["arch"] = model.pop("name")
        model.setdefault("options", {})
        found = {**found, "model": model}
    if isinstance(data, dict) and "eval_max_instances" not in data:
        found = {**found, "data": {**data, "eval_max_instances": None}}
    return found


def _canon(d: Any) -> str:
    return json.dumps(d, sort_keys=True, default=str)


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in set(a) | set(b):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if _canon(a) == _canon(b) else [prefix.rstrip(".")]


# -- restarts (a module's TrainingRestart, e.g. STEPH's collapse guard) ------------------------

ATTEMPTS = "attempts.json"


def read_attempts(path: Path) -> list[dict[str, Any]]:
    """The restarts a run has made so far (``attempts.json``), oldest first."""
    p = Path(path) / ATTEMPTS
    return read_json(p) if p.exists() else []


def start_over(path: Path, restart: Any, n_before: int) -> dict[str, Any]:
    """Record a restart and clear the run for the next attempt: the checkpoint goes first (a
    process killed here redoes the same attempt, which ends the same way), the finished
    attempt's log is kept as ``log.attempt<n>.jsonl``, then ``attempts.json`` is written."""
    from steph.training.trainer import CHECKPOINT, LOG_FILE

    path = Path(path)
    history = []
    log_path = path / LOG_FILE
    if log_path.exists():
        history = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    for ckpt in sorted(path.glob(CHECKPOINT.replace(".safetensors", "*.safetensors"))):
        ckpt.unlink()
        fault_point("restart:checkpoint")
    if log_path.exists():
        os.replace(log_path, path / f"log.attempt{n_before}.jsonl")
        fault_point("restart:log")
    entry = {"reason": restart.reason, "overrides": restart.overrides,
             "stopped_after_epoch": history[-1]["epoch"] if history else 0}
    write_json(path / ATTEMPTS, [*read_attempts(path), entry])
    return entry


# -- provenance -------------------------------------------------------------------------------

def timestamp(seconds: float | None = None) -> str:
    """Local time with microseconds and UTC offset (``datetime.fromisoformat`` reads it back)."""
    from datetime import datetime

    return datetime.fromtimestamp(time.time() if seconds is None else seconds).astimezone() \
        .isoformat(timespec="microseconds")


def write_run_record(path: Path, train_seconds: float, history: list[dict[str, Any]],
                     started_at: float | None = None, resumed_after_epoch: int = 0,
                     device: str | None = None) -> None:
    """``run.json``: timing, host, device and software of a finished run (not part of its
    result). ``device``: where this process predicted; ``epoch_devices``: where each epoch
    trained (a resumed run may have moved).

    ``started_at`` / ``finished_at``: when the attempt that finished the run began and ended
    (on a cluster, compare them only between runs of one host); ``resumed_after_epoch``: the
    epochs an earlier, interrupted attempt had completed (0: trained from scratch)."""
    import platform

    import steph

    record = {
        "train_seconds": round(float(train_seconds), 2),
        "started_at": timestamp(started_at) if started_at is not None else None,
        "finished_at": timestamp(),
        "resumed_after_epoch": int(resumed_after_epoch),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "steph": getattr(steph, "__version__", "unknown"),
        "threads": torch.get_num_threads(),
        "epoch_seconds": [r.get("seconds") for r in history],
        "device": device,
        "epoch_devices": [r.get("device") for r in history],
    }
    write_json(path / RUN_RECORD, record)


def read_run_record(path: str | Path) -> dict[str, Any]:
    """``run.json`` of a run, or {} when there is none (runs written before it existed)."""
    p = Path(path) / RUN_RECORD
    try:
        return read_json(p)
    except (OSError, ValueError):
        return {}


# -- a lease on a run: one process at a time, taken over when its holder died ------------------

LOCK_HEARTBEAT = 10.0  # seconds between two renewals of a held lease
LOCK_STALE_AFTER = 60.0  # a lease seen unchanged this long belongs to a process that died


def lock_path(path: str | Path) -> Path:
    """The lease file of the run directory ``path`` (beside it, so the run stays clean)."""
    path = Path(path)
    return path.parent / f".{path.name}.lock"


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
