"""The subspace alignment ratio of task-vector mixtures with the target's task vector (the
paper's Figure 5; the ratio itself: :mod:`steph.merging.analysis`, appendix A).

For a STEPH run, every source s and every weight matrix of the merged encoder:

    SAR(tau_t, tau_mix(lambda)),   tau_mix(lambda) = lambda tau_t + (1 - lambda) tau_s,

on a grid of lambda (0: the source's own task vector; 1: tau_t itself, whose dominant subspace
keeps all but at most (1 - alpha)^2 of its energy, so SAR >= sqrt(1 - (1 - alpha)^2) = 0.9987
at alpha = 0.95, and exactly 1 when tau_t has no more directions than that) and at the
lambda STEPH ended with for that source (the mean over the training bags of its last epoch).
The task vectors are read from the STEPH artefact (it carries theta_0 and the stacked task
vectors), so no other run and no feature is needed. Matrices with a single row or column are
left out (their dominant subspace is the whole space or one line: the ratio says nothing); for
ABMIL these are the feature projection ``feat_proj.0.weight`` and the gated attention's
``attention.a.0.weight`` / ``attention.b.0.weight``, the encoder's two layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from steph.analysis.cache import cache_key, read_cached, run_cache_path, write_cached
from steph.analysis.runs import RunRef, load_steph, weights_digest
from steph.merging.analysis import subspace_alignment_ratio

ALPHA = 0.95
LAMBDAS = np.round(np.linspace(0.0, 1.0, 21), 10)
COLUMNS = ["cohort", "method", "repeat", "fold", "source", "layer", "lambda", "sar", "kind"]
CURVE, STEPH_LAMBDA = "curve", "steph"


def sar_layers(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The matrices whose SAR is informative: 2-D with more than one row and column."""
    return [n for n, t in tensors.items() if t.dim() == 2 and min(t.shape) > 1]


def mixup_sar(tau_t: Mapping[str, torch.Tensor], tau_s: Mapping[str, torch.Tensor],
              lambdas: Sequence[float], alpha: float = ALPHA,
              layers: Sequence[str] | None = None) -> pd.DataFrame:
    """SAR(tau_t, lambda tau_t + (1 - lambda) tau_s) for every layer and lambda: columns
    layer, lambda, sar."""
    rows = []
    for name in (sar_layers(tau_t) if layers is None else layers):
        t, s = tau_t[name].double(), tau_s[name].double()
        for lam in lambdas:
            mix = float(lam) * t + (1.0 - float(lam)) * s
            rows.append({"layer": name, "lambda": float(lam),
                         "sar": subspace_alignment_ratio(t, mix, alpha=alpha)})
    return pd.DataFrame(rows, columns=["layer", "lambda", "sar"])


def steph_sar(runs_root: str | Path, run: RunRef, alpha: float = ALPHA,
              lambdas: Sequence[float] = tuple(LAMBDAS)) -> pd.DataFrame:
    """The SAR curves of every source of a STEPH run and the points at its final lambdas
    (``kind`` = curve / steph), cached under ``RUNS/.cache/analysis/sar``."""
    from steph.analysis.dynamics import last_epoch, steph_dynamics

    runs_root = Path(runs_root)
    final = last_epoch(steph_dynamics(runs_root, [run])).set_index("source")["lambda"]
    final = {s: float(v) for s, v in final.items() if np.isfinite(v)}
    key = cache_key("sar/1", weights_digest(run.path(runs_root)), alpha, list(lambdas), final)
    path = run_cache_path(runs_root, "sar", run)
    cached = read_cached(path, key)
    if cached is None:
        module = load_steph(runs_root, run)
        vectors = [module.layout.unflatten(module.tau[i]) for i in range(module.tau.shape[0])]
        tau_t = vectors[0]
        frames = []
        for i, source in enumerate(module.source_names, start=1):
            curve = mixup_sar(tau_t, vectors[i], lambdas, alpha).assign(source=source, kind=CURVE)
            frames.append(curve)
            if source in final:
                frames.append(mixup_sar(tau_t, vectors[i], [final[source]], alpha)
                              .assign(source=source, kind=STEPH_LAMBDA))
        table = pd.concat(frames, ignore_index=True)
        cached = table[["source", "layer", "lambda", "sar", "kind"]].values.tolist()
        write_cached(path, key, cached)
    out = pd.DataFrame(cached, columns=["source", "layer", "lambda", "sar", "kind"])
    for col, value in (("cohort", run.cohort), ("method", run.method), ("repeat", run.repeat),
                       ("fold", run.fold)):
        out[col] = value
    return out[COLUMNS]


def sar_at_steph(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of a :func:`steph_sar` table at STEPH's lambda, with the SAR of the source's
    own task vector (lambda = 0) beside them (``sar_own``)."""
    at = table[table["kind"] == "steph"]
    own = table[(table["kind"] == "curve") & (table["lambda"] == 0.0)].set_index(
        ["cohort", "fold", "source", "layer"])["sar"].rename("sar_own")
    return at.join(own, on=["cohort", "fold", "source", "layer"]).reset_index(drop=True)
