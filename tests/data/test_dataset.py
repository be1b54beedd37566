from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from steph.data.cohort import Cohort
from steph.data.dataset import BagDataset, subsample_indices
from steph.data.features import write_features_h5
from steph.errors import DataError
from steph.survival import TimeBins

from .conftest import PatientSpec


def _cohort(make_cohort, **kw):
    specs = [
        PatientSpec("A", 10.0, 1, [5, 4]),
        PatientSpec("B", 400.0, 0, [30]),
        PatientSpec("C", 800.0, 1, [7]),
        PatientSpec("D", 20000.0, 0, [6]),
    ]
    w = make_cohort("C", specs, dim=6, dtype=np.float32, **kw)
    return w, Cohort.load(w.root)


def test_items(make_cohort):
    w, c = _cohort(make_cohort)
    bins = TimeBins.uniform()
    ds = BagDataset(c, ["D", "A", "C"], bins)
    assert len(ds) == 3
    item = ds[1]
    assert set(item) == {"features", "bin", "time", "event", "patient_id"}
    assert item["patient_id"] == "A" and item["time"] == 10.0 and item["event"] == 1
    assert isinstance(item["time"], float) and isinstance(item["event"], int)
    assert item["features"].dtype == torch.float32 and tuple(item["features"].shape) == (9, 6)
    np.testing.assert_array_equal(item["features"].numpy(),
                                  np.concatenate([w.features["A-SZ"], w.features["A-SY"]]))
    assert item["bin"].dtype == torch.int64 and item["bin"].dim() == 0
    assert [int(ds[i]["bin"]) for i in range(3)] == bins.to_bins([20000.0, 10.0, 800.0]).tolist()
    assert int(ds[0]["bin"]) == 31 and int(ds[2]["bin"]) == 2
    assert ds[-1]["patient_id"] == "C"
    with pytest.raises(IndexError):
        ds[3]
    np.testing.assert_array_equal(ds.bin_indices, [31, 0, 2])


def test_unknown_or_repeated_patients(make_cohort):
    _, c = _cohort(make_cohort)
    with pytest.raises(DataError, match=r"1 unknown patient id\(s\): 'Z'"):
        BagDataset(c, ["A", "Z"], TimeBins.uniform())
    with pytest.raises(DataError, match="repeated"):
        BagDataset(c, ["A", "A"], TimeBins.uniform())


def test_reads_from_disk_without_cache(make_cohort, monkeypatch):
    _, c = _cohort(make_cohort)
    ds = BagDataset(c, ["A", "B"], TimeBins.uniform())
    calls = []
    orig = c.load_bag
    monkeypatch.setattr(c, "load_bag", lambda p, **kw: calls.append(p) or orig(p, **kw))
    ds[0], ds[0], ds[1]
    assert calls == ["A", "A", "B"]
    assert ds.cache_info()["entries"] == 0


def test_lru_cache_is_bounded(make_cohort, monkeypatch):
    _, c = _cohort(make_cohort)
    # bags: A 9x6, B 30x6, C 7x6 float32 -> 216, 720, 168 bytes; cap 1000 bytes
    ds = BagDataset(c, ["A", "B", "C"], TimeBins.uniform(), cache_mb=1000 / 2**20)
    calls = []
    orig = c.load_bag
    monkeypatch.setattr(c, "load_bag", lambda p, **kw: calls.append(p) or orig(p, **kw))
    first = ds[0]["features"]
    assert ds[0]["features"] is first and calls == ["A"]
    ds[1]  # A + B = 936 bytes
    ds[2]  # + C = 1104 > 1000: evict the least recently used (A)
    info = ds.cache_info()
    assert info["bytes"] <= 1000 and info["entries"] == 2
    ds[1]
    ds[0]
    assert calls == ["A", "B", "C", "A"]
    assert ds.cache_info()["hits"] == 2 and ds.cache_info()["misses"] == 4


def test_bag_larger_than_cache_is_not_cached(make_cohort):
    _, c = _cohort(make_cohort)
    ds = BagDataset(c, ["B"], TimeBins.uniform(), cache_mb=100 / 2**20)
    ds[0], ds[0]
    assert ds.cache_info()["entries"] == 0 and ds.cache_info()["misses"] == 2


def test_max_instances_subsampling_is_deterministic(make_cohort):
    w, c = _cohort(make_cohort)
    bins = TimeBins.uniform()
    ds = BagDataset(c, ["A", "B", "C"], bins, max_instances=8, seed=5)
    b1 = ds[1]["features"]
    assert tuple(b1.shape) == (8, 6)
    full = w.features["B-SZ"]
    idx = subsample_indices(30, 8, 5, "B")
    np.testing.assert_array_equal(b1.numpy(), full[idx])
    assert np.all(np.diff(idx) > 0)  # sorted, distinct
    # the same subset every time, in another dataset object too
    np.testing.assert_array_equal(ds[1]["features"].numpy(), b1.numpy())
    ds2 = BagDataset(c, ["B"], bins, max_instances=8, seed=5, cache_mb=1)
    np.testing.assert_array_equal(ds2[0]["features"].numpy(), b1.numpy())
    # another seed, another subset; small bags untouched
    ds3 = BagDataset(c, ["B"], bins, max_instances=8, seed=6)
    assert not np.array_equal(ds3[0]["features"].numpy(), b1.numpy())
    assert tuple(ds[2]["features"].shape) == (7, 6)
    assert not np.array_equal(subsample_indices(30, 8, 5, "B"), subsample_indices(30, 8, 5, "X"))
    with pytest.raises(DataError, match="max_instances"):
        BagDataset(c, ["B"], bins, max_instances=0)


def test_full_bags_drops_the_training_sampler(make_cohort):
    w, c = _cohort(make_cohort)
    ds = BagDataset(c, ["B", "A"], TimeBins.uniform(), max_instances=8, seed=5, cache_mb=1)
    ds[0]
    full = ds.full_bags()
    assert full.max_instances is None and full.patient_ids == ["B", "A"]
    assert full.cache_bytes_max == ds.cache_bytes_max and full.cache_info()["entries"] == 0
    np.testing.assert_array_equal(full[0]["features"].numpy(), w.features["B-SZ"])
    assert tuple(ds[0]["features"].shape) == (8, 6)  # the training view is unchanged
    np.testing.assert_array_equal(full.bin_indices, ds.bin_indices)
    ds.set_bag_inputs({"n": lambda pid: len(pid)})
    assert ds.full_bags()[1]["n"] == 1  # per-bag inputs carried over


def test_nan_bag_names_patient_and_file(make_cohort):
    w, c = _cohort(make_cohort)
    x = w.features["A-SY"].copy()
    x[0, 0] = np.inf
    write_features_h5(w.root / "features" / "A-SY.h5", x)
    ds = BagDataset(c, ["A"], TimeBins.uniform())
    with pytest.raises(DataError) as e:
        ds[0]
    msg = str(e.value)
    assert "patient 'A'" in msg and "A-SY.h5" in msg and "inf" in msg


def test_dataloader(make_cohort):
    _, c = _cohort(make_cohort)
    ds = BagDataset(c, c.patient_ids, TimeBins.uniform())
    loader = DataLoader(ds, batch_size=None, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    seen = sorted(item["patient_id"] for item in loader)
    assert seen == ["A", "B", "C", "D"]


def test_bag_input_providers_add_item_keys(make_cohort):
    from steph.data.cohort import Cohort
    from steph.data.dataset import BagDataset
    from steph.survival.bins import TimeBins

    written = make_cohort()
    cohort = Cohort.load(written.root)
    ids = list(cohort.patients["patient_id"])[:3]
    ds = BagDataset(cohort, ids, TimeBins.uniform(4, 4000.0))
    ds.set_bag_inputs({"n": lambda pid: torch.tensor(len(pid))})
    assert [int(ds[i]["n"]) for i in range(3)] == [len(p) for p in ids]
    with pytest.raises(ValueError, match="reserved"):
        ds.set_bag_inputs({"features": lambda pid: None})


def test_per_instance_providers_get_the_kept_rows(make_cohort):
    """A provider indexed by the bag's rows (``per_instance``) is told which rows a sampled bag
    kept (None: the whole bag); a plain provider only gets the patient id."""
    _, c = _cohort(make_cohort)

    class Rows:
        per_instance = True

        def __call__(self, pid, indices):
            return indices

    ds = BagDataset(c, ["B", "C"], TimeBins.uniform(), max_instances=8, seed=5)
    ds.set_bag_inputs({"rows": Rows(), "pid": lambda pid: pid})
    item = ds[0]
    np.testing.assert_array_equal(item["rows"], subsample_indices(30, 8, 5, "B"))
    assert item["pid"] == "B" and len(item["rows"]) == item["features"].shape[0]
    assert ds[1]["rows"] is None  # 7 patches: whole
    assert ds.full_bags()[0]["rows"] is None
    assert ds.n_sampled() == 1 and ds.full_bags().n_sampled() == 0
    assert ds.kept_indices("C") is None
    again = ds.resampled(20)
    assert again.max_instances == 20 and len(again[0]["rows"]) == 20
