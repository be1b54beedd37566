"""Where a model's survival head starts before training (``train.head_init``), for every method.

The paper's protocol (lr 1e-4, 16 bags per step, 20 epochs) gives a small cohort about a hundred
optimiser steps; in that budget the head barely moves (Adam moves a weight by about lr per step),
so a model's ranking is decided by where its head starts. Modes:

``reference``  the head as the module built it: the cancer-specific ABMIL keeps theta_0's head,
               a fresh head (STEPH, AdaMerging) is drawn at random, bias included. This is the
               reference release; a random head is a random projection whose sign decides the
               ranking, and its bias predicts a hazard near 0.5 in every bin.
``baseline``   the bias at the logit of the training split's baseline hazard (so the model
               starts calibrated), the weights as built (random).
``null``       the bias at the baseline hazard and the weights at zero: the model starts as
               the null survival model (the same curve for every patient), and the first steps
               move the weights along the score direction rather than against a random sign.
``fit``        the head fitted to the initial representation: a proportional-hazards read-out
               ``logit_j = c_j + v . z`` of the training bags' embeddings z under the initial
               model, by penalised maximum likelihood of the training loss, the ridge penalty
               chosen by an inner cross-validation of the C-index on the training patients.

A module takes part by exposing ``survival_head`` (the ``nn.Linear`` that gives the hazard
logits) and, for ``fit``, ``head_input(features, **bag_inputs) -> (1, d)`` (what enters that
head). The trainer calls :func:`initialize_head` once, before the first epoch of a fresh run.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from steph.models.module import module_bag_inputs
from steph.survival.baseline import baseline_hazard_logits
from steph.survival.loss import nll_survival_loss
from steph.survival.metrics import concordance_index_or_nan

log = logging.getLogger("steph.training")

HEAD_INITS = ("reference", "baseline", "null", "fit")
RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
# A fitted head whose logits spread this many times wider on training-mode embeddings than on
# the eval-mode ones it was fitted to is refitted on the training-mode ones.
NOISE_RATIO_LIMIT = 3.0
NOISE_CHECK_BAGS = 32  # bags the ratio is measured on (the first of the training order)


def initialize_head(model: nn.Module, train: Sequence[dict[str, Any]], mode: str,
                    loss_alpha: float, seed: int = 0,
                    items: Callable[[], Iterable[dict[str, Any]]] | None = None
                    ) -> dict[str, Any]:
    """Set ``model.survival_head`` as ``mode`` says; returns facts to log (e.g. the ridge).

    ``items``: the training items in order, on the model's device (the trainer's data
    pipeline); default: ``train`` itself. Labels are taken from a bag dataset's label arrays
    without reading a bag."""
    if mode not in HEAD_INITS:
        raise ValueError(f"head_init must be one of {HEAD_INITS}, got {mode!r}")
    head = model.survival_head
    if mode == "reference" or head is None:
        return {}
    bins, events, times = _labels(train)
    base = baseline_hazard_logits(bins, events, head.out_features)
    with torch.no_grad():
        head.bias.copy_(base.to(head.bias))
        if mode == "null":
            head.weight.zero_()
    if mode != "fit":
        return {}
    z = head_inputs(model, train if items is None else items())
    weight, bias, info = fit_ph_head(z, bins, events, times, base, loss_alpha, seed=seed)
    # Training runs the network in training mode (dropout). A head fitted to an embedding whose
    # spread between patients is small next to that noise (Patch-GCN's) would see logits many
    # times wider than the fit's and diverge at the first step: then refit it on the
    # training-mode embeddings it will see (the RNG forked: training's own draws are unchanged).
    # The check needs a few bags (NOISE_CHECK_BAGS), not a second pass over all of them.
    def noisy_inputs(limit: int | None) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            data = train if items is None else items()
            return head_inputs(model, itertools.islice(data, limit), training=True)

    noisy = noisy_inputs(NOISE_CHECK_BAGS)
    w = weight[0].double()
    ratio = float((noisy @ w).std() / (z[:len(noisy)] @ w).std().clamp_min(1e-12))
    info["head_noise_ratio"] = round(ratio, 3)
    if ratio > NOISE_RATIO_LIMIT:
        weight, bias, refit = fit_ph_head(noisy_inputs(None), bins, events, times, base,
                                          loss_alpha, seed=seed)
        info.update(refit, head_fit_on="training-mode embeddings")
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight))
        head.bias.copy_(bias.to(head.bias))
    return info


def _labels(train: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bin, event and time of every training bag (a BagDataset's arrays: no bag is read)."""
    if all(hasattr(train, a) for a in ("bin_indices", "events", "times")):
        return (np.asarray(train.bin_indices), np.asarray(train.events),
                np.asarray(train.times, dtype=float))
    rows = [(int(item["bin"]), int(item["event"]), float(item["time"])) for item in train]
    bins, events, times = zip(*rows) if rows else ((), (), ())
    return np.array(bins, dtype=np.int64), np.array(events, dtype=np.int64), np.array(times)


@torch.no_grad()
def head_inputs(model: nn.Module, data: Iterable[dict[str, Any]],
                training: bool = False) -> torch.Tensor:
    """What enters the head for every bag, in eval mode (n, d), float64 on the CPU (computed
    where the model and the items are; copied to the host once). ``training``: in training
    mode instead (dropout on)."""
    was_training = model.training
    model.train(training)
    try:
        rows = [model.head_input(item["features"], **module_bag_inputs(model, item)).reshape(-1)
                for item in data]
    finally:
        model.train(was_training)
    return torch.stack(rows).double().cpu()


def _fit_v(x: torch.Tensor, bins: torch.Tensor, events: torch.Tensor, c0: torch.Tensor,
           alpha: float, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Penalised ML of logit_ij = c_j + x_i . v (x standardised): L-BFGS in float64."""
    v = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    c = c0.clone().double().requires_grad_(True)
    opt = torch.optim.LBFGS([v, c], lr=1.0, max_iter=200, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = c[None, :] + (x @ v)[:, None]
        loss = nll_survival_loss(logits, bins, events, alpha=alpha) + 0.5 * ridge * (v @ v)
        loss.backward()
        return loss

    opt.step(closure)
    return v.detach(), c.detach()


def _folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return [order[i::k] for i in range(k)]


def fit_ph_head(z: torch.Tensor, bins: np.ndarray, events: np.ndarray, times: np.ndarray,
                base_logits: torch.Tensor, alpha: float, seed: int = 0,
                grid: Sequence[float] = RIDGE_GRID, n_folds: int = 3
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Head weight (n_bins, d) and bias (n_bins,) of a proportional-hazards read-out of ``z``.

    The ridge is chosen by ``n_folds``-fold cross-validation of Harrell's C on the given
    (training) patients, ties to the larger ridge; then refitted on all of them."""
    z = z.double()
    mu, sd = z.mean(0), z.std(0)
    # Features (almost) constant over the training patients get no weight: standardised, their
    # tiny spread would become a huge weight, and in training (dropout on) or on new patients
    # they vary far more than here (Patch-GCN's embedding has such features: the head start
    # then diverged at the first step).
    keep = sd > 1e-3 * float(sd.median().clamp_min(1e-12))
    sd = torch.where(keep, sd, torch.ones_like(sd))
    x = (z - mu) / sd * keep
    b = torch.as_tensor(bins, dtype=torch.int64)
    e = torch.as_tensor(events, dtype=torch.int64)
    scores = []
    for ridge in grid:
        cs = []
        for val in _folds(len(x), n_folds, seed):
            fit = np.setdiff1d(np.arange(len(x)), val)
            v, _ = _fit_v(x[fit], b[fit], e[fit], base_logits, alpha, ridge)
            c = concordance_index_or_nan(times[val], events[val], (x[val] @ v).numpy())
            if np.isfinite(c):  # a fold without a comparable pair does not count
                cs.append(c)
        scores.append(float(np.mean(cs)) if cs else float("nan"))
    finite = [(s, r) for s, r in zip(scores, grid) if np.isfinite(s)]
    ridge = max(finite)[1] if finite else max(grid)  # ties: larger ridge (max of (s, r))
    v, c = _fit_v(x, b, e, base_logits, alpha, ridge)
    n_bins = base_logits.numel()
    v = v * keep
    weight = (v / sd).float().expand(n_bins, -1).clone()
    bias = (c - (v / sd) @ mu).float()
    info = {"head_ridge": ridge, "head_cv_cindex": dict(zip(map(str, grid), scores))}
    return weight, bias, info
