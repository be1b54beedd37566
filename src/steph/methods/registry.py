"""The method registry: every name ``steph cv --methods`` knows, each a small recipe.

A :class:`Method` says what a run needs (only theta_0, or the model pool of its target fold)
and how to build the module the shared trainer trains (:class:`Built`). The trainer never
learns which method it trains; the experiment grid never learns how a method works.

Recipes live beside this file (``networks.py``, ``steph.py``, ``model_merging.py``); importing
``steph.methods`` registers them all.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from steph.config import ExperimentConfig, without_performance_keys
from steph.errors import ConfigError
from steph.merging.pool import ModelPool
from steph.models.module import SurvivalModule
from steph.survival.bins import TimeBins

# A provider of one extra per-bag input: patient id -> tensor (e.g. a graph, cached embeddings).
BagInputProvider = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class InnerTarget:
    """One of a run's inner target models (cross-fitting): the target's own network trained
    from theta_0 on all of the run's training patients but ``held_out``."""

    weights: Path
    held_out: tuple[str, ...]  # the training patients this model never saw
    c_index: float  # its C-index on them


@dataclass
class MethodContext:
    """Everything a recipe may use to build its module for one run (cohort, fold)."""

    cfg: ExperimentConfig
    target: str
    fold: int
    hparams: dict[str, Any]  # hyper-parameters of network ``arch`` (from its theta_0)
    theta0: dict[str, torch.Tensor]  # network ``arch``'s shared initialisation
    bins: TimeBins
    n_patients: int  # size of the target cohort
    n_train: int
    pool_loader: Callable[[], ModelPool] | None = None
    train_bins: Any = None  # bin index and event of every training bag (for a fresh head's bias)
    train_events: Any = None
    run_dir: Path | None = None  # the run's directory (for caches a method keeps with its run)
    train_data: Any = None  # the training and test bag datasets (read-only for recipes)
    test_data: Any = None
    arch: str = "abmil"  # the network of theta0 / hparams (Method.arch, or model.arch)
    cohort: Any = None  # the target cohort (steph.data.cohort.Cohort)
    graph_dir: Path | None = None  # cache of the cohort's patch graphs (RUNS/graphs/<cohort>)
    # The source cohorts of the run (every cohort but the target unless --sources says) and how
    # to load one (the experiment's cohort cache), for methods that read their patients.
    sources: list[str] = field(default_factory=list)
    load_cohort: Callable[[str], Any] | None = None
    graph_dirs: Callable[[str], Path] | None = None  # patch-graph cache of any cohort
    # The run's inner target models, when the method asked for them (Method.inner_targets).
    inner_targets: list[InnerTarget] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def pool(self) -> ModelPool:
        if self.pool_loader is None:
            raise ConfigError("this method needs source models but no model pool was given")
        if "pool" not in self.extra:
            self.extra["pool"] = self.pool_loader()
        return self.extra["pool"]


@dataclass
class Built:
    """A method's module plus how to save it as a self-contained artefact."""

    module: SurvivalModule
    kind: str  # artefact kind (steph.models.registry.register_artefact)
    settings: Callable[[], dict[str, Any]]  # read after training
    export: Callable[[], SurvivalModule] | None = None  # module to save (default: ``module``)
    # Extra per-bag inputs the module takes as keyword arguments (its ``bag_inputs``), provided
    # per patient; the experiment attaches them to the training and test datasets.
    bag_inputs: Mapping[str, BagInputProvider] = field(default_factory=dict)
    # Small facts about the run to record in metrics.json (e.g. the gamma it trained with),
    # from the training history (the rows of log.jsonl).
    info: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None
    # Called by the trainer with each epoch's log row, after it is written (and on resume for
    # the last one); may raise steph.training.TrainingRestart to start the run again with other
    # settings (e.g. STEPH's collapse guard).
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None
    # The bags the trainer trains on, when not the target's training split (e.g. joint
    # training: the target's training split plus every source cohort's patients).
    train_data: Any = None


@dataclass(frozen=True)
class SearchSpec:
    """A hyper-parameter a method wants chosen by inner cross-validation on the training
    patients before it is built (see steph.experiments.search)."""

    key: str  # dotted config key, e.g. "steph.gamma"
    grid: tuple[Any, ...]
    folds: int = 3
    prefer: str = "larger"  # tie-break between equal mean scores: "larger" or "smaller" value
    target_model: str = "inner"  # "inner": inner target models; "outer": the fold's own model


@dataclass(frozen=True)
class CostSpec:
    """The setting of an efficiency measurement (Table S4 / ``steph bench efficiency``)."""

    in_dim: int = 1536
    n_bins: int = 32
    n_sources: int = 12  # m: source cohorts of a transfer method
    n_instances: int = 10_000  # patches of the measured bag
    arch: str = "abmil"  # the backbone (model.arch) of merged / transferred models


# cost_model(spec) -> (module in eval mode as it runs at inference, with random weights where
# weights would come from training; the extra per-bag inputs for a bag of spec.n_instances).
# Its learnable-parameter count is ``module.trainable_parameter_count()`` when defined, else
# the parameters with requires_grad.
CostModel = Callable[[CostSpec], tuple[nn.Module, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    needs_pool: bool
    trains: bool
    build: Callable[[MethodContext], Built]
    config_sections: tuple[str, ...] = ("data", "bins", "model", "train")
    # Settings to choose by inner cross-validation before building (None: nothing to choose).
    search: Callable[[ExperimentConfig], SearchSpec | None] | None = None
    # The module as it runs at inference, for efficiency figures (None: not measured).
    cost_model: CostModel | None = None
    # The network whose theta_0 and hyper-parameters the context carries and whose runs the
    # pool holds: a cancer-specific method names its own (e.g. "transmil"); None = the runs
    # folder's backbone, ``model.arch`` (the transfer methods).
    arch: str | None = None
    # Reads the source cohorts' patients (not their models): the sources are part of the
    # run's identity, as for the methods that need the model pool.
    uses_sources: bool = False
    # How many inner target models the run needs (cross-fitting: J >= 2 models of the target's
    # network, each trained on J - 1 of J inner folds of the training patients), or None.
    inner_targets: Callable[[ExperimentConfig], int | None] | None = None

    def network(self, cfg: ExperimentConfig) -> str:
        """The network this method works on under ``cfg``."""
        return self.arch or cfg.model.arch


_METHODS: dict[str, Method] = {}
# name pattern -> factory of a Method for a matching name (e.g. steph_k<N>)
_PATTERNS: list[tuple[re.Pattern, Callable[[re.Match], Method]]] = []
_PATTERN_HINTS: list[tuple[str, str]] = []  # (e.g. "steph_k<N>", what the family is)


def register_method(method: Method) -> Method:
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def register_method_pattern(pattern: str, factory: Callable[[re.Match], Method], hint: str,
                            summary: str) -> None:
    """Names matching ``pattern`` (e.g. ``steph_k(\\d+)``) are built by ``factory``; ``hint``
    is how ``steph methods`` lists the family (e.g. ``steph_k<N>``)."""
    _PATTERNS.append((re.compile(pattern), factory))
    _PATTERN_HINTS.append((hint, summary))


def list_methods() -> list[str]:
    return list(_METHODS)


def method_patterns() -> list[tuple[str, str]]:
    """(hint, summary) of every family of names, e.g. ("steph_k<N>", "STEPH with K = N")."""
    return list(_PATTERN_HINTS)


def get_method(name: str) -> Method:
    if name in _METHODS:
        return _METHODS[name]
    for pattern, factory in _PATTERNS:
        m = pattern.fullmatch(name)
        if m:
            return factory(m)
    known = ", ".join([*list_methods(), *(hint for hint, _ in method_patterns())])
    raise ConfigError(f"unknown method {name!r}; known: {known}")


def config_for(method: Method, cfg: ExperimentConfig) -> dict[str, Any]:
    """The settings that decide a run of ``method`` (what its config.yaml records)."""
    full = cfg.to_dict()
    return without_performance_keys({k: full[k] for k in method.config_sections})


def resolve_methods(spec: str | list[str]) -> list[str]:
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise ConfigError("no method given")
    for n in names:
        get_method(n)
    return list(dict.fromkeys(names))
