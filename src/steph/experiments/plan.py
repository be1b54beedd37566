"""The grid as a plan: which runs a request needs, prerequisites first. Pure: it reads nothing
and writes nothing, so a plan can be inspected, tested and handed to any executor.

A transfer method's run for target t and fold k needs the target's cancer-specific model of
fold k and every source's of fold 0 (method.md section 4), all of the runs folder's network
``model.arch`` (the cancer-specific method of that name); sources never see a target patient,
so every repeat of the cross-validation shares repeat 0's source models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from steph.errors import ConfigError
from steph.methods import get_method
from steph.runs import RunRef


def parse_folds(spec: str | Sequence[int] | None, n_folds: int) -> list[int]:
    """"0-4", "0,2,3" or a list; None means all folds."""
    if spec is None:
        return list(range(n_folds))
    if isinstance(spec, str):
        out: list[int] = []
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                if "-" in part:
                    a, b = part.split("-", 1)
                    out += list(range(int(a), int(b) + 1))
                else:
                    out.append(int(part))
            except ValueError:
                raise ConfigError(f"folds must look like 0-4 or 0,2,3; got {spec!r}") from None
    else:
        out = [int(f) for f in spec]
    bad = [f for f in out if not 0 <= f < n_folds]
    if bad or not out:
        raise ConfigError(f"folds {bad or spec} out of range: there are {n_folds} folds (0-{n_folds - 1})")
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class Planner:
    """Plans runs over the cohorts of a data root.

    ``arch``: the network the transfer methods merge (``model.arch``); ``cohorts``: every cohort
    of the data root; ``sources``: the cohorts a transfer method may draw on (None: every
    cohort but the target)."""

    arch: str
    cohorts: tuple[str, ...]
    sources: tuple[str, ...] | None = None

    def sources_for(self, target: str) -> list[str]:
        return [n for n in (self.sources or self.cohorts) if n != target]

    def prerequisites(self, ref: RunRef) -> list[RunRef]:
        """Runs that must be finished before ``ref`` starts: for a transfer method, the
        target's own model of the same fold and repeat, then every source's fold-0 model."""
        if not get_method(ref.method).needs_pool:
            return []
        return [RunRef(ref.cohort, self.arch, ref.fold, ref.repeat),
                *(RunRef(s, self.arch, 0) for s in self.sources_for(ref.cohort))]

    def result_pairs(self, methods: Sequence[str], targets: Sequence[str]
                     ) -> list[tuple[str, str]]:
        """The (cohort, method) pairs a request makes results: every target with every method,
        and with the target's own model that a transfer method merges (trained on the same
        folds). The sources' fold-0 models are inputs, not results."""
        pairs: list[tuple[str, str]] = []
        for t in targets:
            for name in methods:
                pairs.append((t, name))
                pairs += [(p.cohort, p.method) for p in self.prerequisites(RunRef(t, name, 0))
                          if p.cohort == t]
        return list(dict.fromkeys(pairs))

    def plan(self, methods: Sequence[str], targets: Sequence[str], folds: Sequence[int],
             repeats: int = 1) -> list[RunRef]:
        """Every run needed, cancer-specific ones first, each once."""
        if repeats < 1:
            raise ConfigError(f"repeats must be >= 1, got {repeats}")
        refs: list[RunRef] = []
        for t in targets:
            for name in methods:
                for r in range(repeats):
                    for k in folds:
                        ref = RunRef(t, name, k, r)
                        refs += [*self.prerequisites(ref), ref]
        first = [j for j in refs if not get_method(j.method).needs_pool]  # cancer-specific
        ordered = first + [j for j in refs if get_method(j.method).needs_pool]
        return list(dict.fromkeys(ordered))
