from __future__ import annotations

import logging

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

import steph.data.cohort as cohort_mod
from steph.data.cohort import Cohort, discover_cohorts
from steph.data.features import write_features_h5
from steph.errors import DataError

from .conftest import PatientSpec


def _specs():
    return [
        PatientSpec("P2", 300.0, 1, [4, 6]),
        PatientSpec("P1", 100.0, 0, [5]),
        PatientSpec("P3", 50.0, 1, [3, 2, 7]),
    ]


def test_load_basic(make_cohort):
    w = make_cohort("BLCA", _specs(), dim=8)
    c = Cohort.load(w.root)
    assert c.name == "BLCA" and c.root == w.root and c.features_dir == w.root / "features"
    assert c.feature_dim == 8 and len(c) == 3 and c.skipped.empty
    p = c.patients
    assert list(p.columns) == ["patient_id", "time", "event", "slides", "n_patches"]
    assert p["patient_id"].tolist() == ["P1", "P2", "P3"]  # sorted
    assert p["time"].tolist() == [100.0, 300.0, 50.0]
    assert p["event"].tolist() == [0, 1, 1]
    assert p["n_patches"].tolist() == [5, 10, 12]
    assert p.set_index("patient_id").at["P3", "slides"] == ("P3-SZ", "P3-SY", "P3-SX")
    assert len(c.slides) == 6 and c.slides["n_patches"].sum() == 27
    assert c.patient_ids == ["P1", "P2", "P3"] and "P2" in c and "P9" not in c


def test_multi_slide_bag_concatenates_in_label_order(make_cohort):
    w = make_cohort("C", _specs(), dim=8)
    c = Cohort.load(w.root)
    bag = c.load_bag("P3")
    assert isinstance(bag, torch.Tensor) and bag.dtype == torch.float32
    assert tuple(bag.shape) == (12, 8)
    expected = np.concatenate([w.features[s] for s in ["P3-SZ", "P3-SY", "P3-SX"]])
    np.testing.assert_array_equal(bag.numpy(), expected)
    assert [p.name for p in c.slide_paths("P3")] == ["P3-SZ.h5", "P3-SY.h5", "P3-SX.h5"]
    with pytest.raises(DataError, match=r"unknown patient 'nobody'"):
        c.load_bag("nobody")


@pytest.mark.parametrize("fmt,subdirs,layout", [
    ("h5", False, "trident"), ("h5", True, "contiguous"), ("pt", False, None),
    ("pt", True, None),
])
def test_formats_and_clam_subfolders(make_cohort, fmt, subdirs, layout):
    w = make_cohort("C", _specs(), fmt=fmt, subdirs=subdirs, layout=layout or "contiguous",
                    dtype=np.float32)
    c = Cohort.load(w.root)
    for pid, sids in w.slide_ids.items():
        np.testing.assert_array_equal(c.load_bag(pid).numpy(),
                                      np.concatenate([w.features[s] for s in sids]))
    sub = {"h5": "h5_files", "pt": "pt_files"}[fmt]
    assert all((sub in p) == subdirs for p in c.slides["path"])


def test_slide_ids_with_wsi_extension_in_labels(make_cohort):
    w = make_cohort("C", _specs(), slide_suffix=".svs")
    c = Cohort.load(w.root)
    assert c.patients["n_patches"].sum() == 27
    assert not any(s.endswith(".svs") for s in c.slides["slide_id"])


def test_other_label_convention_and_file_name(make_cohort):
    w = make_cohort("C", _specs(), write_labels=False)
    rows = [(p.patient_id, s + ".svs", p.time / (365.25 / 12), 1 - p.event)
            for p in _specs() for s in w.slide_ids[p.patient_id]]
    pd.DataFrame(rows, columns=["case_id", "slide_id", "survival_months", "censorship"]) \
        .to_csv(w.root / "clinical.csv", index=False)
    c = Cohort.load(w.root, labels="clinical.csv")
    np.testing.assert_allclose(c.patients["time"], [100.0, 300.0, 50.0])
    assert c.patients["event"].tolist() == [0, 1, 1]
    assert c.label_info["convention"] == "mcat"


def _break(w):
    """Three different problems on three slides: missing, empty, other dimension."""
    fdir = w.root / "features"
    (fdir / "P1-SZ.h5").unlink()
    with h5py.File(fdir / "P2-SY.h5", "w") as f:
        f.create_dataset("features", data=np.zeros((0, 8), np.float16))
    write_features_h5(fdir / "P3-SX.h5", np.ones((7, 5), np.float16))


def test_raise_lists_all_problems(make_cohort):
    w = make_cohort("C", _specs())
    _break(w)
    with pytest.raises(DataError) as e:
        Cohort.load(w.root)
    msg = str(e.value)
    assert "3 of 6 slide(s)" in msg
    # the hint says what one types (issue 19, item 7), not a config key in Python syntax
    assert "--set data.on_bad_slide=skip" in msg and "--skip-bad-slides" in msg
    assert "on_bad_slide='skip'" not in msg
    assert "'P1-SZ'" in msg and "looked for" in msg
    assert "'P2-SY'" in msg and "0 patches" in msg and "P2-SY.h5" in msg
    assert "'P3-SX'" in msg and "dimension 5 differs" in msg and "(8)" in msg


def test_skip_mode(make_cohort, caplog):
    w = make_cohort("C", _specs())
    _break(w)
    with caplog.at_level(logging.WARNING, logger="steph.data.cohort"):
        c = Cohort.load(w.root, on_bad_slide="skip")
    assert sorted(c.skipped["slide_id"]) == ["P1-SZ", "P2-SY", "P3-SX"]
    assert list(c.skipped.columns) == ["patient_id", "slide_id", "path", "reason"]
    assert c.patient_ids == ["P2", "P3"]  # P1 lost its only slide
    assert c.patients.set_index("patient_id").at["P3", "slides"] == ("P3-SZ", "P3-SY")
    assert c.patients["n_patches"].tolist() == [4, 5]
    assert c.load_bag("P3").shape == (5, 8)
    assert "skipped 3 slide(s)" in caplog.text
    assert "dropped 1 patient(s) left with no usable slide: P1" in caplog.text
    assert c.label_info["lost_patients"] == ["P1"]


def test_full_check_detects_nan_shape_check_does_not(make_cohort):
    w = make_cohort("C", _specs(), dtype=np.float32)
    x = w.features["P2-SY"].copy()
    x[1, 1] = np.nan
    write_features_h5(w.root / "features" / "P2-SY.h5", x)
    c = Cohort.load(w.root)  # shape check passes
    with pytest.raises(DataError) as e:
        c.load_bag("P2")
    msg = str(e.value)
    assert "patient 'P2'" in msg and "P2-SY.h5" in msg and "NaN" in msg
    with pytest.raises(DataError, match=r"'P2-SY'.*NaN"):
        Cohort.load(w.root, check="full")
    c2 = Cohort.load(w.root, check="full", on_bad_slide="skip")
    assert c2.skipped["slide_id"].tolist() == ["P2-SY"]


def test_shape_mode_reads_no_feature_values(make_cohort, monkeypatch):
    w = make_cohort("C", _specs())

    def boom(*a, **k):
        raise AssertionError("feature values read during a shape check")

    monkeypatch.setattr(cohort_mod, "read_features", boom)
    monkeypatch.setattr(h5py.Dataset, "__getitem__", boom)
    monkeypatch.setattr(h5py.Dataset, "read_direct", boom)
    c = Cohort.load(w.root)
    assert c.patients["n_patches"].sum() == 27


def test_majority_feature_dimension(make_cohort):
    w = make_cohort("C", _specs(), dim=8)
    # the first slide in label order has another dimension: the majority (8) must win
    write_features_h5(w.root / "features" / "P2-SZ.h5", np.ones((4, 3), np.float16))
    c = Cohort.load(w.root, on_bad_slide="skip")
    assert c.feature_dim == 8 and c.skipped["slide_id"].tolist() == ["P2-SZ"]


def test_all_slides_bad(make_cohort):
    w = make_cohort("C", _specs())
    for p in (w.root / "features").glob("*-SZ.h5"):
        with h5py.File(p, "w") as f:  # empty slides
            f.create_dataset("features", data=np.zeros((0, 8), np.float16))
    for p in (w.root / "features").glob("*-S[XY].h5"):
        p.unlink()
    with pytest.raises(DataError, match="no usable slide"):
        Cohort.load(w.root, on_bad_slide="skip")


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_an_empty_features_folder_is_one_line(make_cohort, mode):
    """Issue 19, item 7: not a line per slide (23 lines before)."""
    w = make_cohort("C", _specs())
    for p in (w.root / "features").iterdir():
        p.unlink()
    with pytest.raises(DataError) as e:
        Cohort.load(w.root, on_bad_slide=mode)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"no feature file (.h5 / .pt) in {w.root / 'features'}" in msg
    assert "labels.csv names 6 slide(s)" in msg


def test_slide_ids_that_match_no_file_are_one_line(make_cohort):
    w = make_cohort("C", _specs())
    for p in (w.root / "features").iterdir():
        p.rename(p.with_name("x" + p.name))
    with pytest.raises(DataError) as e:
        Cohort.load(w.root)
    msg = str(e.value)
    assert "\n" not in msg and "none of the 6 slide(s)" in msg and "'xP1-SZ'" in msg


def test_layout_errors(tmp_path, make_cohort):
    with pytest.raises(DataError, match="cohort folder not found"):
        Cohort.load(tmp_path / "nothing")
    (tmp_path / "A").mkdir()
    with pytest.raises(DataError, match=r"cohort 'A': no label file .*labels\.csv"):
        Cohort.load(tmp_path / "A")
    (tmp_path / "A" / "labels.csv").write_text("patient_id,slide_id,time,event\nx,y,1,1\n")
    with pytest.raises(DataError, match=r"cohort 'A': no features folder .*features"):
        Cohort.load(tmp_path / "A")
    w = make_cohort("C", _specs())
    with pytest.raises(DataError, match="on_bad_slide"):
        Cohort.load(w.root, on_bad_slide="ignore")
    with pytest.raises(DataError, match="check must be"):
        Cohort.load(w.root, check="values")


def test_discover_cohorts(tmp_path, make_cohort):
    make_cohort("BRCA", _specs())
    make_cohort("BLCA", _specs())
    (tmp_path / "DATA" / "notes").mkdir()
    (tmp_path / "DATA" / "README.txt").write_text("x")
    assert discover_cohorts(tmp_path / "DATA") == ["BLCA", "BRCA"]
    with pytest.raises(DataError, match="data root not found"):
        discover_cohorts(tmp_path / "missing")


def test_many_slides_load_quickly(tmp_path):
    """Loading reads metadata only: 1,000 slides in about a second (generous bound here)."""
    import time

    root = tmp_path / "BIG"
    (root / "features").mkdir(parents=True)
    rows = []
    for i in range(1000):
        with h5py.File(root / "features" / f"S{i:04d}.h5", "w") as f:  # no fsync: fast set-up
            f.create_dataset("features", data=np.zeros((3 + i % 5, 4), np.float16))
        rows.append((f"P{i // 2:04d}", f"S{i:04d}", float(i // 2 + 1), i // 2 % 2))
    pd.DataFrame(rows, columns=["patient_id", "slide_id", "time", "event"]).to_csv(
        root / "labels.csv", index=False)
    t0 = time.perf_counter()
    c = Cohort.load(root)
    elapsed = time.perf_counter() - t0
    assert len(c) == 500 and len(c.slides) == 1000
    assert elapsed < 10.0, f"loading 1,000 slides took {elapsed:.2f}s"  # ~0.6 s idle


# -- slide ids from a label table stay inside the cohort's features folder --------------------

@pytest.mark.parametrize("bad_id, why", [
    ("../SECRET", "climbs out"),
    ("sub/../../SECRET", "climbs out"),
    ("..\\SECRET", "climbs out"),
    ("{outside}/SECRET", "absolute path"),
    ("C:\\data\\SECRET", "absolute path"),
])
def test_slide_id_outside_the_features_folder_is_refused_unread(bad_id, why, make_cohort,
                                                                 tmp_path, monkeypatch):
    w = make_cohort("BLCA", _specs(), dim=8)
    outside = tmp_path / "DATA"  # SECRET.h5 sits next to the cohort, outside its features
    write_features_h5(outside / "SECRET.h5", np.ones((3, 8), np.float32))
    labels = pd.read_csv(w.root / "labels.csv")
    labels.loc[2, "slide_id"] = bad_id.format(outside=outside)
    labels.to_csv(w.root / "labels.csv", index=False)
    opened = []
    monkeypatch.setattr(cohort_mod, "read_feature_shape",
                        lambda path, **kw: opened.append(path))
    with pytest.raises(DataError) as err:
        Cohort.load(w.root)
    msg = str(err.value)
    assert str(w.root / "labels.csv") in msg and "line 4" in msg and why in msg, msg
    assert labels.loc[2, "patient_id"] in msg and "'slide_id'" in msg
    assert opened == []  # refused before any feature file is touched


def test_slide_ids_inside_the_folder_and_symlinks_placed_there_are_allowed(make_cohort, tmp_path):
    """The README recommends symbolic links for features kept elsewhere: a link placed in the
    features folder (pointing anywhere) is followed, and ids like './X' stay inside."""
    w = make_cohort("BLCA", _specs(), dim=8)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    sid = w.slide_ids["P1"][0]
    (w.root / "features" / f"{sid}.h5").rename(elsewhere / f"{sid}.h5")
    (w.root / "features" / f"{sid}.h5").symlink_to(elsewhere / f"{sid}.h5")
    labels = pd.read_csv(w.root / "labels.csv")
    labels.loc[labels.slide_id == sid, "slide_id"] = f"./sub/../{sid}"
    labels.to_csv(w.root / "labels.csv", index=False)
    with pytest.raises(DataError, match="no feature file found"):  # inside, but not a file name
        Cohort.load(w.root)
    labels.loc[labels.patient_id == "P1", "slide_id"] = sid
    labels.to_csv(w.root / "labels.csv", index=False)
    c = Cohort.load(w.root)
    np.testing.assert_array_equal(c.load_bag_array("P1"), w.features[sid])


def test_find_feature_file_refuses_paths_out_of_the_folder(make_cohort, tmp_path):
    from steph.data.features import find_feature_file

    w = make_cohort("BLCA", _specs(), dim=8)
    write_features_h5(tmp_path / "DATA" / "SECRET.h5", np.ones((3, 8), np.float32))
    for bad in ("../SECRET", str(tmp_path / "DATA" / "SECRET")):
        with pytest.raises(DataError, match="features folder"):
            find_feature_file(w.root / "features", bad)
