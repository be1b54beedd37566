"""Inference FLOPs of a MIL network on one bag, counted two ways.

``total`` is everything ``torch.utils.flop_counter`` counts (matrix products, convolutions,
attention kernels; 2 FLOPs per multiply-add). ``layers`` keeps only what runs inside
``nn.Linear`` and ``nn.Conv*`` modules, i.e. what a counter that hooks layers rather than
operations sees: functional matrix products (Nystrom or regional attention scores) are left
out. Table S4 of the STEPH appendix matches ``layers`` for TransMIL and R2T-MIL (see
docs/method-notes.md). Neither counts element-wise work, softmax, normalisation or the
scatter/gather of graph message passing.

A model built on the ``meta`` device with a ``meta`` input is counted without computing
anything (seconds for a 10,000-instance bag).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class FlopCount:
    total: int
    layers: int


def count_flops(model: nn.Module, x: torch.Tensor, **bag_inputs: torch.Tensor) -> FlopCount:
    """FLOPs of one inference forward of ``model`` (in eval mode) on the bag ``x``."""
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x, **bag_inputs)
    finally:
        model.train(was_training)
    per_module = counter.get_flop_counts()
    root = type(model).__name__
    layers = sum(sum(per_module.get(f"{root}.{name}", {}).values())
                 for name, m in model.named_modules() if name and isinstance(m, LAYER_TYPES))
    return FlopCount(total=int(counter.get_total_flops()), layers=int(layers))
