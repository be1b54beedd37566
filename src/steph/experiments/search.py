"""Choosing a hyper-parameter by inner cross-validation on a run's training patients.

This is how the paper chose STEPH's gamma: "a grid search over {0, 0.0025, 0.005, 0.01, 0.05}
through cross-validation on training samples" (appendix). A method asks for it by returning a
:class:`SearchSpec` (for STEPH: ``steph.gamma: search``). For outer run (target t, fold k):

1. the outer fold's training patients are split into ``folds`` inner folds (stratified by event
   and time, seeded by ``data.split_seed``); the outer test patients are never read;
2. per inner fold, with ``target_model: inner`` (the default), the target's own model is trained
   from theta_0 on the inner training patients only, so the target task vector has not seen the
   inner validation patients (the outer fold-k model has: it was trained on all of them; the
   ``outer`` option reuses it anyway, to measure what that shortcut changes);
3. every candidate value is trained on the inner training patients (sources: the outer run's
   source models, which never saw a target patient) and scored by Harrell's C on the inner
   validation patients;
4. the value with the best mean inner C-index wins, ties to the larger (e.g. the larger gamma);
   the outer run then trains on its whole training split with it.

Everything lives in ``<outer run>/search/``: ``inner<j>/target/`` (the inner target model),
``inner<j>/<key>=<value>/`` (a candidate: checkpoints while it trains, then ``score.json``) and,
last, ``selection.json``. An interrupted search resumes where it stopped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from steph.config import ExperimentConfig
from steph.data.cohort import Cohort
from steph.data.splits import Split, create_splits
from steph.errors import RunError
from steph.methods.registry import Method, SearchSpec
from steph.runs import RunRef, RunsFolder
from steph.utils.faults import fault_point
from steph.utils.io import read_json, write_json

log = logging.getLogger("steph.experiments")

SELECTION = "selection.json"


@dataclass
class SearchResult:
    key: str
    value: Any
    scores: dict[str, float]  # str(value) -> mean inner validation C-index
    per_fold: dict[str, list[float]] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        name = self.key.split(".")[-1]
        return {f"{name}_selected": self.value, f"{name}_search": self.scores}


def with_overrides(cfg: ExperimentConfig, overrides: dict[str, Any]) -> ExperimentConfig:
    """A validated copy of ``cfg`` with dotted ``overrides`` applied."""
    from steph.config import build_config

    data = cfg.to_dict()
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        data[section][name] = value
    return build_config(data, "overrides")


def choose(scores: dict[Any, float], prefer: str = "larger") -> Any:
    """The value with the best finite score; ties go to the larger (or smaller) value."""
    finite = {v: s for v, s in scores.items() if np.isfinite(s)}
    if not finite:
        raise RunError("inner search: no candidate gave a finite validation C-index")
    best = max(finite.values())
    tied = [v for v, s in finite.items() if s == best]
    return max(tied) if prefer == "larger" else min(tied)


class InnerTrainer(Protocol):
    """What the search needs from the run runner (``steph.experiments.runner.RunRunner``)."""

    cfg: ExperimentConfig

    @property
    def runs(self) -> RunsFolder: ...

    def train_inner_target(self, ref: RunRef, cohort: Cohort, fold: int, train_ids,
                           path: Path) -> Path: ...

    def score_candidate(self, ref: RunRef, method: Method, cohort: Cohort, key: str, value: Any,
                        fold: int, train_ids, val_ids, target_weights: Path,
                        path: Path) -> float: ...


def run_search(trainer: InnerTrainer, ref: RunRef, method: Method, spec: SearchSpec,
               cohort: Cohort, split: Split) -> SearchResult:
    """Run (or resume) the search of outer run ``ref`` on its training patients ``split``,
    in ``<run>/search``."""
    root = trainer.runs.run(ref).search
    outer_target = trainer.runs.run(RunRef(ref.cohort, trainer.cfg.model.arch, ref.fold,
                                           ref.repeat)).weights
    patients = (cohort.patients.set_index("patient_id").loc[list(split.train_ids)]
                .reset_index()[["patient_id", "time", "event"]])
    done = root / SELECTION
    if done.exists():
        found = read_json(done)
        if found.get("key") == spec.key and [str(v) for v in spec.grid] == found.get("grid"):
            return SearchResult(found["key"], found["value"], found["scores"], found["per_fold"])
    inner = create_splits(patients, k=spec.folds, seed=trainer.cfg.data.split_seed)
    per_fold: dict[str, list[float]] = {str(v): [] for v in spec.grid}
    for j, part in enumerate(inner):
        fold_dir = root / f"inner{j}"
        if spec.target_model == "outer":
            target = outer_target
        else:
            target = trainer.train_inner_target(ref, cohort, j, part.train_ids,
                                                fold_dir / "target")
        for value in spec.grid:
            cand = fold_dir / f"{spec.key}={value}"
            score_path = cand / "score.json"
            if score_path.exists():
                c = float(read_json(score_path)["c_index"])
            else:
                c = trainer.score_candidate(ref, method, cohort, spec.key, value, j,
                                            part.train_ids, part.test_ids, target, cand)
                write_json(score_path, {"c_index": c, "n_train": len(part.train_ids),
                                        "n_val": len(part.test_ids)})
                fault_point("search:candidate")
            per_fold[str(value)].append(c)
            log.info("search %s inner fold %d/%d: %s=%s -> C %.4f", root.parent.name, j + 1,
                     len(inner), spec.key, value, c)
    means = {v: float(np.nanmean(per_fold[str(v)])) if per_fold[str(v)] else float("nan")
             for v in spec.grid}
    value = choose(means, spec.prefer)
    result = SearchResult(spec.key, value, {str(v): s for v, s in means.items()}, per_fold)
    write_json(done, {"key": spec.key, "grid": [str(v) for v in spec.grid], "value": value,
                      "scores": result.scores, "per_fold": per_fold,
                      "target_model": spec.target_model, "folds": spec.folds})
    return result
