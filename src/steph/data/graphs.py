"""k-nearest-neighbour graphs over patch coordinates: the bag graphs of Patch-GCN.

A slide's graph joins every patch to its ``k = 8`` nearest other patches (Euclidean distance
between patch coordinates, the patch itself excluded) by directed edges ``neighbour -> patch``:
every patch aggregates its k nearest neighbours. A slide with n <= k patches gives each patch
its n - 1 others. Ties at the k-th distance, common on a patch raster, go to the lower patch
index, so the graph is deterministic (exactly so for integer coordinates). A patient's slides
form a disjoint union: node ids are offset by the patches of the slides before, in the order
their features are concatenated (:meth:`steph.data.cohort.Cohort.load_bag`).

Candidates come from scikit-learn's ``NearestNeighbors`` (a KD-tree in 2-d); their distances
are recomputed in numpy for the tie-break, and a node whose tie group at the k-th distance may
extend beyond the candidates is queried again with more.

Edge layout: ``edge_index`` is a (2, E) int64 array/tensor, row 0 the neighbour (source), row 1
the patch that aggregates it (destination), grouped by destination, nearest first.

Graphs are built once and cached when a cache folder is given: one safetensors file per slide
(its neighbour table, int32) whose metadata records the feature file, its size and
modification time and k; a changed feature file or another k rebuilds it (a file replaced by
one of identical size and mtime is not noticed).

Sampled bags (``data.max_instances``): the graph follows the sampled patches. Given the kept
rows of a bag, each slide's graph is the k-NN graph of its kept patches' coordinates (cached
under an entry of its own); :class:`PatchGraphs` is the provider a dataset calls with those
rows.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors

from steph.data.features import read_coords
from steph.errors import DataError
from steph.utils.io import load_tensor_metadata, load_tensors, save_tensors

logger = logging.getLogger("steph.data.graphs")

K_NEIGHBOURS = 8
CACHE_VERSION = "1"
# extra candidates fetched beyond k + 1, so that ties at the k-th distance on a raster rarely
# need a second query
_TIE_MARGIN = 8


def knn_neighbours(coords: Any, k: int = K_NEIGHBOURS) -> np.ndarray:
    """(N, min(k, N - 1)) int64: row i lists the k nearest other points of point i, nearest
    first, ties by the lower index."""
    pts = np.asarray(coords, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"coords must have shape (N, 2), got {pts.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = len(pts)
    kk = min(k, n - 1)
    out = np.empty((n, max(kk, 0)), dtype=np.int64)
    if kk <= 0:
        return out
    tree = NearestNeighbors().fit(pts)
    rows = np.arange(n)
    m = min(n, kk + 1 + _TIE_MARGIN)
    while rows.size:
        cand = tree.kneighbors(pts[rows], n_neighbors=m, return_distance=False)
        d2 = ((pts[cand] - pts[rows, None]) ** 2).sum(axis=-1)
        is_self = cand == rows[:, None]
        farthest = np.where(is_self, -np.inf, d2).max(axis=1)
        d2 = np.where(is_self, np.inf, d2)
        order = np.lexsort((cand, d2), axis=-1)  # by distance, then index
        best = np.take_along_axis(cand, order, axis=1)[:, :kk]
        cutoff = np.take_along_axis(d2, order, axis=1)[:, kk - 1]
        # complete when every point as near as the k-th one is among the candidates
        done = (m == n) | (farthest > cutoff)
        out[rows[done]] = best[done]
        rows = rows[~done]
        m = min(n, 2 * m)
    return out


def neighbours_to_edges(neighbours: np.ndarray) -> np.ndarray:
    """(2, N * k) int64 edges neighbour -> node from a neighbour table (N, k)."""
    n, k = neighbours.shape
    dst = np.repeat(np.arange(n, dtype=np.int64), k)
    return np.stack([neighbours.reshape(-1).astype(np.int64), dst])


def knn_edges(coords: Any, k: int = K_NEIGHBOURS) -> np.ndarray:
    """(2, E) int64 edges neighbour -> node of the k-NN graph of one slide's coordinates."""
    return neighbours_to_edges(knn_neighbours(coords, k))


def union_edges(parts: Sequence[np.ndarray], sizes: Sequence[int]) -> np.ndarray:
    """Disjoint union of graphs with ``sizes[i]`` nodes each: node ids offset by the sizes of
    the graphs before."""
    if len(parts) != len(sizes):
        raise ValueError(f"{len(parts)} graphs but {len(sizes)} sizes")
    if not parts:
        return np.zeros((2, 0), dtype=np.int64)
    offsets = np.cumsum([0, *sizes[:-1]])
    return np.concatenate([p + int(o) for p, o in zip(parts, offsets)], axis=1)


# --------------------------------------------------------------------------------------------
# one slide, cached


def _subset_tag(subset: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(subset, dtype=np.int64).tobytes(),
                           digest_size=8).hexdigest()


def _cache_file(cache_dir: Path, path: Path, subset_tag: str | None = None) -> Path:
    digest = hashlib.blake2b(str(path.resolve()).encode("utf-8"), digest_size=8).hexdigest()
    tail = f"-s{subset_tag}" if subset_tag else ""
    return cache_dir / f"{path.stem}-{digest}{tail}.safetensors"


def _cache_key(path: Path, k: int, subset_tag: str | None = None) -> dict[str, str]:
    st = os.stat(path)
    key = {"version": CACHE_VERSION, "source": str(path.resolve()), "size": str(st.st_size),
           "mtime_ns": str(st.st_mtime_ns), "k": str(k)}
    if subset_tag:
        key["subset"] = subset_tag
    return key


def slide_neighbours(path: str | os.PathLike, *, slide_id: str | None = None,
                     k: int = K_NEIGHBOURS, cache_dir: str | os.PathLike | None = None,
                     subset: np.ndarray | None = None) -> np.ndarray:
    """The k-NN neighbour table (N, min(k, N - 1)) of one slide's feature file, read from
    ``cache_dir`` when a valid entry is there, else built (and stored there when given).

    ``subset``: sorted row indices of the slide's patches to keep (a sampled bag): the graph is
    then the k-NN graph of those patches' coordinates (node i = ``subset[i]``), as if the slide
    had only them, cached under its own entry (the indices' digest in its name and key).

    Raises :class:`DataError` naming the slide and file when the file has no ``coords`` or
    their count differs from the number of patches."""
    path = Path(path)
    tag = None if subset is None else _subset_tag(subset)
    cache = key = None
    if cache_dir is not None:
        cache = _cache_file(Path(cache_dir), path, tag)
        key = _cache_key(path, k, tag)
        if cache.is_file():
            try:
                if load_tensor_metadata(cache) == key:
                    return load_tensors(cache)["neighbours"].numpy().astype(np.int64)
            except Exception as e:  # noqa: BLE001 - an unreadable entry is rebuilt, not fatal
                logger.debug("graph cache entry %s unreadable (%s); rebuilding", cache, e)
    coords = read_coords(path, slide_id=slide_id, required=True)
    if subset is not None:
        if len(subset) and (int(subset[0]) < 0 or int(subset[-1]) >= len(coords)):
            raise DataError(f"slide {_name(path, slide_id)!r} ({path}): patch index "
                            f"{int(subset[-1])} out of range for {len(coords)} patches")
        coords = coords[np.asarray(subset, dtype=np.int64)]
    neighbours = knn_neighbours(coords, k)
    if cache is not None:
        save_tensors(cache, {"neighbours": torch.from_numpy(neighbours.astype(np.int32))},
                     metadata=key)
    return neighbours


def _name(path: Path, slide_id: str | None) -> str:
    return slide_id if slide_id is not None else Path(path).stem


def bag_graph(paths: Sequence[str | os.PathLike], slide_ids: Sequence[str] | None = None, *,
              n_patches: Sequence[int] | None = None, k: int = K_NEIGHBOURS,
              cache_dir: str | os.PathLike | None = None,
              subsets: Sequence[np.ndarray | None] | None = None) -> torch.Tensor:
    """(2, E) int64 edge_index of a bag made of the slides ``paths`` (in concatenation order):
    the disjoint union of their k-NN graphs. ``n_patches``, when given, is checked against each
    slide's number of coordinates. ``subsets[i]``, when given, keeps only those patches of
    slide i (see :func:`slide_neighbours`); a slide with none kept adds no node."""
    parts, sizes = [], []
    for i, path in enumerate(paths):
        sid = slide_ids[i] if slide_ids is not None else None
        subset = subsets[i] if subsets is not None else None
        if subset is not None and len(subset) == 0:
            continue
        neighbours = slide_neighbours(path, slide_id=sid, k=k, cache_dir=cache_dir,
                                      subset=subset)
        if subset is None and n_patches is not None and len(neighbours) != int(n_patches[i]):
            raise DataError(f"slide {_name(path, sid)!r} ({path}): {len(neighbours)} patch "
                            f"coordinates but {int(n_patches[i])} patches (the file changed "
                            "since the cohort was loaded?)")
        parts.append(neighbours_to_edges(neighbours))
        sizes.append(len(neighbours))
    return torch.from_numpy(union_edges(parts, sizes))


def split_indices(indices: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    """Sorted bag-level row indices -> one array of slide-local indices per slide (slides of
    ``sizes`` rows, in concatenation order)."""
    idx = np.asarray(indices, dtype=np.int64)
    if len(idx) > 1 and not (np.diff(idx) > 0).all():
        raise ValueError("bag indices must be sorted and distinct")
    bounds = np.cumsum([0, *sizes])
    if len(idx) and (idx[0] < 0 or idx[-1] >= bounds[-1]):
        raise ValueError(f"bag indices out of range for a bag of {int(bounds[-1])} rows")
    cuts = np.searchsorted(idx, bounds)
    return [idx[cuts[i]:cuts[i + 1]] - bounds[i] for i in range(len(sizes))]


def patient_graph(cohort: Any, patient_id: str, *, k: int = K_NEIGHBOURS,
                  cache_dir: str | os.PathLike | None = None,
                  indices: np.ndarray | None = None) -> torch.Tensor:
    """edge_index of a patient's bag as :meth:`Cohort.load_bag` concatenates it; with
    ``indices`` (sorted rows of that bag, e.g. the patches a training sampler kept), the graph
    of the sampled bag: node i is row ``indices[i]``, each slide's k-NN graph rebuilt over its
    kept patches' coordinates (every kept patch keeps k neighbours, unlike the induced
    subgraph, where sampled-out neighbours would leave patches with fewer or none)."""
    cohort.patient(patient_id)  # unknown patient: DataError
    slides = cohort.slides[cohort.slides["patient_id"] == patient_id]
    sizes = [int(n) for n in slides["n_patches"]]
    subsets = None if indices is None else split_indices(indices, sizes)
    try:
        return bag_graph(slides["path"].tolist(), slides["slide_id"].tolist(),
                         n_patches=sizes, k=k, cache_dir=cache_dir, subsets=subsets)
    except DataError as e:
        raise DataError(f"cohort {cohort.name!r}, patient {patient_id!r}: {e}") from e


class PatchGraphs:
    """The per-bag input ``edge_index`` of Patch-GCN for the bags of one cohort: a provider
    ``(patient_id, indices) -> (2, E) int64 tensor`` for :meth:`BagDataset.set_bag_inputs`.

    ``per_instance = True`` tells the dataset that the input is indexed by the bag's rows, so a
    dataset that samples patches (``max_instances``) passes the kept row indices and gets the
    graph of the sampled bag (:func:`patient_graph`); ``indices=None`` is the whole bag. Graphs
    are cached per slide in ``cache_dir`` (sampled bags under their own entries), so each is
    built once, not every epoch; :meth:`prepare` builds them all up front, so that a slide
    without coordinates is reported before any training."""

    per_instance = True

    def __init__(self, cohort: Any, cache_dir: str | os.PathLike | None = None,
                 k: int = K_NEIGHBOURS):
        self.cohort = cohort
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.k = int(k)

    def __call__(self, patient_id: str, indices: np.ndarray | None = None) -> torch.Tensor:
        return patient_graph(self.cohort, patient_id, k=self.k, cache_dir=self.cache_dir,
                             indices=indices)

    def prepare(self, patient_ids: Sequence[str]) -> None:
        """Build (and cache) the whole-bag graph of every patient now."""
        ids = list(patient_ids)
        logger.info("cohort %s: k-NN patch graphs of %d patient(s)%s", self.cohort.name,
                    len(ids), f" (cache {self.cache_dir})" if self.cache_dir else "")
        for pid in ids:
            self(pid)


def raster_edges(n: int, k: int = K_NEIGHBOURS) -> torch.Tensor:
    """edge_index of ``n`` patches laid row-major on a square raster (an example graph for
    measurements: every interior patch has its 8 grid neighbours)."""
    side = max(1, int(np.ceil(np.sqrt(n))))
    coords = np.stack([np.arange(n) % side, np.arange(n) // side], axis=1)
    return torch.from_numpy(knn_edges(coords, k))
