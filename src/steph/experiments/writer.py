"""The records of a finished run: predictions, the artefact, run.json and, written last,
metrics.json (which depends only on the command and the data, never on timing: reruns give the
same bytes)."""

from __future__ import annotations

import logging
import os
import platform
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from steph.data.cohort import Cohort
from steph.data.dataset import BagDataset
from steph.inference import save_artefact
from steph.methods import Built
from steph.runs import RunDir, RunRef
from steph.survival import metrics as M
from steph.survival.bins import TimeBins
from steph.survival.metrics import concordance_index_or_nan

log = logging.getLogger("steph.experiments")

# predict(module, bags) -> (frame of patient_id, risk, time, event; survival curves)
Predictor = Callable[[Any, BagDataset], tuple[pd.DataFrame, np.ndarray]]


@dataclass
class TrainedRun:
    """What training left for the writer."""

    built: Built
    history: list[dict[str, Any]]
    resumed_from: int  # epochs an earlier, interrupted attempt had completed
    info: dict[str, Any]  # facts for metrics.json (a search's choice, restarts)


def timestamp(seconds: float | None = None) -> str:
    """Local time with microseconds and UTC offset (``datetime.fromisoformat`` reads it back)."""
    from datetime import datetime

    return datetime.fromtimestamp(time.time() if seconds is None else seconds).astimezone() \
        .isoformat(timespec="microseconds")


def run_record(train_seconds: float, history: list[dict[str, Any]],
               started_at: float | None = None, resumed_after_epoch: int = 0,
               device: str | None = None) -> dict[str, Any]:
    """``run.json``: timing, host, device and software of a finished run (not part of its
    result). ``device``: where this process predicted; ``epoch_devices``: where each epoch
    trained (a resumed run may have moved).

    ``started_at`` / ``finished_at``: when the attempt that finished the run began and ended
    (on a cluster, compare them only between runs of one host); ``resumed_after_epoch``: the
    epochs an earlier, interrupted attempt had completed (0: trained from scratch)."""
    import steph

    return {
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


def extra_metrics(train: pd.DataFrame, test: pd.DataFrame, curves: np.ndarray,
                  bins: TimeBins) -> dict[str, float]:
    """Uno's IPCW C-index and the integrated Brier score, when the data allow them."""
    out: dict[str, float] = {}
    args = (train["time"].to_numpy(), train["event"].to_numpy(), test["time"].to_numpy(),
            test["event"].to_numpy())
    try:
        out["uno_c_index"] = float(M.uno_concordance_index(*args, test["risk"].to_numpy()))
    except (ValueError, AttributeError):
        pass
    try:
        times = bins.end_times
        lo, hi = test["time"].min(), test["time"].max()
        keep = (times >= lo) & (times < hi)
        if keep.sum() >= 2:
            out["ibs"] = float(M.integrated_brier_score(*args, curves[:, keep], times[keep]))
    except (ValueError, AttributeError):
        pass
    return out


def frame_cindex(pred: pd.DataFrame) -> float:
    return concordance_index_or_nan(pred["time"], pred["event"], pred["risk"])


def write_run(run: RunDir, ref: RunRef, trained: TrainedRun, *, bins: TimeBins, cohort: Cohort,
              n_train: int, train_eval: BagDataset, test_eval: BagDataset,
              eval_facts: dict[str, Any], predict: Predictor, seconds: float,
              started_at: float | None, device: str) -> dict[str, Any]:
    """Predict the training and test bags as evaluation sees them (``train_eval``,
    ``test_eval``), then write predictions.csv, the artefact, run.json and, last,
    metrics.json; return the metrics."""
    built, history = trained.built, trained.history
    module = built.export() if built.export is not None else built.module
    test_pred, test_curves = predict(module, test_eval)
    train_pred, _ = predict(module, train_eval)
    preds = pd.concat([train_pred.assign(split="train"), test_pred.assign(split="test")])
    preds = preds[["patient_id", "split", "risk", "time", "event"]]
    metrics: dict[str, Any] = {
        "cohort": ref.cohort, "method": ref.method, "fold": ref.fold, "repeat": ref.repeat,
        "c_index": frame_cindex(test_pred), "train_c_index": frame_cindex(train_pred),
        "n_train": n_train, "n_test": len(test_eval),
        "test_events": int(test_pred["event"].sum()),
        "epochs": len(history),
    }
    metrics.update(eval_facts)
    metrics.update(extra_metrics(train_pred, test_pred, test_curves, bins))
    if built.info is not None:
        metrics.update(built.info(history))
    metrics.update(trained.info)
    save_artefact(run.weights, module, built.kind, built.settings(), bins, cohort.feature_dim,
                  info={"cohort": ref.cohort, "method": ref.method, "fold": ref.fold,
                        "repeat": ref.repeat})
    run.write_predictions(preds)
    # epochs that ran before a resume count too: their times are in the history
    train_seconds = sum(r.get("seconds", 0.0) for r in history) if history else seconds
    run.write_record(run_record(train_seconds, history, started_at=started_at,
                                resumed_after_epoch=trained.resumed_from, device=device))
    run.write_metrics(metrics)  # last: the run is finished
    run.checkpoint.unlink(missing_ok=True)
    log.info("%s: test C-index %.4f", ref, metrics["c_index"])
    return metrics
