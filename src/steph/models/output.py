"""What a survival module returns to the trainer (which does not know which method it trains)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (1, n_bins) hazard logits
    aux_loss: torch.Tensor | None = None  # added to the survival loss (already weighted)
    # Per-bag quantities to average over an epoch and log (e.g. STEPH's w and lambda per source).
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class TrainingRestart(Exception):
    """Raised by a module's ``on_epoch_end(row)`` hook to ask for its run to start again from
    scratch with other settings (``overrides``: dotted config keys, e.g. ``{"steph.gamma":
    0.01}``); the trainer has already written that epoch's log. The experiment records the
    attempt and restarts (see steph.experiments.cv)."""

    def __init__(self, reason: str, overrides: dict[str, object]):
        super().__init__(reason)
        self.reason = reason
        self.overrides = dict(overrides)


def as_output(out: torch.Tensor | ModelOutput) -> ModelOutput:
    return out if isinstance(out, ModelOutput) else ModelOutput(logits=out)


def module_bag_inputs(module: object, item: dict) -> dict[str, torch.Tensor]:
    """The extra per-bag inputs ``module`` declares (its ``bag_inputs`` attribute, e.g.
    ``("edge_index",)``), taken from a dataset item; they are passed as keyword arguments."""
    names = getattr(module, "bag_inputs", ()) or ()
    missing = [n for n in names if n not in item]
    if missing:
        raise KeyError(f"{type(module).__name__} needs per-bag input(s) {missing}, which the "
                       "dataset does not provide")
    return {n: item[n] for n in names}


def forward_item(module, item: dict) -> ModelOutput:
    """Run ``module`` on one dataset item: its bag plus the extra inputs it declares."""
    return as_output(module(item["features"], **module_bag_inputs(module, item)))
