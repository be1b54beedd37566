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


def as_output(out: torch.Tensor | ModelOutput) -> ModelOutput:
    return out if isinstance(out, ModelOutput) else ModelOutput(logits=out)
