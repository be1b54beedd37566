"""MIL survival networks behind a small registry (and the registry of artefact kinds)."""

from typing import Any

from steph.models.abmil import ABMIL, ENCODER_PREFIXES, HEAD_PREFIX, encoder_parameter_names
from steph.models.registry import (
    artefact_kinds,
    build_artefact,
    create_model,
    list_models,
    register_artefact,
    register_model,
)

register_model("abmil")(ABMIL)


@register_artefact("abmil")
def _abmil_artefact(settings: dict[str, Any]) -> ABMIL:
    return ABMIL(**settings)


__all__ = [
    "ABMIL",
    "ENCODER_PREFIXES",
    "HEAD_PREFIX",
    "artefact_kinds",
    "build_artefact",
    "create_model",
    "encoder_parameter_names",
    "list_models",
    "register_artefact",
    "register_model",
]
