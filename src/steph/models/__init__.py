"""MIL survival networks behind a small registry (and the registry of artefact kinds); every
network follows the interface of :mod:`steph.models.base` (one bag in, hazard logits out;
named encoder and head)."""

from typing import Any

from steph.models.abmil import ABMIL, ENCODER_PREFIXES, HEAD_PREFIX, encoder_parameter_names
from steph.models.base import EmbedCall, MILNetwork, init_fresh_head
from steph.models.ilra import ILRA
from steph.models.patch_gcn import PatchGCN
from steph.models.r2t_mil import R2TMIL
from steph.models.registry import (
    artefact_kinds,
    build_artefact,
    create_model,
    list_models,
    model_class,
    register_artefact,
    register_model,
)
from steph.models.transmil import TransMIL

NETWORKS = {"abmil": ABMIL, "transmil": TransMIL, "ilra": ILRA, "r2t_mil": R2TMIL,
            "patch_gcn": PatchGCN}


def _artefact_builder(cls: type[MILNetwork]):
    def build(settings: dict[str, Any]) -> MILNetwork:
        return cls(**settings)  # settings: the network's hparams()
    return build


# every network is a model (by name) and an artefact kind of the same name (a cancer-specific
# model, or a merge exported as a plain network)
for _name, _cls in NETWORKS.items():
    register_model(_name)(_cls)
    register_artefact(_name)(_artefact_builder(_cls))


__all__ = [
    "ABMIL",
    "ENCODER_PREFIXES",
    "HEAD_PREFIX",
    "ILRA",
    "NETWORKS",
    "R2TMIL",
    "EmbedCall",
    "MILNetwork",
    "PatchGCN",
    "TransMIL",
    "artefact_kinds",
    "build_artefact",
    "create_model",
    "encoder_parameter_names",
    "init_fresh_head",
    "list_models",
    "model_class",
    "register_artefact",
    "register_model",
]
