"""The extra per-bag inputs a network may declare (its ``bag_inputs``), and how each is built:
for a cohort's patients (training, evaluation, analyses), from feature files (``steph
predict``) and for an example bag on a raster (efficiency measurements). One entry per input
name; every caller goes through this table.

- ``edge_index``: the k-NN graph of each slide's patch coordinates, a disjoint union over the
  patient's slides (:mod:`steph.data.graphs`; Patch-GCN and merges of it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from steph.data import graphs
from steph.errors import ConfigError

# A provider of one input for a cohort's bags: provider(patient_id[, indices]) -> tensor; one
# with ``per_instance = True`` is indexed by the rows a sampled bag kept (see BagDataset).
Provider = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class BagInput:
    name: str
    for_cohort: Callable[[Any, Path | None], Provider]  # (cohort, cache dir) -> provider
    from_files: Callable[[Sequence[Path], Path | None], torch.Tensor]  # (files, cache dir)
    example: Callable[[int], torch.Tensor]  # a bag of n patches on a square raster
    # Build (or read from the cache) the inputs of these patients now (provider, patient ids):
    # a missing prerequisite (a slide without coordinates) stops a run before it trains.
    prepare: Callable[[Provider, Sequence[str]], None] = lambda provider, ids: None


BAG_INPUTS: dict[str, BagInput] = {
    "edge_index": BagInput(
        "edge_index",
        for_cohort=lambda cohort, cache: graphs.PatchGraphs(cohort, cache_dir=cache),
        from_files=lambda files, cache: graphs.bag_graph([Path(f) for f in files],
                                                         cache_dir=cache),
        example=graphs.raster_edges,
        prepare=lambda provider, ids: provider.prepare(list(ids)),
    ),
}


def bag_input(name: str, who: str = "a network") -> BagInput:
    if name not in BAG_INPUTS:
        raise ConfigError(f"{who} needs the per-bag input {name!r}, which steph cannot build "
                          f"(known: {', '.join(BAG_INPUTS)})")
    return BAG_INPUTS[name]


def cohort_providers(names: Sequence[str], cohort: Any, cache_dir: str | Path | None = None,
                     prepare: Sequence[str] = (), who: str = "a network") -> dict[str, Provider]:
    """Providers of the inputs ``names`` for the bags of ``cohort`` (cached under
    ``cache_dir``); the inputs of the patients ``prepare`` are built now."""
    out: dict[str, Provider] = {}
    for name in names:
        kind = bag_input(name, who)
        provider = kind.for_cohort(cohort, Path(cache_dir) if cache_dir is not None else None)
        if prepare:
            kind.prepare(provider, prepare)
        out[name] = provider
    return out


def inputs_from_files(names: Sequence[str], files: Sequence[str | Path],
                      cache_dir: str | Path | None = None, who: str = "the model"
                      ) -> dict[str, torch.Tensor]:
    """The inputs ``names`` of one bag made of the feature files ``files`` (in that order)."""
    cache = Path(cache_dir) if cache_dir is not None else None
    return {name: bag_input(name, who).from_files([Path(f) for f in files], cache)
            for name in names}


def example_inputs(names: Sequence[str], n: int, who: str = "the model"
                   ) -> dict[str, torch.Tensor]:
    """The inputs ``names`` of an example bag of ``n`` patches on a square raster."""
    return {name: bag_input(name, who).example(n) for name in names}
