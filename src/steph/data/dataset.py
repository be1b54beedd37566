"""The bag Dataset: one item per patient, features read from disk on access.

Items (the contract of ``docs/architecture.md``)::

    {"features": FloatTensor (N, D), "bin": int64 0-d tensor, "time": float (days),
     "event": int (1 = event), "patient_id": str}

Methods whose modules take extra per-bag inputs (a graph over the patches, cached embeddings)
attach providers with :meth:`BagDataset.set_bag_inputs`; each item then also holds
``name: provider(patient_id)``. A provider whose input is indexed by the bag's rows (a graph
over the patches) says so with a true ``per_instance`` attribute: it is then called
``provider(patient_id, indices)``, ``indices`` being the rows a sampled bag kept (sorted) or
None for the whole bag, so that the input always lines up with the features (see
:class:`steph.data.graphs.PatchGraphs`).

Nothing but labels is held in memory unless ``cache_mb > 0``: then an LRU cache of bags, in
their stored dtype (float16 for real features), bounded by that many megabytes (for small
studies trained for many epochs). The cache belongs to the process that holds the dataset: with
worker processes (``data.workers``, :mod:`steph.data.loader`) it stays in the main process,
workers read only the bags it lacks and never cache, and what they read is added to it.

Patch sampling for training (``max_instances``, config ``data.max_instances``)
------------------------------------------------------------------------------
A bag of more than ``max_instances`` patches is replaced by ``max_instances`` distinct patches
drawn uniformly without replacement from all slides of the patient together
(:func:`subsample_indices`), kept in their original order (sorted indices, so slide order
survives). Bags at or under the limit are returned whole. The subset is a pure function of
``(seed, patient_id, N)``: the generator is seeded with the training seed and a stable hash of
the patient id (blake2b, not Python's salted ``hash``), so it is the same in every epoch, in
every worker process, in any item order and after a resume; it is *not* redrawn per epoch.
It bounds the memory and time of a training step on huge bags (the largest TCGA bag has
243,906 patches).

It is a **training-only** device: a dataset used for evaluation or prediction must be built
with ``max_instances=None`` (or taken from :meth:`BagDataset.full_bags`), so that every patch
of every bag counts. Exact prediction on bags of any size is the model's job (ABMIL, ILRA,
Patch-GCN and R2T-MIL compute huge bags in pieces in eval mode, see steph.models.base); a
network that cannot (TransMIL) may be evaluated on sampled bags, which the experiment records
(:meth:`BagDataset.resampled`, ``data.eval_max_instances``).
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from steph.errors import DataError
from steph.survival.bins import TimeBins

logger = logging.getLogger("steph.data.dataset")


def _patient_seed(seed: int, patient_id: str) -> list[int]:
    """Stable (not process-salted like hash()) seed material for one patient."""
    digest = hashlib.blake2b(patient_id.encode("utf-8"), digest_size=8).digest()
    return [int(seed) & 0xFFFFFFFF, int.from_bytes(digest, "little")]


def subsample_indices(n: int, max_instances: int, seed: int, patient_id: str) -> np.ndarray:
    """Sorted indices of ``max_instances`` distinct patches out of ``n`` (all when n is
    not larger), deterministic for (seed, patient_id)."""
    if n <= max_instances:
        return np.arange(n)
    rng = np.random.default_rng(_patient_seed(seed, patient_id))
    return np.sort(rng.choice(n, size=max_instances, replace=False))


class BagDataset(Dataset):
    """Bags of `patient_ids` (in that order) from a :class:`~steph.data.cohort.Cohort`."""

    def __init__(self, cohort: Any, patient_ids: Sequence[str], bins: TimeBins, *,
                 cache_mb: float = 0, max_instances: int | None = None, seed: int = 0):
        ids = [str(p) for p in patient_ids]
        unknown = [p for p in ids if p not in cohort]
        if unknown:
            raise DataError(f"cohort {cohort.name!r}: {len(unknown)} unknown patient id(s): "
                            + ", ".join(map(repr, unknown[:5]))
                            + (" ..." if len(unknown) > 5 else ""))
        if len(set(ids)) != len(ids):
            raise DataError("BagDataset: repeated patient ids in patient_ids")
        if max_instances is not None and max_instances < 1:
            raise DataError(f"max_instances must be >= 1, got {max_instances}")
        if cache_mb < 0:
            raise DataError(f"cache_mb must be >= 0, got {cache_mb}")
        self.cohort = cohort
        self.patient_ids = ids
        self.bins = bins
        self.max_instances = max_instances
        self.seed = int(seed)
        rows = [cohort.patient(p) for p in ids]
        self.times = np.array([float(r["time"]) for r in rows], dtype=float)
        self.events = np.array([int(r["event"]) for r in rows], dtype=np.int64)
        self.bin_indices = bins.to_bins(self.times) if ids else np.zeros(0, dtype=np.int64)
        self.bag_input_providers: dict[str, Any] = {}
        self.cache_bytes_max = int(cache_mb * 2**20)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_bytes = 0
        self.cache_hits = 0
        self.cache_misses = 0

    def set_bag_inputs(self, providers: dict[str, Any]) -> None:
        """Attach extra per-bag inputs: ``name -> provider(patient_id) -> tensor``."""
        reserved = {"features", "bin", "time", "event", "patient_id"} & set(providers)
        if reserved:
            raise ValueError(f"per-bag input names {sorted(reserved)} are reserved")
        self.bag_input_providers = dict(providers)

    def __len__(self) -> int:
        return len(self.patient_ids)

    def kept_indices(self, patient_id: str, n: int | None = None) -> np.ndarray | None:
        """Sorted rows of the patient's bag (of ``n`` rows; default: the cohort's count) that
        the sampler keeps, or None when the bag is used whole."""
        if self.max_instances is None:
            return None
        if n is None:
            n = int(self.cohort.patient(patient_id)["n_patches"])
        if n <= self.max_instances:
            return None
        return subsample_indices(n, self.max_instances, self.seed, patient_id)

    def n_sampled(self) -> int:
        """How many of the dataset's bags are sampled (larger than ``max_instances``)."""
        if self.max_instances is None:
            return 0
        sizes = [int(self.cohort.patient(p)["n_patches"]) for p in self.patient_ids]
        return sum(n > self.max_instances for n in sizes)

    def _load(self, patient_id: str) -> torch.Tensor:
        # Cohort.load_bag raises a DataError naming the patient and the file for NaN/inf
        bag = self.cohort.load_bag(patient_id, stored=True)
        idx = self.kept_indices(patient_id, bag.shape[0])
        if idx is not None:
            bag = bag[torch.from_numpy(idx)].contiguous()
        return bag

    def cached(self, patient_id: str) -> torch.Tensor | None:
        """The patient's bag if the cache holds it (stored dtype; no hit counted), else None."""
        return self._cache.get(patient_id)

    def remember(self, patient_id: str, bag: torch.Tensor) -> None:
        """Put a bag read elsewhere (a worker process) into the cache, evicting the least
        recently used bags beyond ``cache_mb``; a bag larger than the cache is not kept."""
        size = bag.numel() * bag.element_size()
        if self.cache_bytes_max <= 0 or size > self.cache_bytes_max:
            return
        old = self._cache.pop(patient_id, None)
        if old is not None:
            self._cache_bytes -= old.numel() * old.element_size()
        self._cache[patient_id] = bag
        self._cache_bytes += size
        while self._cache_bytes > self.cache_bytes_max:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.numel() * old.element_size()

    def features(self, patient_id: str, stored: bool = False, use_cache: bool = True
                 ) -> torch.Tensor:
        """The (possibly subsampled) bag of one patient, float32 or with ``stored=True`` in
        its stored dtype (float16 for real features), through the cache unless ``use_cache``
        is False. The cache holds stored-dtype bags; a cached tensor may be shared between
        calls: do not modify it in place."""
        if self.cache_bytes_max <= 0 or not use_cache:
            bag = self._load(patient_id)
        else:
            bag = self._cache.get(patient_id)
            if bag is not None:
                self._cache.move_to_end(patient_id)
                self.cache_hits += 1
            else:
                self.cache_misses += 1
                bag = self._load(patient_id)
                self.remember(patient_id, bag)
        return bag if stored else bag.float()

    def item(self, i: int, stored: bool = False, use_cache: bool = True,
             features: torch.Tensor | None = None) -> dict[str, Any]:
        """Item ``i`` (the contract above); ``stored``: features in their stored dtype
        (what the data pipeline moves, see steph.data.loader); ``features``: a bag already
        read (the pipeline's), used instead of reading it."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} bags")
        pid = self.patient_ids[i]
        if features is None:
            features = self.features(pid, stored=stored, use_cache=use_cache)
        item = {
            "features": features,
            "bin": torch.tensor(int(self.bin_indices[i]), dtype=torch.int64),
            "time": float(self.times[i]),
            "event": int(self.events[i]),
            "patient_id": pid,
        }
        for name, provider in self.bag_input_providers.items():
            if getattr(provider, "per_instance", False):
                item[name] = provider(pid, self.kept_indices(pid))
            else:
                item[name] = provider(pid)
        return item

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.item(i)

    def resampled(self, max_instances: int | None) -> BagDataset:
        """The same patients, labels and per-bag inputs with another patch sampling limit
        (None: whole bags); the cache size is kept, the cache itself is not shared."""
        out = BagDataset(self.cohort, self.patient_ids, self.bins,
                         cache_mb=self.cache_bytes_max / 2**20, max_instances=max_instances,
                         seed=self.seed)
        out.set_bag_inputs(self.bag_input_providers)
        return out

    def full_bags(self) -> BagDataset:
        """The same dataset without patch sampling (``max_instances=None``), for evaluation
        and prediction."""
        return self.resampled(None)

    def cache_info(self) -> dict[str, int]:
        return {"hits": self.cache_hits, "misses": self.cache_misses,
                "entries": len(self._cache), "bytes": self._cache_bytes,
                "max_bytes": self.cache_bytes_max}

    def __repr__(self) -> str:
        return (f"BagDataset({self.cohort.name!r}, {len(self)} bags, n_bins={self.bins.n_bins}, "
                f"cache_mb={self.cache_bytes_max / 2**20:g}, max_instances={self.max_instances})")


class ConcatBags(Dataset):
    """Several bag datasets as one (e.g. a target's training split and every source cohort's
    patients, for joint training): item ``i`` is the item of the dataset it falls in (float32
    features, each part's own per-bag inputs and cache). The labels of every bag
    (``bin_indices``, ``events``, ``times``) are concatenated without reading a bag."""

    def __init__(self, parts: Sequence[BagDataset]):
        if not parts:
            raise DataError("ConcatBags needs at least one dataset")
        self.parts = list(parts)
        self._ends = np.cumsum([len(p) for p in self.parts])
        self.times = np.concatenate([p.times for p in self.parts])
        self.events = np.concatenate([p.events for p in self.parts])
        self.bin_indices = np.concatenate([np.asarray(p.bin_indices) for p in self.parts])
        self.patient_ids = [pid for p in self.parts for pid in p.patient_ids]

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} bags")
        k = int(np.searchsorted(self._ends, i, side="right"))
        start = int(self._ends[k - 1]) if k else 0
        return self.parts[k][i - start]

    def __repr__(self) -> str:
        return f"ConcatBags({', '.join(repr(p) for p in self.parts)})"
