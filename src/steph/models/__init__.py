"""MIL survival networks behind a small registry (and the registry of artefact kinds); every
network follows the interface of :mod:`steph.models.base` (one bag in, hazard logits out;
named encoder and head)."""

from typing import Any

from steph.models.abmil import ABMIL, ENCODER_PREFIXES, HEAD_PREFIX, encoder_parameter_names
from steph.models.base import MILNetwork
from steph.models.ilra import ILRA
from steph.models.patch_gcn import PatchGCN
from steph.models.r2t_mil import R2TMIL
from steph.models.registry import (
    artefact_kinds,
    build_artefact,
    create_model,
    list_models,
    register_artefact,
    register_model,
)
from steph.models.transmil import TransMIL

register_model("abmil")(ABMIL)
register_model("transmil")(TransMIL)
register_model("ilra")(ILRA)
register_model("r2t_mil")(R2TMIL)
register_model("patch_gcn")(PatchGCN)


@register_artefact("abmil")
def _abmil_artefact(settings: dict[str, Any]) -> ABMIL:
    return ABMIL(**settings)


__all__ = [
    "ABMIL",
    "ENCODER_PREFIXES",
    "HEAD_PREFIX",
    "ILRA",
    "R2TMIL",
    "MILNetwork",
    "PatchGCN",
    "TransMIL",
    "artefact_kinds",
    "build_artefact",
    "create_model",
    "encoder_parameter_names",
    "list_models",
    "register_artefact",
    "register_model",
]
