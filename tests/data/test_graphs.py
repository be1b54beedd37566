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


# -- sampled bags: the graph follows the kept patches -------------------------------------------

def _cohort_with_coords(tmp_path, sizes, seed=0):
    """A cohort whose slides have random (tie-free) float coordinates; returns the cohort and
    each slide's coordinates."""
    rng = np.random.default_rng(seed)
    feats, coords, rows = tmp_path / "C" / "features", {}, []
    for sid, n in sizes.items():
        coords[sid] = rng.random((n, 2)) * 1000
        write_features_h5(feats / f"{sid}.h5", rng.standard_normal((n, 4)).astype(np.float32),
                          coords=coords[sid])
        rows.append((sid.split("-")[0], sid, 100, 1))
    pd.DataFrame(rows, columns=["patient_id", "slide_id", "time", "event"]).to_csv(
        tmp_path / "C" / "labels.csv", index=False)
    return Cohort.load(tmp_path / "C"), coords


def _expected_edges(slide_coords):
    """Disjoint union of brute-force k-NN graphs, node ids offset slide by slide."""
    parts = [graphs.neighbours_to_edges(brute_force(c)) for c in slide_coords]
    return graphs.union_edges(parts, [len(c) for c in slide_coords])


def test_split_indices():
    got = graphs.split_indices(np.array([0, 3, 4, 9, 10]), [4, 0, 6, 1])
    assert [g.tolist() for g in got] == [[0, 3], [], [0, 5], [0]]
    with pytest.raises(ValueError, match="sorted"):
        graphs.split_indices(np.array([3, 1]), [4])
    with pytest.raises(ValueError, match="out of range"):
        graphs.split_indices(np.array([4]), [4])


def test_sampled_patient_graph_is_the_knn_of_the_kept_patches(tmp_path):
    cohort, coords = _cohort_with_coords(tmp_path, {"P1-S1": 40, "P1-S2": 25, "P1-S3": 12})
    keep = np.sort(np.random.default_rng(1).choice(77, size=30, replace=False))
    keep = keep[(keep < 65) | (keep > 70)]  # some slides lose many patches
    got = graphs.patient_graph(cohort, "P1", indices=keep, cache_dir=tmp_path / "cache")
    sides = graphs.split_indices(keep, [40, 25, 12])
    kept = [c[s] for c, s in zip(coords.values(), sides)]
    assert np.array_equal(got.numpy(), _expected_edges(kept))
    assert int(got.max()) == len(keep) - 1
    # every kept patch keeps its k (here 8) neighbours where its slide kept more than k patches
    degree = np.bincount(got[1].numpy(), minlength=len(keep))
    assert (degree == np.concatenate([np.full(len(s), min(8, len(s) - 1)) for s in sides])).all()
    # the whole bag is unchanged
    whole = graphs.patient_graph(cohort, "P1", cache_dir=tmp_path / "cache")
    assert np.array_equal(whole.numpy(), _expected_edges(list(coords.values())))
    # a slide with no kept patch adds no node
    first_only = graphs.patient_graph(cohort, "P1", indices=np.arange(5))
    assert np.array_equal(first_only.numpy(), _expected_edges([coords["P1-S1"][:5]]))


def test_dataset_with_patch_sampling_gets_the_graph_of_its_sampled_bag(tmp_path, monkeypatch):
    from steph.data.dataset import BagDataset
    from steph.data.features import read_coords
    from steph.survival import TimeBins

    cohort, coords = _cohort_with_coords(tmp_path, {"P1-S1": 40, "P1-S2": 25, "P2-S1": 9})
    provider = graphs.PatchGraphs(cohort, cache_dir=tmp_path / "cache")
    ds = BagDataset(cohort, ["P1", "P2"], TimeBins.uniform(), max_instances=20, seed=3)
    ds.set_bag_inputs({"edge_index": provider})
    item = ds[0]
    keep = ds.kept_indices("P1")
    assert len(keep) == 20 == item["features"].shape[0]
    bag_coords = np.concatenate([coords["P1-S1"], coords["P1-S2"]])
    files = cohort.slides.set_index("slide_id")["path"]
    features = np.concatenate([read_coords(files["P1-S1"]), read_coords(files["P1-S2"])])
    np.testing.assert_allclose(features, bag_coords)  # rows and coords line up in the files
    sides = graphs.split_indices(keep, [40, 25])
    expected = _expected_edges([coords["P1-S1"][sides[0]], coords["P1-S2"][sides[1]]])
    assert np.array_equal(item["edge_index"].numpy(), expected)
    # built once: a second epoch reads the cached sampled graph
    calls = []
    real = graphs.knn_neighbours
    monkeypatch.setattr(graphs, "knn_neighbours", lambda c, k=8: calls.append(len(c)) or real(c, k))
    assert np.array_equal(ds[0]["edge_index"].numpy(), expected) and calls == []
    assert ds[1]["edge_index"].shape == (2, 9 * 8)  # P2 (9 patches) is whole
    full = ds.full_bags()[0]["edge_index"]
    assert np.array_equal(full.numpy(), _expected_edges([coords["P1-S1"], coords["P1-S2"]]))


def test_prepare_reports_a_slide_without_coords_before_training(tmp_path):
    cohort, _ = _cohort_with_coords(tmp_path, {"P1-S1": 10, "P2-S1": 9})
    with h5py.File(cohort.slides.set_index("slide_id")["path"]["P2-S1"], "a") as f:
        del f["coords"]
    provider = graphs.PatchGraphs(cohort, cache_dir=tmp_path / "cache")
    provider.prepare(["P1"])
    with pytest.raises(DataError, match=r"patient 'P2': slide 'P2-S1' \(.*P2-S1\.h5\): has no "
                                        "patch coordinates"):
        provider.prepare(["P1", "P2"])
