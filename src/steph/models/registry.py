"""Registries of the model layer (in the spirit of timm):

* **MIL networks** by name (``register_model`` / ``create_model``), so that configs, run
  directories and artefacts can name the architecture they hold;
* **artefact kinds** (``register_artefact`` / ``build_artefact``): how to rebuild an empty module
  of a saved kind from its manifest's settings. Each module registers its kind where it is
  defined (the MIL networks in ``steph.models``, each under its model name; STEPH and the merged baselines in ``steph.merging``);
  :func:`steph.inference.load_artefact` imports those packages and looks the kind up here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from steph.errors import ConfigError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_ARTEFACTS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_class(name: str) -> Callable[..., nn.Module]:
    """The registered factory (for steph's networks: the class) of model ``name``; its class
    attributes (``ENCODER_PREFIXES``, ``bag_inputs``, ``eval_in_pieces``) describe the network
    without building it."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _REGISTRY[name]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    factory = model_class(name)
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:  # an unknown keyword, e.g. a misspelt model.options entry
        raise ConfigError(f"model {name!r}: {e}") from None
    return factory(**kwargs)


def register_artefact(kind: str) -> Callable:
    """Decorator: ``fn(settings) -> empty module`` rebuilds artefacts of ``kind``."""

    def deco(fn: Callable[[dict[str, Any]], nn.Module]) -> Callable[[dict[str, Any]], nn.Module]:
        if kind in _ARTEFACTS and _ARTEFACTS[kind] is not fn:
            raise ValueError(f"artefact kind {kind!r} is already registered")
        _ARTEFACTS[kind] = fn
        return fn

    return deco


def artefact_kinds() -> list[str]:
    return sorted(_ARTEFACTS)


def build_artefact(kind: str, settings: dict[str, Any]) -> nn.Module:
    if kind not in _ARTEFACTS:
        raise KeyError(kind)
    return _ARTEFACTS[kind](settings)
