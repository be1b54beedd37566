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


def _cache_file(cache_dir: Path, path: Path) -> Path:
    digest = hashlib.blake2b(str(path.resolve()).encode("utf-8"), digest_size=8).hexdigest()
    return cache_dir / f"{path.stem}-{digest}.safetensors"


def _cache_key(path: Path, k: int) -> dict[str, str]:
    st = os.stat(path)
    return {"version": CACHE_VERSION, "source": str(path.resolve()), "size": str(st.st_size),
            "mtime_ns": str(st.st_mtime_ns), "k": str(k)}


def slide_neighbours(path: str | os.PathLike, *, slide_id: str | None = None,
                     k: int = K_NEIGHBOURS, cache_dir: str | os.PathLike | None = None
                     ) -> np.ndarray:
    """The k-NN neighbour table (N, min(k, N - 1)) of one slide's feature file, read from
    ``cache_dir`` when a valid entry is there, else built (and stored there when given).

    Raises :class:`DataError` naming the slide and file when the file has no ``coords`` or
    their count differs from the number of patches."""
    path = Path(path)
    if cache_dir is None:
        return knn_neighbours(read_coords(path, slide_id=slide_id, required=True), k)
    cache = _cache_file(Path(cache_dir), path)
    key = _cache_key(path, k)
    if cache.is_file():
        try:
            if load_tensor_metadata(cache) == key:
                return load_tensors(cache)["neighbours"].numpy().astype(np.int64)
        except Exception as e:  # noqa: BLE001 - an unreadable entry is rebuilt, not fatal
            logger.debug("graph cache entry %s unreadable (%s); rebuilding", cache, e)
    neighbours = knn_neighbours(read_coords(path, slide_id=slide_id, required=True), k)
    save_tensors(cache, {"neighbours": torch.from_numpy(neighbours.astype(np.int32))},
                 metadata=key)
    return neighbours


def bag_graph(paths: Sequence[str | os.PathLike], slide_ids: Sequence[str] | None = None, *,
              n_patches: Sequence[int] | None = None, k: int = K_NEIGHBOURS,
              cache_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """(2, E) int64 edge_index of a bag made of the slides ``paths`` (in concatenation order):
    the disjoint union of their k-NN graphs. ``n_patches``, when given, is checked against each
    slide's number of coordinates."""
    parts, sizes = [], []
    for i, path in enumerate(paths):
        sid = slide_ids[i] if slide_ids is not None else None
        neighbours = slide_neighbours(path, slide_id=sid, k=k, cache_dir=cache_dir)
        if n_patches is not None and len(neighbours) != int(n_patches[i]):
            name = sid if sid is not None else Path(path).stem
            raise DataError(f"slide {name!r} ({path}): {len(neighbours)} patch coordinates but "
                            f"{int(n_patches[i])} patches (the file changed since the cohort "
                            "was loaded?)")
        parts.append(neighbours_to_edges(neighbours))
        sizes.append(len(neighbours))
    return torch.from_numpy(union_edges(parts, sizes))


def patient_graph(cohort: Any, patient_id: str, *, k: int = K_NEIGHBOURS,
                  cache_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """edge_index of a patient's bag as :meth:`Cohort.load_bag` concatenates it."""
    cohort.patient(patient_id)  # unknown patient: DataError
    slides = cohort.slides[cohort.slides["patient_id"] == patient_id]
    try:
        return bag_graph(slides["path"].tolist(), slides["slide_id"].tolist(),
                         n_patches=slides["n_patches"].tolist(), k=k, cache_dir=cache_dir)
    except DataError as e:
        raise DataError(f"cohort {cohort.name!r}, patient {patient_id!r}: {e}") from e
