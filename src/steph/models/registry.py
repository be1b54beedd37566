"""Registries of the model layer (in the spirit of timm):

* **MIL networks** by name: each network registers itself where its class is defined, with
  ``@register_model("abmil", title="ABMIL")``. A registered network is a model of that name
  (``create_model``), an artefact kind of that name (a cancer-specific model, or a merge
  exported as a plain network) and, in :mod:`steph.methods.networks`, a cancer-specific
  method; its hyper-parameters are the typed ``model.options.<name>`` of the config
  (:class:`steph.config.NetworksConfig`). ``list_models()`` enumerates them: nothing else keeps
  a list of networks.
* **artefact kinds** (``register_artefact`` / ``build_artefact``): how to rebuild an empty module
  of a saved kind from its manifest's settings. Each module registers its kind where it is
  defined (STEPH and the merged baselines in ``steph.merging``, ROUPKT in ``steph.transfer``);
  :func:`steph.inference.load_artefact` imports those packages and looks the kind up here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from steph.errors import ConfigError


@dataclass(frozen=True)
class NetworkEntry:
    name: str
    cls: type[nn.Module]
    title: str  # how tables and figures name it, e.g. "Patch-GCN"


_NETWORKS: dict[str, NetworkEntry] = {}
_ARTEFACTS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {}


def register_model(name: str, title: str | None = None) -> Callable[[type], type]:
    """Class decorator: register a MIL network as model ``name`` and as the artefact kind of
    the same name (rebuilt from its ``hparams()``)."""

    def deco(cls: type) -> type:
        if name in _NETWORKS:
            raise ValueError(f"model {name!r} is already registered")
        _NETWORKS[name] = NetworkEntry(name, cls, title or name)
        register_artefact(name)(lambda settings: cls(**settings))
        return cls

    return deco


def list_models() -> list[str]:
    """Every registered network, in registration order (ABMIL first)."""
    return list(_NETWORKS)


def model_title(name: str) -> str:
    return _NETWORKS[name].title if name in _NETWORKS else name


def model_class(name: str) -> type[nn.Module]:
    """The class of network ``name``; its class attributes (``ENCODER_PREFIXES``,
    ``bag_inputs``, ``eval_in_pieces``) describe the network without building it."""
    if name not in _NETWORKS:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _NETWORKS[name].cls


def create_model(name: str, **kwargs: Any) -> nn.Module:
    factory = model_class(name)
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:  # an unknown keyword
        raise ConfigError(f"model {name!r}: {e}") from None
    return factory(**kwargs)


def register_artefact(kind: str) -> Callable:
    """Decorator: ``fn(settings) -> empty module`` rebuilds artefacts of ``kind``."""

    def deco(fn: Callable[[dict[str, Any]], nn.Module]) -> Callable[[dict[str, Any]], nn.Module]:
        if kind in _ARTEFACTS:
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
