"""The experts' inputs of one run, computed once and kept in its run directory.

``<run dir>/expert_embeddings.safetensors`` holds one tensor ``embeddings`` of shape
(patients, E, d): the bag embedding of every target patient of the fold (training and test
patients, whole bags, never patch-sampled) under every model of the :class:`ExpertBank`, self
first. Its metadata records the bank's key (a sha256 over the architecture, its settings and the
content digest of every expert's weights), the expert names and digests and the patient ids.

The file is reused when its key matches and it covers the patients asked for (a resumed run, a
rerun); any other file is replaced: when a source or the target model changes (retrained,
another fold's model, another source list), its digest changes, so does the key, and the
embeddings are computed again. Writes are atomic (``steph.utils.io``): an interrupted
computation leaves no file behind. The features are not part of the key: the bag files of a
run's patients are assumed not to change under a run directory (as for its finished results).
"""

from __future__ import annotations

import json

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from steph.transfer.experts import ExpertBank
from steph.utils.io import load_tensor_metadata, load_tensors, save_tensors

log = logging.getLogger("steph.transfer")

CACHE_FILE = "expert_embeddings.safetensors"


@dataclass
class ExpertEmbeddings:
    """The (E, d) experts' inputs of every patient of a run."""

    names: list[str]  # the experts, self first
    patients: list[str]
    values: torch.Tensor  # (patients, E, d)
    computed: bool  # True: computed by this call; False: read back from the cache

    def __post_init__(self) -> None:
        self._row = {p: i for i, p in enumerate(self.patients)}

    def __getitem__(self, patient_id: str) -> torch.Tensor:
        """(E, d) for one patient (a view: do not modify it in place)."""
        return self.values[self._row[patient_id]]

    def of(self, patient_ids: Sequence[str]) -> torch.Tensor:
        """(n, E, d) for ``patient_ids``, in that order."""
        return self.values[[self._row[p] for p in patient_ids]]


def _read(path: Path, bank: ExpertBank, key: str, patient_ids: Sequence[str]
          ) -> ExpertEmbeddings | None:
    if not path.exists():
        return None
    meta = load_tensor_metadata(path)
    try:
        listed = {k: json.loads(meta.get(k, "[]")) for k in ("experts", "digests", "patients")}
    except ValueError:
        listed = {"experts": [], "digests": [], "patients": []}
    if meta.get("key") != key:
        before = dict(zip(listed["experts"], listed["digests"]))
        changed = [n for n, d in zip(bank.names, bank.digests()) if before.get(n) != d]
        log.info("%s: made for other expert models (changed or new: %s); computing again",
                 path, ", ".join(changed) or "none, other settings")
        return None
    stored = list(listed["patients"])
    if not set(patient_ids) <= set(stored):
        log.info("%s: does not cover every patient of the run; computing again", path)
        return None
    values = load_tensors(path)["embeddings"]
    full = ExpertEmbeddings(list(listed["experts"]), stored, values, computed=False)
    ids = list(patient_ids)
    return ExpertEmbeddings(full.names, ids, full.of(ids), computed=False)


def expert_embeddings(bank: ExpertBank, patient_ids: Sequence[str],
                      load_bag: Callable[[str], torch.Tensor],
                      cache_dir: str | Path | None) -> ExpertEmbeddings:
    """Every patient's (E, d) embeddings under ``bank``: read from ``cache_dir`` when a cache
    for the same experts covers them, else computed (``load_bag(patient_id)`` gives the whole
    bag) and written there. ``cache_dir=None``: computed, not kept."""
    ids = [str(p) for p in patient_ids]
    if len(set(ids)) != len(ids):
        raise ValueError("repeated patient ids")
    key = bank.key()
    path = Path(cache_dir) / CACHE_FILE if cache_dir is not None else None
    if path is not None:
        found = _read(path, bank, key, ids)
        if found is not None:
            log.info("expert embeddings of %d patient(s) x %d expert(s) read from %s",
                     len(ids), len(bank), path)
            return found
    log.info("computing the embeddings of %d patient(s) under %d expert model(s)", len(ids),
             len(bank))
    bank.eval()
    rows = [bank(load_bag(pid)) for pid in ids]
    values = (torch.stack(rows) if rows
              else torch.zeros(0, len(bank), bank.embed_dim))
    if path is not None:
        # safetensors metadata holds strings: the lists go in as JSON
        save_tensors(path, {"embeddings": values}, metadata={
            "key": key, "experts": json.dumps(list(bank.names)),
            "digests": json.dumps(list(bank.digests())), "patients": json.dumps(ids)})
    return ExpertEmbeddings(list(bank.names), ids, values, computed=True)
