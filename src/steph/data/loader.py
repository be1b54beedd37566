"""The data pipeline: bags read ahead by worker processes and moved to the compute device.

:class:`BagLoader` yields the items of a bag dataset in a given order (the trainer's seeded
epoch order, or ``0..n-1`` for evaluation), each already on the device:

* **Workers** (``data.workers``; default :func:`default_workers` = ``min(4, CPUs - 1)``, 0 =
  read in the main process): a :class:`torch.utils.data.DataLoader` with ``batch_size=None``
  (one bag per item), a sampler that yields exactly the order asked for, ``prefetch_factor``
  bags read ahead per worker (``data.prefetch``), persistent workers (started once per loader,
  kept across epochs) and, on CUDA, pinned host memory for asynchronous copies.
* **dtype**: bags travel in the dtype they are stored in (float16 for TRIDENT / CLAM UNI2-h
  features: half the bytes of float32) and become float32, or the autocast dtype, only on the
  device (``float16 -> float32`` is exact, so the values are those of ``Cohort.load_bag``).
* **Determinism**: what a bag holds depends only on the data, the patient and the seed (patch
  sampling, ``data.max_instances``, is a pure function of ``(seed, patient)``), and the order is
  the caller's, so the items, hence the training, are the same with 0 or any number of
  workers. The loader draws its workers' base seed from a private generator, never from
  torch's global one (which the training's dropout uses).
* **Cache**: a :class:`~steph.data.dataset.BagDataset` with ``cache_mb > 0`` keeps its LRU cache
  in the main process; workers read only the bags it does not hold (they never cache: one
  cache, not one per worker) and what they read is added to it.
* **Errors**: a :class:`~steph.errors.StephError` met in a worker (a corrupt feature file: a
  ``DataError`` naming the cohort, patient, slide and file) is raised in the main process as
  it was raised, one line, not wrapped in a DataLoader traceback.

On Linux workers are forked; where processes are spawned (macOS, Windows) the dataset, including
the providers of per-bag inputs, must be picklable.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from steph.data.dataset import BagDataset
from steph.errors import StephError

MAX_DEFAULT_WORKERS = 4


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers() -> int:
    """``min(4, CPUs - 1)``: one CPU is left to the training loop itself."""
    return max(0, min(MAX_DEFAULT_WORKERS, cpu_count() - 1))


def resolve_workers(workers: int | None) -> int:
    """``data.workers`` as a count: None -> :func:`default_workers`."""
    if workers is None:
        return default_workers()
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    return int(workers)


class _Order(Sampler[int]):
    """Yields the indices it was last given (set before each pass, in the main process)."""

    def __init__(self) -> None:
        self.order: list[int] = []

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.order))

    def __len__(self) -> int:
        return len(self.order)


class _Failed:
    """A StephError met in a worker, returned as a value so that the main process raises the
    same exception (the DataLoader would wrap it in its own message and traceback)."""

    __slots__ = ("error",)

    def __init__(self, error: StephError):
        self.error = error


class _WorkerView(Dataset):
    """What a worker reads: stored-dtype items, never through the dataset's cache."""

    def __init__(self, data: Any):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        try:
            if isinstance(self.data, BagDataset):
                return self.data.item(i, stored=True, use_cache=False)
            return self.data[i]
        except StephError as e:
            return _Failed(e)


def item_to_device(item: dict[str, Any], device: torch.device,
                   dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A copy of ``item`` with every tensor on ``device`` (asynchronously when pinned) and the
    features as ``dtype``; other values (ids, times, events) as they are."""
    out = {}
    for key, value in item.items():
        if torch.is_tensor(value):
            value = value.to(device, non_blocking=device.type == "cuda" and value.is_pinned())
            if key == "features" and value.is_floating_point():
                value = value.to(dtype)
        out[key] = value
    return out


class BagLoader:
    """Items of ``data`` (a :class:`BagDataset` or any sequence of item dicts) on ``device``.

    ``iterate(order)`` yields ``data[i]`` for ``i`` in ``order``, features as ``dtype``; see
    the module docstring. Close the loader (or use it as a context manager) to stop its
    workers."""

    def __init__(self, data: Sequence[dict[str, Any]], *, workers: int = 0,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 prefetch: int = 2, persistent: bool = True):
        self.data = data
        self.workers = resolve_workers(workers)
        self.device = torch.device(device)
        self.dtype = dtype
        self.prefetch, self.persistent = int(prefetch), bool(persistent)
        self._sampler = _Order()
        self._loader = self._make_loader() if self.workers > 0 else None

    def _make_loader(self) -> DataLoader:
        # generator: the workers' base seed is drawn from it, not from torch's global RNG
        return DataLoader(_WorkerView(self.data), batch_size=None, sampler=self._sampler,
                          num_workers=self.workers, prefetch_factor=self.prefetch,
                          persistent_workers=self.persistent,
                          pin_memory=self.device.type == "cuda",
                          generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.iterate(range(len(self.data)))

    def _main_item(self, i: int, features: torch.Tensor | None = None) -> dict[str, Any]:
        if isinstance(self.data, BagDataset):
            return self.data.item(i, stored=True, features=features)
        return self.data[i]

    def iterate(self, order: Iterable[int]) -> Iterator[dict[str, Any]]:
        """The items of ``order`` (indices into the data), in that order, on the device."""
        order = [int(i) for i in order]
        if self._loader is None:
            for i in order:
                yield item_to_device(self._main_item(i), self.device, self.dtype)
            return
        bags = self.data if isinstance(self.data, BagDataset) else None
        hits: dict[int, torch.Tensor] = {}
        if bags is not None and bags.cache_bytes_max > 0:
            for i in order:  # held until used, even if evicted meanwhile
                bag = bags.cached(bags.patient_ids[i])
                if bag is not None:
                    hits[i] = bag
        self._sampler.order = [i for i in order if i not in hits]
        read = iter(self._loader) if self._sampler.order else iter(())
        for i in order:
            if i in hits:
                bags.cache_hits += 1
                item = self._main_item(i, features=hits[i])
            else:
                item = next(read)
                if isinstance(item, _Failed):
                    raise item.error
                if bags is not None and bags.cache_bytes_max > 0:
                    bags.cache_misses += 1
                    bags.remember(item["patient_id"], item["features"])
            yield item_to_device(item, self.device, self.dtype)

    def close(self) -> None:
        """Stop the worker processes (a later ``iterate`` starts them again)."""
        if self._loader is None:
            return
        it = getattr(self._loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._loader = self._make_loader()

    def __enter__(self) -> BagLoader:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
