"""What the runs of one experiment share: the data root's cohorts and their folds, the runs
folder with each network's shared initialisation theta_0, and the model pool of a transfer run.

Every network has one theta_0 per runs folder (``RUNS/theta0.safetensors`` for ABMIL,
``RUNS/theta0-<arch>.safetensors`` for the others), created once from ``model.init_seed`` and
checked on reuse: every model of that network in the folder starts from exactly it, which is
what makes task vectors meaningful (method.md section 4).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from steph.config import ExperimentConfig, ModelConfig
from steph.data.cohort import Cohort, discover_cohorts
from steph.data.dataset import BagDataset
from steph.data.splits import Split, has_split_files, load_or_create_splits
from steph.errors import ConfigError, DataError, RunError, StephError, one_line
from steph.experiments.plan import Planner
from steph.merging.pool import ModelPool
from steph.methods import get_method
from steph.models import create_model
from steph.runs import RunRef, RunsFolder, migrations
from steph.survival.bins import TimeBins
from steph.utils.io import load_tensors, read_json, save_tensors, write_json

log = logging.getLogger("steph.experiments")


def theta0_identity(model_cfg: ModelConfig, in_dim: int, n_bins: int,
                    arch: str = "abmil") -> dict[str, Any]:
    with torch.device("meta"):  # hparams only: nothing allocated
        net = create_model(arch, in_dim=in_dim, n_bins=n_bins, **model_cfg.network_kwargs(arch))
    return {"hparams": net.hparams(), "init_seed": model_cfg.init_seed, "model": arch}


def ensure_theta0(runs: RunsFolder, model_cfg: ModelConfig, in_dim: int, n_bins: int,
                  arch: str = "abmil") -> Path:
    """Create network ``arch``'s theta_0 once; afterwards check it matches the requested
    network (same architecture, hyper-parameters and seed)."""
    path = runs.theta0(arch)
    meta_path = path.with_suffix(".json")
    ident = theta0_identity(model_cfg, in_dim, n_bins, arch)
    if path.exists() and meta_path.exists():
        found = migrations.upgrade_theta0(read_json(meta_path))
        if (found.get("hparams") != ident["hparams"] or found.get("init_seed") != ident["init_seed"]
                or found["model"] != arch):
            raise RunError(
                f"{path} was created for {found['model']} {found.get('hparams')} "
                f"(seed {found.get('init_seed')}) but this run needs {arch} {ident['hparams']} "
                f"(seed {ident['init_seed']}): every {arch} model of an experiment directory must "
                "start from the same theta_0; use another --out"
            )
        return path
    torch.manual_seed(model_cfg.init_seed)
    model = create_model(arch, **ident["hparams"])
    save_tensors(path, model.state_dict())
    write_json(meta_path, {"format": migrations.THETA0_FORMAT, **ident})
    return path


def load_theta0(runs: RunsFolder, arch: str = "abmil"
                ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = runs.theta0(arch)
    if not path.exists():
        raise RunError(f"no shared initialisation of {arch} at {path}")
    return load_tensors(path), migrations.upgrade_theta0(read_json(path.with_suffix(".json")))


class Workspace:
    """One data root + one runs folder + one configuration: the inputs every run reads.

    Cohorts and folds are loaded once per process and kept."""

    def __init__(self, data_root: str | Path, runs_root: str | Path,
                 cfg: ExperimentConfig | None = None, sources: Sequence[str] | None = None):
        self.data_root = Path(data_root)
        self.runs = RunsFolder(runs_root)
        self.cfg = cfg or ExperimentConfig()
        self.cohort_names = discover_cohorts(self.data_root, self.cfg.data.labels)
        if not self.cohort_names:
            raise DataError(f"no cohort under {self.data_root} (expected <cohort>/{self.cfg.data.labels})")
        self.sources = list(sources) if sources else None
        if self.sources:
            self.check_cohorts(self.sources, "source")
        self.planner = Planner(self.cfg.model.arch, tuple(self.cohort_names),
                               tuple(self.sources) if self.sources else None)
        self._cohorts: dict[str, Cohort] = {}
        self._splits: dict[tuple[str, int], list[Split]] = {}

    @property
    def runs_root(self) -> Path:
        return self.runs.root

    def check_cohorts(self, names: Iterable[str], what: str) -> None:
        """ConfigError naming the cohorts of ``names`` the data root does not have."""
        unknown = [n for n in names if n not in self.cohort_names]
        if unknown:
            raise ConfigError(f"unknown {what} cohort(s) {unknown}; cohorts under {self.data_root}: "
                              f"{', '.join(self.cohort_names)}")

    # -- data --------------------------------------------------------------------------------
    def cohort(self, name: str) -> Cohort:
        if name not in self._cohorts:
            self.check_cohorts([name], "")
            self._cohorts[name] = Cohort.from_config(self.data_root / name, self.cfg.data)
        return self._cohorts[name]

    def splits(self, name: str, repeat: int = 0) -> list[Split]:
        """The cohort's folds in repeat ``repeat`` (split seed ``data.split_seed + repeat``)."""
        if (name, repeat) not in self._splits:
            d = self.cfg.data
            cohort = self.cohort(name)
            if repeat and has_split_files(cohort.splits_dir):
                raise ConfigError(f"cohort {name!r} brings its own splits ({cohort.splits_dir}); "
                                  "--repeats needs folds that steph draws itself")
            self._splits[(name, repeat)] = load_or_create_splits(
                cohort, self.runs.splits(name, repeat), k=d.n_folds, seed=d.split_seed + repeat)
        return self._splits[(name, repeat)]

    def split(self, name: str, fold: int, repeat: int = 0) -> Split:
        splits = self.splits(name, repeat)
        for s in splits:
            if s.fold == fold:
                return s
        raise ConfigError(f"cohort {name!r} has no fold {fold} (folds: {[s.fold for s in splits]})")

    def sources_for(self, target: str) -> list[str]:
        return self.planner.sources_for(target)

    def bins_for(self, cohort: Cohort, split: Split) -> TimeBins:
        b = self.cfg.bins
        if b.kind == "uniform":
            return TimeBins.uniform(b.n_bins, b.max_time)
        tr = cohort.patients.set_index("patient_id").loc[list(split.train_ids)]
        return TimeBins.quantile(tr["time"], tr["event"], b.n_bins)

    def datasets(self, cohort: Cohort, split: Split, bins: TimeBins) -> tuple[BagDataset, BagDataset]:
        """Training bags (patches sampled down to ``data.max_instances``) and test bags (never
        sampled: evaluation sees every patch)."""
        d = self.cfg.data
        kw = {"cache_mb": d.cache_mb, "seed": self.cfg.train.seed}
        return (BagDataset(cohort, list(split.train_ids), bins, max_instances=d.max_instances,
                           **kw),
                BagDataset(cohort, list(split.test_ids), bins, **kw))

    # -- shared initialisations and model pools ----------------------------------------------------
    def theta0(self, in_dim: int, arch: str = "abmil") -> Path:
        return ensure_theta0(self.runs, self.cfg.model, in_dim, self.cfg.bins.n_bins, arch)

    def load_theta0(self, arch: str = "abmil") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return load_theta0(self.runs, arch)

    def pool(self, ref: RunRef, target_weights: Path | None = None) -> ModelPool:
        """The model pool of transfer run ``ref``: theta_0, the target's model (its fold's run,
        or ``target_weights``, e.g. an inner model of a search) and every source's fold-0
        model, all of ``model.arch``."""
        arch = self.cfg.model.arch
        _, meta = self.load_theta0(arch)
        target, *sources = self.planner.prerequisites(ref)
        needed = sources if target_weights is not None else [target, *sources]
        missing = [str(self.runs.run(j).path) for j in needed if not self.runs.run(j).is_finished()]
        if missing:
            raise RunError(f"prerequisite runs not finished: {', '.join(missing)}")
        return ModelPool.from_files(
            self.runs.theta0(arch), (ref.cohort, target_weights or self.runs.run(target).weights),
            [(s.cohort, self.runs.run(s).weights) for s in sources],
            hparams=meta["hparams"], arch=arch)

    # -- before any run starts ---------------------------------------------------------------------
    def check_inputs(self, refs: Sequence[RunRef]) -> None:
        """Check every input the runs ``refs`` read before any of them starts: each cohort's
        label table and feature files (at the ``data.check`` level), its folds in each repeat,
        and one feature dimension for the cohorts whose models share a network's theta_0.
        Raises one :class:`DataError` listing every problem, one line each (a cohort's bad
        slides: a line per slide)."""
        problems: list[str] = []
        names = list(dict.fromkeys(r.cohort for r in refs))
        loaded: dict[str, Cohort] = {}
        for name in names:
            try:
                loaded[name] = self.cohort(name)
            except StephError as err:
                problems.append(str(err).strip())
        for name, repeat in dict.fromkeys((r.cohort, r.repeat) for r in refs):
            if name in loaded:
                try:
                    self.splits(name, repeat)
                except StephError as err:
                    problems.append(f"cohort {name!r}: {one_line(err)}")
        problems += self._dimension_problems(refs, loaded)
        if problems:
            lines = "\n".join("  " + line.replace("\n", "\n  ") for line in problems)
            raise DataError(f"{len(problems)} problem(s) in the inputs of this request; nothing "
                            f"was trained:\n{lines}")

    def _dimension_problems(self, refs: Sequence[RunRef], loaded: dict[str, Cohort]) -> list[str]:
        """Cohorts whose models start from one network's theta_0 must share its in_dim."""
        by_arch: dict[str, list[str]] = {}
        for ref in refs:
            arch = get_method(ref.method).network(self.cfg)
            if ref.cohort in loaded and ref.cohort not in by_arch.setdefault(arch, []):
                by_arch[arch].append(ref.cohort)
        problems = []
        for arch, names in by_arch.items():
            dims: dict[int, list[str]] = {}
            for name in names:
                dims.setdefault(loaded[name].feature_dim, []).append(name)
            meta = self.runs.theta0(arch).with_suffix(".json")
            made_for = None
            if meta.exists():
                try:
                    made_for = migrations.upgrade_theta0(read_json(meta))["hparams"]["in_dim"]
                except (StephError, KeyError, TypeError, ValueError):
                    made_for = None
            if made_for is not None:
                for dim, have in sorted(dims.items()):
                    if dim != made_for:
                        problems.append(
                            f"cohort(s) {', '.join(have)}: feature dimension {dim}, but "
                            f"{self.runs.theta0(arch)} was made for {made_for} (every {arch} "
                            "model of a runs folder starts from it; use another --out)")
            elif len(dims) > 1:
                listing = "; ".join(f"{', '.join(have)}: {dim}" for dim, have in sorted(dims.items()))
                problems.append(f"feature dimensions differ between cohorts ({listing}): every "
                                f"{arch} model of a runs folder starts from one theta_0, so the "
                                "cohorts of one request need one feature dimension")
        return problems


    def _prepare_one(self, ref: RunRef, arch: str, unwritable: dict[str, str]) -> str:
        """Splits of ``ref``'s cohort and its network's theta_0; the one-line error or ''. A
        theta_0 that could not be written (a full disk) stops every run of its network, with
        one error, instead of being retried cohort after cohort."""
        try:
            self.splits(ref.cohort, ref.repeat)
        except StephError as err:
            return one_line(err)
        try:
            self.theta0(self.cohort(ref.cohort).feature_dim, arch)
        except RunError as err:
            unwritable[arch] = one_line(err)
            return unwritable[arch]
        except StephError as err:  # this cohort's input (e.g. its feature dimension)
            return one_line(err)
        return ""

    def prepare(self, refs: Sequence[RunRef]) -> dict[RunRef, str]:
        """Create what runs share before any of them starts: the splits of every cohort and
        repeat in ``refs`` and the theta_0 of each network they train (from the first cohort
        that loads). Returns the runs whose cohort could not be prepared, with the one-line
        error (they cannot start)."""
        failed: dict[RunRef, str] = {}
        errors: dict[tuple[str, int, str], str] = {}
        unwritable: dict[str, str] = {}  # arch -> why its theta_0 could not be written
        for ref in refs:
            arch = get_method(ref.method).network(self.cfg)  # the network's own theta_0
            key = (ref.cohort, ref.repeat, arch)
            if key not in errors:
                errors[key] = unwritable.get(arch) or self._prepare_one(ref, arch, unwritable)
            if errors[key]:
                failed[ref] = errors[key]
        return failed
