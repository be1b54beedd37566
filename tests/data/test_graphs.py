"""k-NN graphs over patch coordinates against brute force; the per-slide cache; errors."""

import os

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from steph.data import graphs
from steph.data.cohort import Cohort
from steph.data.features import write_features_h5, write_features_pt
from steph.errors import DataError


def brute_force(coords, k=8):
    """Every pairwise squared distance; per row sorted by (distance, index), self excluded."""
    c = np.asarray(coords, dtype=np.float64)
    n = len(c)
    d2 = ((c[:, None] - c[None]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    index = np.broadcast_to(np.arange(n), (n, n))
    return np.lexsort((index, d2), axis=-1)[:, : min(k, n - 1)]


def raster(n, side=None, step=256):
    side = side or int(np.ceil(np.sqrt(n)))
    return np.stack([np.arange(n) % side, np.arange(n) // side], axis=1) * step


@pytest.mark.parametrize("n", [1, 2, 3, 8, 9, 10, 57, 200])
def test_raster_with_ties_matches_brute_force(n):
    # on a raster almost every k-th distance is a tie: the lower index must win, every time
    assert np.array_equal(graphs.knn_neighbours(raster(n)), brute_force(raster(n)))


def test_duplicates_floats_and_clusters_match_brute_force():
    rng = np.random.default_rng(0)
    for coords in (rng.integers(0, 5, size=(120, 2)),  # many duplicate points
                   rng.random((150, 2)) * 1e4,  # no ties
                   np.concatenate([raster(30), raster(30) + 10**6])):  # two far-apart pieces
        assert np.array_equal(graphs.knn_neighbours(coords), brute_force(coords))


def test_ties_beyond_the_candidate_margin(monkeypatch):
    """With no margin every raster node must be queried again with more candidates."""
    monkeypatch.setattr(graphs, "_TIE_MARGIN", 0)
    coords = raster(300, side=17)
    assert np.array_equal(graphs.knn_neighbours(coords), brute_force(coords))
    assert np.array_equal(graphs.knn_neighbours(coords, k=3), brute_force(coords, k=3))


def test_edges_point_from_neighbour_to_node_and_union_offsets():
    coords = raster(12)
    e = graphs.knn_edges(coords)
    assert e.dtype == np.int64 and e.shape == (2, 12 * 8)
    assert np.array_equal(e[1], np.repeat(np.arange(12), 8))  # grouped by destination
    assert np.array_equal(e[0].reshape(12, 8), brute_force(coords))
    small = graphs.knn_edges(raster(3))  # 3 patches: 2 neighbours each
    u = graphs.union_edges([e, small], [12, 3])
    assert u.shape == (2, 96 + 6)
    assert np.array_equal(u[:, 96:], small + 12)
    assert graphs.union_edges([], []).shape == (2, 0)


def _slide(path, n, coords=True, **kw):
    x = np.random.default_rng(n).standard_normal((n, 4)).astype(np.float32)
    return write_features_h5(path, x, coords=raster(n) if coords else None, **kw)


def test_missing_or_mismatched_coords_name_the_slide_and_file(tmp_path):
    no_coords = _slide(tmp_path / "S-no.h5", 5, coords=False)
    with pytest.raises(DataError, match=r"slide 'S-no' \(.*S-no\.h5\): has no patch coordinates"):
        graphs.slide_neighbours(no_coords, slide_id="S-no")
    pt = write_features_pt(tmp_path / "S-pt.pt", np.zeros((5, 4), np.float32))
    with pytest.raises(DataError, match=r"S-pt.*carries no patch coordinates"):
        graphs.slide_neighbours(pt)
    bad = tmp_path / "S-bad.h5"
    with h5py.File(bad, "w") as f:
        f["features"] = np.zeros((5, 4), np.float32)
        f["coords"] = np.zeros((4, 2), np.int64)
    with pytest.raises(DataError, match=r"S-bad.*coords has 4 rows but features has 5"):
        graphs.slide_neighbours(bad, slide_id="S-bad")
    ok = _slide(tmp_path / "S-ok.h5", 5)
    with pytest.raises(DataError, match=r"slide 'S-ok'.*5 patch coordinates but 6 patches"):
        graphs.bag_graph([ok], ["S-ok"], n_patches=[6])


def test_cache_builds_once_reuses_and_invalidates(tmp_path, monkeypatch):
    calls = []
    real = graphs.knn_neighbours
    monkeypatch.setattr(graphs, "knn_neighbours", lambda c, k=8: calls.append(k) or real(c, k))
    cache = tmp_path / "graphs"
    path = _slide(tmp_path / "S1.h5", 30)
    first = graphs.slide_neighbours(path, cache_dir=cache)
    assert np.array_equal(first, brute_force(raster(30))) and len(calls) == 1
    (entry,) = cache.iterdir()
    again = graphs.slide_neighbours(path, cache_dir=cache)  # read from the cache
    assert np.array_equal(again, first) and len(calls) == 1
    graphs.slide_neighbours(path, k=4, cache_dir=cache)  # another k: rebuilt
    assert calls == [8, 4]
    graphs.slide_neighbours(path, cache_dir=cache)
    assert calls == [8, 4, 8]
    _slide(path, 40)  # the feature file changed (size and mtime): rebuilt, with 40 nodes
    assert len(graphs.slide_neighbours(path, cache_dir=cache)) == 40 and len(calls) == 4
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # only touched: rebuilt too
    graphs.slide_neighbours(path, cache_dir=cache)
    assert len(calls) == 5
    entry.write_bytes(b"not a safetensors file")  # a broken entry is rebuilt, not fatal
    assert len(graphs.slide_neighbours(path, cache_dir=cache)) == 40 and len(calls) == 6
    assert [p.name for p in cache.iterdir()] == [entry.name]  # one entry per slide


def test_patient_graph_is_the_disjoint_union_of_its_slides(tmp_path):
    feats = tmp_path / "C" / "features"
    sizes = {"P1-S1": 12, "P1-S2": 3, "P2-S1": 20}
    for sid, n in sizes.items():
        _slide(feats / f"{sid}.h5", n)
    pd.DataFrame({"patient_id": ["P1", "P1", "P2"], "slide_id": list(sizes),
                  "time": [100, 100, 200], "event": [1, 1, 0]}).to_csv(
        tmp_path / "C" / "labels.csv", index=False)
    cohort = Cohort.load(tmp_path / "C")
    edges = graphs.patient_graph(cohort, "P1", cache_dir=tmp_path / "cache")
    assert edges.dtype == torch.int64
    expected = graphs.union_edges([graphs.knn_edges(raster(12)), graphs.knn_edges(raster(3))],
                                  [12, 3])
    assert np.array_equal(edges.numpy(), expected)
    assert int(edges.max()) == cohort.load_bag("P1").shape[0] - 1
    with pytest.raises(DataError, match="unknown patient"):
        graphs.patient_graph(cohort, "P9")
    with h5py.File(feats / "P2-S1.h5", "a") as f:
        del f["coords"]
    with pytest.raises(DataError, match=r"cohort 'C', patient 'P2': slide 'P2-S1'"):
        graphs.patient_graph(cohort, "P2")
