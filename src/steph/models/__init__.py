"""MIL survival networks behind a small registry (and the registry of artefact kinds); every
network follows the interface of :mod:`steph.models.base` (one bag in, hazard logits out;
named encoder and head) and registers itself where it is defined (``@register_model``).
Every module the trainer trains is a :class:`SurvivalModule` (:mod:`steph.models.module`)."""

# Importing the networks registers them, in this order (the order of ``list_models()``).
from steph.models.abmil import ABMIL  # isort: skip
from steph.models.transmil import TransMIL  # isort: skip
from steph.models.ilra import ILRA  # isort: skip
from steph.models.r2t_mil import R2TMIL  # isort: skip
from steph.models.patch_gcn import PatchGCN  # isort: skip
from steph.models.base import EmbedCall, MILNetwork, init_fresh_head
from steph.models.module import ModelOutput, SurvivalModule, check_module, forward_item
from steph.models.registry import (
    artefact_kinds,
    build_artefact,
    create_model,
    list_models,
    model_class,
    model_title,
    register_artefact,
    register_model,
)

__all__ = [
    "ABMIL",
    "ILRA",
    "EmbedCall",
    "MILNetwork",
    "ModelOutput",
    "PatchGCN",
    "R2TMIL",
    "SurvivalModule",
    "TransMIL",
    "artefact_kinds",
    "build_artefact",
    "check_module",
    "create_model",
    "forward_item",
    "init_fresh_head",
    "list_models",
    "model_class",
    "model_title",
    "register_artefact",
    "register_model",
]
