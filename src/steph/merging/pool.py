"""The model pool of one transfer problem (FusionBench's "model pool", kept apart from methods).

For target cohort t and fold k (method.md section 4): theta_0, the target's own fold-k model (it
never saw fold k's test patients) and the fold-0 model of every source cohort (t excluded), all
of one registered network ``arch``, whose class declares which tensors form "the MIL encoder"
(``ENCODER_PREFIXES``, see steph.models.base).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from steph.errors import RunError
from steph.merging.task_vectors import TaskVectorStack, TensorDict, task_vector
from steph.models.registry import model_class
from steph.utils.io import load_tensors


@dataclass
class ModelPool:
    theta0: TensorDict
    target: TensorDict
    sources: dict[str, TensorDict]  # cohort -> state dict, in a fixed order
    target_name: str
    hparams: dict = field(default_factory=dict)  # network hyper-parameters of every model
    arch: str = "abmil"  # the registered network every model of the pool is

    def __post_init__(self) -> None:
        if self.target_name in self.sources:
            raise RunError(f"the target cohort {self.target_name!r} cannot also be a source")
        for name, sd in [(self.target_name, self.target), *self.sources.items()]:
            if set(sd) != set(self.theta0):
                raise RunError(f"model of {name!r} does not have the tensors of theta_0")

    @property
    def source_names(self) -> list[str]:
        return list(self.sources)

    @property
    def encoder_names(self) -> list[str]:
        """The MIL-encoder tensors of ``arch`` (its class's ``ENCODER_PREFIXES``), in theta_0's
        order (the network's registration order)."""
        prefixes = model_class(self.arch).ENCODER_PREFIXES
        return [n for n in self.theta0 if n.startswith(prefixes)]

    def task_vectors(self, names: Sequence[str] | None = None) -> tuple[TensorDict, list[TensorDict]]:
        """(tau_t, [tau_s for each source]) over ``names`` (the MIL encoder by default)."""
        names = self.encoder_names if names is None else list(names)
        tau_t = task_vector(self.target, self.theta0, names)
        return tau_t, [task_vector(sd, self.theta0, names) for sd in self.sources.values()]

    def stack(self, names: Sequence[str] | None = None, *, target_first: bool = True) -> TaskVectorStack:
        """Rows: tau_t then the sources (``target_first``), or the sources only."""
        names = self.encoder_names if names is None else list(names)
        tau_t, taus = self.task_vectors(names)
        vecs = [tau_t, *taus] if target_first else taus
        labels = [self.target_name, *self.source_names] if target_first else self.source_names
        return TaskVectorStack.from_dicts({n: self.theta0[n] for n in names}, vecs, labels, names)

    @classmethod
    def from_files(cls, theta0: str | Path, target: tuple[str, str | Path],
                   sources: Sequence[tuple[str, str | Path]], hparams: dict | None = None,
                   arch: str = "abmil") -> ModelPool:
        def load(path: str | Path) -> TensorDict:
            path = Path(path)
            if not path.exists():
                raise RunError(f"model weights not found: {path}")
            return {k: v.float() for k, v in load_tensors(path).items()}

        return cls(theta0=load(theta0), target=load(target[1]),
                   sources={name: load(p) for name, p in sources}, target_name=target[0],
                   hparams=dict(hparams or {}), arch=arch)
