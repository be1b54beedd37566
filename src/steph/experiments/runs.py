"""Run directories: the unit of work and of resumption.

``RUNS/<cohort>/<method>/fold<k>/`` holds ``config.yaml`` (the effective settings), the training
``log.jsonl`` and ``checkpoint.safetensors`` while it trains, then ``model.safetensors`` +
``model.json`` (a self-contained artefact), ``predictions.csv``, ``run.json`` (how long it took,
where and with what software: everything that may differ between two runs of the same command)
and, written last, ``metrics.json`` (only what the command and the data decide, so reruns give
the same bytes): a run is finished when its metrics file exists.

``RUNS/theta0.safetensors`` is the shared initialisation of every cancer-specific model of the
experiment directory, created once. ``RUNS/splits/<cohort>/`` holds the folds when the cohort
brings none.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from steph.config import ModelConfig, without_performance_keys
from steph.errors import RunError
from steph.models import ABMIL
from steph.utils.io import load_tensors, read_json, save_tensors, write_json, write_text

THETA0 = "theta0.safetensors"
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

def theta0_identity(model_cfg: ModelConfig, in_dim: int, n_bins: int) -> dict[str, Any]:
    return {
        "hparams": {"in_dim": in_dim, "n_bins": n_bins, "hidden_dim": model_cfg.hidden_dim,
                    "attn_dim": model_cfg.attn_dim, "dropout": model_cfg.dropout},
        "init_seed": model_cfg.init_seed,
        "model": model_cfg.name,
    }


def ensure_theta0(root: str | Path, model_cfg: ModelConfig, in_dim: int, n_bins: int) -> Path:
    """Create ``theta0.safetensors`` once; afterwards check it matches the requested model."""
    root = Path(root)
    path = root / THETA0
    meta_path = path.with_suffix(".json")
    ident = theta0_identity(model_cfg, in_dim, n_bins)
    if path.exists() and meta_path.exists():
        found = read_json(meta_path)
        if found.get("hparams") != ident["hparams"] or found.get("init_seed") != ident["init_seed"]:
            raise RunError(
                f"{path} was created for {found.get('hparams')} (seed {found.get('init_seed')}) but "
                f"this run needs {ident['hparams']} (seed {ident['init_seed']}): every model of an "
                "experiment directory must start from the same theta_0; use another --out"
            )
        return path
    torch.manual_seed(model_cfg.init_seed)
    model = ABMIL(**ident["hparams"])
    save_tensors(path, model.state_dict())
    write_json(meta_path, ident)
    return path


def load_theta0(root: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(root) / THETA0
    if not path.exists():
        raise RunError(f"no shared initialisation at {path}")
    return load_tensors(path), read_json(path.with_suffix(".json"))


# -- run config -------------------------------------------------------------------------------

def check_or_write_config(path: Path, settings: dict[str, Any]) -> None:
    """Save the effective settings; a run started with other settings is an error, not a mix."""
    cfg_path = path / CONFIG
    if cfg_path.exists():
        # performance-only keys (data.cache_mb, train.threads) never make two runs differ
        found = without_performance_keys(yaml.safe_load(cfg_path.read_text()) or {})
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
    for ckpt in path.glob(CHECKPOINT.replace(".safetensors", "*.safetensors")):
        ckpt.unlink()
    if log_path.exists():
        os.replace(log_path, path / f"log.attempt{n_before}.jsonl")
    entry = {"reason": restart.reason, "overrides": restart.overrides,
             "stopped_after_epoch": history[-1]["epoch"] if history else 0}
    write_json(path / ATTEMPTS, [*read_attempts(path), entry])
    return entry


# -- provenance -------------------------------------------------------------------------------

def write_run_record(path: Path, train_seconds: float, history: list[dict[str, Any]],
                     device: str | None = None) -> None:
    """``run.json``: timing, host, device and software of a finished run (not part of its
    result). ``device``: where this process predicted; ``epoch_devices``: where each epoch
    trained (a resumed run may have moved)."""
    import platform

    import steph

    record = {
        "train_seconds": round(float(train_seconds), 2),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
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


# -- a lock so that several processes (a cluster job array) can share one runs directory --------

@dataclass
class RunLock:
    path: Path
    stale_after: float = 6 * 3600.0  # a lock untouched this long is from a dead process

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if self._is_stale():
                self.path.unlink(missing_ok=True)
                return self.acquire()
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{socket.gethostname()} {os.getpid()} {time.time()}\n")
        return True

    def _is_stale(self) -> bool:
        try:
            host, pid, _ = self.path.read_text().split()
        except (OSError, ValueError):
            return True
        if host == socket.gethostname():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return True  # that process is gone
            except PermissionError:
                return False
            return False
        try:
            return time.time() - self.path.stat().st_mtime > self.stale_after
        except FileNotFoundError:
            return True

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
