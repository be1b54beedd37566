from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest
import torch

from steph.data import features as F
from steph.data.features import (
    FeatureIndex,
    find_feature_file,
    read_coords,
    read_feature_shape,
    read_features,
    strip_wsi_extension,
    write_features_h5,
    write_features_pt,
)
from steph.errors import DataError

TCGA_ID = "TCGA-4Z-AA7M-01Z-00-DX1.05317C75-A8F3-4124-95D2-F039BEFFE63A"


def _x(n=200, d=16, dtype=np.float16, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(dtype)


# ------------------------------------------------------------------ slide ids -------------


@pytest.mark.parametrize("ext", F.WSI_EXTENSIONS)
def test_strip_each_known_extension(ext):
    assert strip_wsi_extension(f"slide-1{ext}") == "slide-1"
    assert strip_wsi_extension(f"slide-1{ext.upper()}") == "slide-1"


def test_strip_leaves_tcga_dotted_uuid_and_unknown_suffixes():
    assert strip_wsi_extension(TCGA_ID) == TCGA_ID
    assert strip_wsi_extension(TCGA_ID + ".svs") == TCGA_ID
    assert strip_wsi_extension("a.b.jpeg") == "a.b.jpeg"
    assert strip_wsi_extension("x.svs.svs") == "x.svs"  # one suffix only
    assert strip_wsi_extension(" s1.tiff ") == "s1"
    assert strip_wsi_extension(".svs") == ".svs"  # nothing left: keep as is


# ------------------------------------------------------------------ h5 --------------------


@pytest.mark.parametrize("layout", ["contiguous", "trident"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_h5_round_trip_both_layouts(tmp_path, layout, dtype):
    x = _x(dtype=dtype)
    coords = np.arange(400).reshape(200, 2) * 256
    p = write_features_h5(tmp_path / "s.h5", x, coords=coords, layout=layout)
    with h5py.File(p) as f:
        assert f["features"].dtype == dtype
        assert f["features"].chunks == ((1, 16) if layout == "trident" else None)
    n, d, dt = read_feature_shape(p)
    assert (n, d, dt) == (200, 16, np.dtype(dtype))
    got = read_features(p)
    assert got.dtype == np.float32 and got.shape == (200, 16)
    np.testing.assert_array_equal(got, x.astype(np.float32))
    np.testing.assert_array_equal(read_coords(p), coords)
    assert read_coords(p).dtype == np.int64
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".")]  # no temp file left


@pytest.mark.parametrize("chunks", [None, (1, 1, 16), (1, 7, 16)])
def test_h5_batch_dim(tmp_path, chunks):
    x = _x(n=150)
    with h5py.File(tmp_path / "b.h5", "w") as f:
        f.create_dataset("features", data=x[None], chunks=chunks)
        f.create_dataset("coords", data=np.zeros((1, 150, 2), dtype=np.int32))
    assert read_feature_shape(tmp_path / "b.h5")[:2] == (150, 16)
    np.testing.assert_array_equal(read_features(tmp_path / "b.h5"), x.astype(np.float32))
    assert read_coords(tmp_path / "b.h5").shape == (150, 2)


@pytest.mark.parametrize("kw", [
    {"chunks": (1, 16)},                      # TRIDENT: raw fast path
    {"chunks": (8, 16)},                      # multi-row chunks, partial last chunk
    {"chunks": (1, 16), "compression": "gzip"},  # filtered: plain h5py
    {"chunks": (1, 8)},                       # chunks not spanning a row: plain h5py
])
def test_chunked_reads_match_h5py(tmp_path, kw):
    x = _x(n=203)
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f.create_dataset("features", data=x, maxshape=(None, 16), **kw)
    np.testing.assert_array_equal(read_features(tmp_path / "c.h5"), x.astype(np.float32))


def test_fast_path_is_taken_for_one_row_chunks_and_appended_writes(tmp_path):
    # TRIDENT appends rows in batches: chunks interleave with index nodes in the file
    x = _x(n=300)
    with h5py.File(tmp_path / "t.h5", "w") as f:
        ds = f.create_dataset("features", shape=(0, 16), maxshape=(None, 16), chunks=(1, 16),
                              dtype=np.float16)
        for i in range(0, 300, 37):
            b = x[i:i + 37]
            ds.resize(ds.shape[0] + len(b), axis=0)
            ds[-len(b):] = b
    with h5py.File(tmp_path / "t.h5") as f:
        fast = F._read_chunked_fast(f["features"], tmp_path / "t.h5")
    assert fast is not None
    np.testing.assert_array_equal(fast, x)
    np.testing.assert_array_equal(read_features(tmp_path / "t.h5"), x.astype(np.float32))


def test_unallocated_chunks_fall_back_to_fill_value(tmp_path):
    x = _x(n=200)
    with h5py.File(tmp_path / "u.h5", "w") as f:
        ds = f.create_dataset("features", shape=(200, 16), chunks=(1, 16), dtype=np.float16)
        ds[:100] = x[:100]  # rows 100.. never written
    with h5py.File(tmp_path / "u.h5") as f:
        assert F._read_chunked_fast(f["features"], tmp_path / "u.h5") is None
    got = read_features(tmp_path / "u.h5")
    np.testing.assert_array_equal(got[:100], x[:100].astype(np.float32))
    assert not got[100:].any()


def test_coords_absent_or_inconsistent(tmp_path):
    p = write_features_h5(tmp_path / "s.h5", _x(n=10))
    assert read_coords(p) is None
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f.create_dataset("features", data=_x(n=10))
        f.create_dataset("coords", data=np.zeros((9, 2)))
    with pytest.raises(DataError, match=r"coords has 9 rows but features has 10"):
        read_coords(tmp_path / "bad.h5")


# ------------------------------------------------------------------ .pt -------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("batch", [False, True])
def test_pt_tensor(tmp_path, dtype, batch):
    x = torch.from_numpy(_x(n=30)).to(dtype)
    torch.save(x[None] if batch else x, tmp_path / "s.pt")
    n, d, dt = read_feature_shape(tmp_path / "s.pt")
    assert (n, d) == (30, 16) and dt == torch.empty(0, dtype=dtype).numpy().dtype
    got = read_features(tmp_path / "s.pt")
    assert got.dtype == np.float32 and got.flags.writeable
    np.testing.assert_array_equal(got, x.float().numpy())
    assert read_coords(tmp_path / "s.pt") is None


def test_pt_dict_and_legacy_format_and_writer(tmp_path):
    x = torch.randn(12, 5)
    torch.save({"features": x, "coords": torch.zeros(12, 2)}, tmp_path / "d.pt")
    np.testing.assert_array_equal(read_features(tmp_path / "d.pt"), x.numpy())
    torch.save(x, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    np.testing.assert_array_equal(read_features(tmp_path / "legacy.pt"), x.numpy())
    assert read_feature_shape(tmp_path / "legacy.pt")[:2] == (12, 5)
    write_features_pt(tmp_path / "w.pt", x)
    np.testing.assert_array_equal(read_features(tmp_path / "w.pt"), x.numpy())


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pt_refuses_arbitrary_objects(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"features": torch.zeros(3, 2), "x": _Evil()}, p)
    with pytest.raises(DataError, match=r"evil.*refusing to unpickle"):
        read_features(p)
    p2 = tmp_path / "obj.pt"
    with open(p2, "wb") as fh:
        pickle.dump([1, 2], fh)
    with pytest.raises(DataError, match=r"'obj'.*obj\.pt"):
        read_features(p2)


# ------------------------------------------------------------------ discovery -------------


def test_find_feature_file_folders_and_preference(tmp_path):
    fdir = tmp_path / "features"
    write_features_h5(fdir / "h5_files" / "a.h5", _x(n=4))
    write_features_pt(fdir / "pt_files" / "b.pt", _x(n=4, dtype=np.float32))
    write_features_pt(fdir / "c.pt", _x(n=4, dtype=np.float32))
    write_features_h5(fdir / "c.h5", _x(n=4))
    write_features_h5(fdir / f"{TCGA_ID}.h5", _x(n=4))
    assert find_feature_file(fdir, "a") == fdir / "h5_files" / "a.h5"
    assert find_feature_file(fdir, "b.svs") == fdir / "pt_files" / "b.pt"
    assert find_feature_file(fdir, "c") == fdir / "c.h5"  # .h5 preferred over .pt
    assert find_feature_file(fdir, TCGA_ID + ".svs") == fdir / f"{TCGA_ID}.h5"
    index = FeatureIndex(fdir)
    for sid in ("a", "b.svs", "c", TCGA_ID):
        assert index.find(sid) == find_feature_file(fdir, sid)
    assert index.find("zzz") is None


def test_missing_file_message_says_where_it_looked(tmp_path):
    fdir = tmp_path / "features"
    fdir.mkdir()
    with pytest.raises(DataError) as e:
        find_feature_file(fdir, "slide-9.svs")
    msg = str(e.value)
    assert "'slide-9.svs'" in msg
    for part in (str(fdir / "slide-9.h5"), str(fdir / "h5_files" / "slide-9.h5"),
                 str(fdir / "pt_files" / "slide-9.pt"), str(fdir / "slide-9.pt")):
        assert part in msg


# ------------------------------------------------------------------ errors ----------------


def _h5(path, data, key="features", **kw):
    with h5py.File(path, "w") as f:
        f.create_dataset(key, data=data, **kw)
    return path


def test_empty_bag_is_an_error(tmp_path):
    p = _h5(tmp_path / "empty.h5", np.zeros((0, 16), np.float16))
    for fn in (read_feature_shape, read_features):
        with pytest.raises(DataError, match=r"slide 'empty' \(.*empty\.h5\).*0 patches"):
            fn(p)
    torch.save(torch.zeros(0, 4), tmp_path / "e.pt")
    with pytest.raises(DataError, match=r"'e'.*0 patches"):
        read_feature_shape(tmp_path / "e.pt")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(tmp_path, bad):
    x = _x(n=20).astype(np.float32)
    x[3, 2] = bad
    p = write_features_h5(tmp_path / "nan.h5", x, layout="trident")
    read_feature_shape(p)  # metadata only: not detected
    with pytest.raises(DataError, match=r"slide 'nan' \(.*nan\.h5\).*(NaN|inf).*rows: \[3\]"):
        read_features(p)
    assert np.isnan(read_features(p, check_finite=False)[3, 2]) == np.isnan(bad)


@pytest.mark.parametrize("shape", [(10,), (2, 10, 4), (1, 2, 3, 4)])
def test_wrong_rank(tmp_path, shape):
    p = _h5(tmp_path / "r.h5", np.zeros(shape, np.float32))
    with pytest.raises(DataError, match=r"'r'.*r\.h5.*shape \(N, D\) or \(1, N, D\)"):
        read_feature_shape(p)
    torch.save(torch.zeros(shape), tmp_path / "r.pt")
    with pytest.raises(DataError, match=r"r\.pt.*shape"):
        read_features(tmp_path / "r.pt")


def test_unreadable_and_malformed_files(tmp_path):
    (tmp_path / "junk.h5").write_bytes(b"not an hdf5 file at all")
    with pytest.raises(DataError, match=r"slide 'junk' \(.*junk\.h5\): cannot open as HDF5"):
        read_feature_shape(tmp_path / "junk.h5")
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"junk\.pt"):
        read_features(tmp_path / "junk.pt")
    p = _h5(tmp_path / "nofeat.h5", np.zeros((3, 2)), key="coords")
    with pytest.raises(DataError, match=r"no 'features' dataset.*coords"):
        read_features(p)
    p = _h5(tmp_path / "int.h5", np.zeros((3, 2), np.int32))
    with pytest.raises(DataError, match=r"floating point"):
        read_feature_shape(p)
    with pytest.raises(DataError, match=r"slide 'my-slide'"):
        read_features(tmp_path / "junk.h5", slide_id="my-slide")


def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        write_features_h5(tmp_path / "x.h5", _x(), layout="zarr")
    with pytest.raises(ValueError, match="coords"):
        write_features_h5(tmp_path / "x.h5", _x(n=5), coords=np.zeros((4, 2)))
    with pytest.raises(ValueError, match="non-empty"):
        write_features_h5(tmp_path / "x.h5", np.zeros((0, 3), np.float32))
    assert not (tmp_path / "x.h5").exists()
