"""The data pipeline (steph.data.loader): the same items in the same order with or without
worker processes, stored dtype until the device, one cache in the main process, and a corrupt
file reported as steph's own one-line DataError."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steph.data import loader as L
from steph.data.cohort import Cohort
from steph.data.dataset import BagDataset
from steph.data.features import write_features_h5
from steph.errors import DataError
from steph.survival import TimeBins

from .conftest import default_patients


@pytest.fixture
def bags(make_cohort):
    """12 patients of 1-2 float16 slides (3-11 patches each)."""
    w = make_cohort("COH", default_patients(12, seed=3), dim=6)
    c = Cohort.load(w.root)
    return w, BagDataset(c, c.patient_ids, TimeBins.uniform(), max_instances=9, seed=4)


def _items(data, workers, order, **kw):
    with L.BagLoader(data, workers=workers, **kw) as loader:
        return list(loader.iterate(order))


def test_same_items_in_the_given_order_with_or_without_workers(bags):
    _, ds = bags
    order = [5, 0, 11, 3, 3, 7]
    ref = [ds[i] for i in order]  # the dataset's own float32 items
    for workers in (0, 2):
        got = _items(ds, workers, order)
        assert [g["patient_id"] for g in got] == [r["patient_id"] for r in ref]
        for g, r in zip(got, ref):
            assert g["features"].dtype == torch.float32
            assert torch.equal(g["features"], r["features"])  # bit-identical, sampled alike
            assert torch.equal(g["bin"], r["bin"]) and g["event"] == r["event"]


def test_bags_travel_in_their_stored_dtype(bags):
    _, ds = bags
    assert ds.item(0, stored=True)["features"].dtype == torch.float16
    got = _items(ds, 0, [0], dtype=torch.bfloat16)[0]["features"]
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, ds[0]["features"].to(torch.bfloat16))


def test_workers_leave_the_global_rng_alone(bags):
    _, ds = bags
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    _items(ds, 1, range(len(ds)))
    assert torch.equal(torch.rand(2), expected)


def test_one_cache_in_the_main_process(bags):
    _, ds = bags
    ds = BagDataset(ds.cohort, ds.patient_ids, ds.bins, cache_mb=1)
    with L.BagLoader(ds, workers=1) as loader:
        first = [it["features"] for it in loader]
        assert ds.cache_info()["entries"] == len(ds) and ds.cache_misses == len(ds)
        # the second pass is served by the main process's cache: nothing asked of the workers
        second = [it["features"] for it in loader.iterate(reversed(range(len(ds))))]
        assert loader._sampler.order == []
    assert ds.cache_hits == len(ds) and ds.cache_misses == len(ds)
    assert all(torch.equal(a, b) for a, b in zip(first, reversed(second)))


def test_a_corrupt_file_in_a_worker_is_steph_s_one_line_error(bags):
    w, ds = bags
    pid = ds.patient_ids[4]
    sid = w.slide_ids[pid][0]
    x = w.features[sid].copy()
    x[1, 2] = np.nan
    write_features_h5(w.root / "features" / f"{sid}.h5", x.astype(np.float16))
    with L.BagLoader(ds, workers=1) as loader, pytest.raises(DataError) as err:
        list(loader)
    msg = str(err.value)
    assert type(err.value) is DataError and "\n" not in msg and "Traceback" not in msg
    assert f"cohort 'COH', patient '{pid}'" in msg and f"{sid}.h5" in msg and "NaN" in msg


def test_default_workers(monkeypatch):
    for cpus, expected in [(1, 0), (2, 1), (5, 4), (64, 4)]:
        monkeypatch.setattr(L, "cpu_count", lambda n=cpus: n)
        assert L.default_workers() == expected
        assert L.resolve_workers(None) == expected
    assert L.resolve_workers(3) == 3
