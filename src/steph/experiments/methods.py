"""The methods ``steph cv --methods`` knows, each a small recipe: what it needs (only theta_0, or
the model pool of the target fold) and how to build the module the shared trainer trains.

Method names:
  abmil                      cancer-specific ABMIL from theta_0
  steph                      STEPH (method.md section 5)
  steph_lambda1              ablation: no mixup (lambda = 1)
  steph_free_lambda          ablation: lambda a learned vector instead of H_mix
  steph_dense                ablation: no sparsity (K = m)
  steph_free_w               ablation: w a learned vector instead of H_agg
  steph_k<N>                 STEPH with K = N (Table S3's sweep)
plus the model-merging baselines registered by ``steph.merging.baselines``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from steph.config import ExperimentConfig, without_performance_keys
from steph.errors import ConfigError
from steph.merging.pool import ModelPool
from steph.models import ABMIL
from steph.survival.bins import TimeBins


@dataclass
class MethodContext:
    cfg: ExperimentConfig
    target: str
    fold: int
    hparams: dict[str, Any]  # ABMIL hyper-parameters (from theta_0)
    theta0: dict[str, torch.Tensor]
    bins: TimeBins
    n_patients: int  # size of the target cohort
    n_train: int
    pool_loader: Callable[[], ModelPool] | None = None
    train_bins: Any = None  # bin index and event of every training bag (for a fresh head's bias)
    train_events: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def head_bias(self, mode: str) -> torch.Tensor | None:
        """The fresh head's bias: the training split's baseline hazard logits, or None (random)."""
        if mode == "random":
            return None
        if self.train_bins is None or self.train_events is None:
            raise ConfigError("a baseline-hazard head bias needs the training labels")
        from steph.survival.baseline import baseline_hazard_logits

        return baseline_hazard_logits(self.train_bins, self.train_events, self.bins.n_bins)

    def pool(self) -> ModelPool:
        if self.pool_loader is None:
            raise ConfigError("this method needs source models but no model pool was given")
        if "pool" not in self.extra:
            self.extra["pool"] = self.pool_loader()
        return self.extra["pool"]


@dataclass
class Built:
    """A method's module plus how to save it as a self-contained artefact."""

    module: nn.Module
    kind: str  # artefact kind (steph.inference)
    settings: Callable[[], dict[str, Any]]  # read after training
    export: Callable[[], nn.Module] | None = None  # module to save (default: ``module``)


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    needs_pool: bool
    trains: bool
    build: Callable[[MethodContext], Built]
    config_sections: tuple[str, ...] = ("data", "bins", "model", "train")


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def list_methods() -> list[str]:
    _ensure_baselines()
    return list(_METHODS)


def get_method(name: str) -> Method:
    _ensure_baselines()
    if name in _METHODS:
        return _METHODS[name]
    m = re.fullmatch(r"steph_k(\d+)", name)
    if m:
        return _steph_method(name, f"STEPH with K = {m.group(1)}", top_k=int(m.group(1)))
    raise ConfigError(f"unknown method {name!r}; known: {', '.join(list_methods())}, steph_k<N>")


def _ensure_baselines() -> None:
    # The baselines register themselves on import; importing here avoids an import cycle.
    import steph.merging.baselines  # noqa: F401


# -- ABMIL ----------------------------------------------------------------------------------------

def _build_abmil(ctx: MethodContext) -> Built:
    model = ABMIL(**ctx.hparams)
    model.load_state_dict(ctx.theta0)  # every cancer-specific model starts from theta_0
    return Built(module=model, kind="abmil", settings=model.hparams)


register_method(Method("abmil", "cancer-specific ABMIL trained from the shared theta_0",
                       needs_pool=False, trains=True, build=_build_abmil))


# -- STEPH and its ablations ----------------------------------------------------------------------

def _steph_method(name: str, summary: str, **overrides: Any) -> Method:
    def build(ctx: MethodContext) -> Built:
        from steph.merging.steph import STEPH

        cfg = ctx.cfg.steph.model_copy(update=overrides)
        pool = ctx.pool()
        model = STEPH(pool.stack(), ctx.hparams, cfg, head_seed=ctx.cfg.train.seed,
                      n_patients=ctx.n_patients, head_bias=ctx.head_bias(cfg.head_bias))
        return Built(module=model, kind="steph", settings=model.settings)

    return Method(name, summary, needs_pool=True, trains=True, build=build,
                  config_sections=("data", "bins", "model", "train", "steph"))


register_method(_steph_method("steph", "STEPH: sparse task-vector mixup with hypernetworks"))
register_method(_steph_method("steph_lambda1", "STEPH ablation: no mixup (lambda = 1)",
                              mixing="none"))
register_method(_steph_method("steph_free_lambda", "STEPH ablation: lambda a free learned vector",
                              mixing="free"))
register_method(_steph_method("steph_dense", "STEPH ablation: no sparsity (K = m)",
                              top_k=10_000))
register_method(_steph_method("steph_free_w", "STEPH ablation: w a free learned vector",
                              aggregation="free"))


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


