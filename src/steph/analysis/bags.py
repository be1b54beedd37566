"""The bags of a run's test patients, read from the data root with the run's own data settings
(its config.yaml), for analyses that run a model again (selections, landscape, attention)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from steph.analysis.runs import read_predictions, run_config
from steph.config import DataConfig
from steph.data.bag_inputs import cohort_providers
from steph.data.cohort import Cohort
from steph.errors import DataError
from steph.runs import RunRef, RunsFolder


@functools.lru_cache(maxsize=8)
def _cohort(folder: Path, data: str) -> Cohort:
    """A cohort loaded once per process and data settings (an analysis visits many runs of
    one cohort); ``data``: the ``data`` settings as JSON (hashable)."""
    return Cohort.from_config(folder, DataConfig.model_validate_json(data))


class RunBags:
    """Bags, per-bag inputs and labels of the patients of ``run``'s cohort."""

    def __init__(self, runs_root: str | Path, data_root: str | Path, run: RunRef):
        self.runs_root, self.data_root, self.run = Path(runs_root), Path(data_root), run
        cfg = run_config(run.path(runs_root))
        d = cfg.data
        folder = self.data_root / run.cohort
        if not folder.is_dir():
            raise DataError(f"cohort {run.cohort!r} not found under the data root "
                            f"{self.data_root} (the run {run} needs its features)")
        self.cohort = _cohort(folder.resolve(), d.model_dump_json())
        self.loss_alpha = cfg.train.loss_alpha
        self._providers: dict = {}

    def test_ids(self) -> list[str]:
        """The run's test patients, in its predictions' order."""
        pred = read_predictions(self.run.path(self.runs_root))
        ids = pred.loc[pred["split"] == "test", "patient_id"].tolist()
        unknown = [p for p in ids if p not in self.cohort]
        if unknown:
            raise DataError(f"test patients of {self.run} not in the cohort under "
                            f"{self.data_root}: {unknown[:5]}")
        return ids

    def bag(self, patient_id: str) -> torch.Tensor:
        return self.cohort.load_bag(patient_id)

    def bag_inputs(self, patient_id: str, names: tuple[str, ...] | list[str]
                   ) -> dict[str, torch.Tensor]:
        """The extra per-bag inputs ``names`` a network declares (Patch-GCN's edge_index)."""
        missing = [n for n in names if n not in self._providers]
        if missing:
            self._providers.update(cohort_providers(
                missing, self.cohort, RunsFolder(self.runs_root).graphs(self.cohort.name),
                who=f"the analysis of {self.run}"))
        return {name: self._providers[name](patient_id) for name in names}

    def label(self, patient_id: str) -> tuple[float, int]:
        row = self.cohort.patient(patient_id)
        return float(row["time"]), int(row["event"])

    def files_key(self, patient_ids: list[str]) -> list[list]:
        """Size and modification time of every feature file of ``patient_ids`` (part of a cache
        key: a changed feature file computes the analysis again)."""
        out = []
        for pid in patient_ids:
            for p in self.cohort.slide_paths(pid):
                st = p.stat()
                out.append([pid, p.name, st.st_size, st.st_mtime_ns])
        return out
