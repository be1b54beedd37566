"""The contract between a module and the shared trainer, which does not know which method it
trains: :class:`SurvivalModule` declares every attribute and hook the trainer, the head start,
evaluation and inference use, with their defaults, so that no caller probes a module with
``getattr``. :func:`check_module` refuses a module that is not one, or that defines a hook-like
method the trainer would never call (a misspelt ``begin_steps`` would otherwise do nothing).

A module sees one bag at a time: ``module(features, **bag_inputs)`` returns hazard logits
``(1, n_bins)`` or a :class:`ModelOutput` (logits, an already weighted auxiliary loss, per-bag
statistics to log); ``bag_inputs`` are the dataset item's keys the module names in its
``bag_inputs`` attribute (e.g. Patch-GCN's ``("edge_index",)``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

# What the trainer calls on a module, when (see steph.training.trainer):
HOOKS = {
    "begin_step": "before the first bag of an optimiser step",
    "end_step": "after the last backward pass of a step, before optimizer.step()",
    "on_epoch_start": "before each epoch (0-based), on resume too",
}
_HOOK_LIKE = re.compile(r"^(on|begin|end|before|after)_")


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (1, n_bins) hazard logits
    aux_loss: torch.Tensor | None = None  # added to the survival loss (already weighted)
    # Per-bag quantities to average over an epoch and log (e.g. STEPH's w and lambda per source).
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class SurvivalModule(nn.Module):
    """Base class of every module the trainer trains or a run exports.

    Class-level declarations (override as class attributes or in ``__init__``):

    - ``bag_inputs``: names of the extra per-bag inputs ``forward`` takes as keyword arguments;
    - ``eval_in_pieces``: True when, in eval mode without autograd, a bag of any size is
      computed in pieces of bounded memory with the one-pass result (evaluation then never
      samples a bag's patches);
    - ``lr_scales``: ``{parameter-name prefix: factor}``: parameters that learn at a multiple of
      the learning rate (their own optimiser groups; e.g. AdaMerging's coefficients).

    Overridable methods: ``survival_head`` (the ``nn.Linear`` giving the hazard logits, which
    ``train.head_init`` sets before training; None: the module has none to set) and
    ``head_input`` (what enters it, for ``head_init: fit``); the hooks of :data:`HOOKS`;
    ``encoders_per_bag`` (MIL encoders one bag runs through at inference) and
    ``trainable_parameter_count``.
    """

    bag_inputs: ClassVar[tuple[str, ...]] = ()
    eval_in_pieces: ClassVar[bool] = False
    lr_scales: ClassVar[dict[str, float]] = {}

    @property
    def survival_head(self) -> nn.Linear | None:
        return None

    def head_input(self, x: torch.Tensor, **bag_inputs: torch.Tensor) -> torch.Tensor:
        """What enters ``survival_head`` for one bag, (1, d)."""
        raise NotImplementedError(f"{type(self).__name__} has no head_input")

    def begin_step(self) -> None:
        """Called before the first bag of an optimiser step."""

    def end_step(self) -> None:
        """Called after the last backward pass of an optimiser step, before the update."""

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each epoch (0-based), also when a run resumes."""

    def encoders_per_bag(self) -> int:
        """MIL encoders this module runs on one bag at inference (1: one network)."""
        return 1

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def check_module(module: Any, what: str = "the module") -> SurvivalModule:
    """``module`` if it keeps the trainer's contract; TypeError naming the problem if not: not a
    :class:`SurvivalModule`, or a method named like a hook (``on_*``, ``begin_*``, ``end_*``,
    ``before_*``, ``after_*``) that is not one of :data:`HOOKS`."""
    if not isinstance(module, SurvivalModule):
        raise TypeError(f"{what} ({type(module).__name__}) is not a steph.models.SurvivalModule")
    for cls in type(module).__mro__:
        if cls in (SurvivalModule, nn.Module, object):
            continue
        for name, value in vars(cls).items():
            if callable(value) and _HOOK_LIKE.match(name) and name not in HOOKS:
                raise TypeError(f"{what} ({type(module).__name__}) defines {name}(), which the "
                                f"trainer never calls; its hooks are {', '.join(HOOKS)}")
    return module


def as_output(out: torch.Tensor | ModelOutput) -> ModelOutput:
    return out if isinstance(out, ModelOutput) else ModelOutput(logits=out)


def module_bag_inputs(module: SurvivalModule, item: dict) -> dict[str, torch.Tensor]:
    """The extra per-bag inputs ``module`` declares, taken from a dataset item; they are passed
    as keyword arguments."""
    missing = [n for n in module.bag_inputs if n not in item]
    if missing:
        raise KeyError(f"{type(module).__name__} needs per-bag input(s) {missing}, which the "
                       "dataset does not provide")
    return {n: item[n] for n in module.bag_inputs}


def forward_item(module: SurvivalModule, item: dict) -> ModelOutput:
    """Run ``module`` on one dataset item: its bag plus the extra inputs it declares."""
    return as_output(module(item["features"], **module_bag_inputs(module, item)))
