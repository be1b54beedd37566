"""MIL survival networks behind a small registry."""

from steph.models.abmil import ABMIL, ENCODER_PREFIXES, HEAD_PREFIX, encoder_parameter_names
from steph.models.registry import create_model, list_models, register_model

register_model("abmil")(ABMIL)

__all__ = [
    "ABMIL",
    "ENCODER_PREFIXES",
    "HEAD_PREFIX",
    "create_model",
    "encoder_parameter_names",
    "list_models",
    "register_model",
]
