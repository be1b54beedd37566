"""The packed feature store: bit-identical bags, staleness, atomic writes, coords, CLI."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from steph.data import pack as P
from steph.data.cohort import Cohort
from steph.data.features import write_features_h5
from steph.errors import DataError

from .conftest import PatientSpec

SPECS = [
    PatientSpec("A", 10.0, 1, [5, 4, 3]),  # three slides
    PatientSpec("B", 400.0, 0, [70]),  # > 64 one-row chunks in the trident layout: fast path
    PatientSpec("C", 800.0, 1, [7, 9]),
    PatientSpec("D", 20.0, 0, [6]),
]


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


def assert_same_bags(packed: Cohort, source: Cohort) -> None:
    assert packed.pack is not None and source.pack is None
    for pid in source.patient_ids:
        a, b = packed.load_bag(pid), source.load_bag(pid)
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
        np.testing.assert_array_equal(bits(a.numpy()), bits(b.numpy()))


def pack_messages(caplog, level=logging.INFO):
    return [r.getMessage() for r in caplog.records
            if r.name == "steph.data.pack" and r.levelno == level]


@pytest.mark.parametrize("layout", ["contiguous", "trident"])
def test_round_trip_is_bit_identical(make_cohort, layout, caplog):
    w = make_cohort("RT", SPECS, dim=6, layout=layout)
    source = Cohort.load(w.root)
    assert source.pack is None  # nothing packed yet, no message
    r = P.write_pack(source.pack_source())
    assert r.written and r.dtype == "float16" and r.rows == sum(sum(s.patches) for s in SPECS)
    caplog.set_level(logging.INFO, logger="steph")
    packed = Cohort.load(w.root)
    assert_same_bags(packed, Cohort.load(w.root, use_pack=False))
    for pid, sids in w.slide_ids.items():  # and the values written in the first place
        expected = np.concatenate([w.features[s] for s in sids])
        np.testing.assert_array_equal(packed.load_bag(pid).numpy(), expected)
    # said once, naming the cohort and the pack, however many bags are read
    msgs = pack_messages(caplog)
    assert len(msgs) == 1 and "cohort RT" in msgs[0] and str(P.pack_dir(w.root)) in msgs[0]
    # the index: patients contiguous in concatenation order, slides in label order
    index = json.loads((P.pack_dir(w.root) / P.INDEX_NAME).read_text())
    assert index["version"] == P.FORMAT_VERSION and index["feature_dim"] == 6
    assert [s["slide_id"] for s in index["slides"] if s["patient_id"] == "A"] == w.slide_ids["A"]
    assert index["patients"]["A"] == [0, 12] and index["patients"]["B"] == [12, 70]
    src = {s["path"]: s for s in index["slides"]}
    p = w.root / "features" / f"{w.slide_ids['C'][1]}.h5"
    entry = src[p.relative_to(w.root).as_posix()]
    assert (entry["size"], entry["mtime_ns"]) == (p.stat().st_size, p.stat().st_mtime_ns)
    assert entry["offset"] == 12 + 70 + 7 and entry["n_patches"] == 9
    arr = np.load(P.pack_dir(w.root) / index["features"]["file"], mmap_mode="r")
    assert arr.dtype == np.float16 and arr.shape == (r.rows, 6)


def test_float32_and_mixed_sources_give_float32_packs(make_cohort, tmp_path):
    w = make_cohort("F32", SPECS, dim=5, dtype=np.float32)
    P.write_pack(Cohort.load(w.root).pack_source())
    packed = Cohort.load(w.root)
    assert packed.pack.dtype == np.float32
    assert_same_bags(packed, Cohort.load(w.root, use_pack=False))
    # one float64 and one float16 slide among float32 ones: float32, still bit-identical
    rng = np.random.default_rng(3)
    write_features_h5(w.root / "features" / f"{w.slide_ids['A'][1]}.h5",
                      rng.standard_normal((4, 5)) * 1e-3)
    write_features_h5(w.root / "features" / f"{w.slide_ids['C'][0]}.h5",
                      rng.standard_normal((7, 5)).astype(np.float16))
    source = Cohort.load(w.root, use_pack=False)
    assert set(source.slides["dtype"]) == {"float16", "float32", "float64"}
    assert P.write_pack(source.pack_source()).dtype == "float32"
    assert_same_bags(Cohort.load(w.root), source)


def test_pt_sources_including_bfloat16(make_cohort):
    w = make_cohort("PT", SPECS, dim=4, fmt="pt")
    sid = w.slide_ids["B"][0]
    torch.save(torch.randn(70, 4).to(torch.bfloat16), w.root / "features" / f"{sid}.pt")
    source = Cohort.load(w.root, use_pack=False)
    assert P.write_pack(source.pack_source()).dtype == "float32"
    assert_same_bags(Cohort.load(w.root), source)


def _write_coords_cohort(root: Path) -> Path:
    """Slides with integer coords, float coords and none, two slides for patient A."""
    cdir = root / "CO"
    rng = np.random.default_rng(0)
    slides = [("A", "A-1", "int"), ("A", "A-2", "float"), ("B", "B-1", None), ("C", "C-1", "int")]
    for i, (_, sid, kind) in enumerate(slides):
        n = 5 + i
        c = None
        if kind == "int":
            c = np.stack([np.arange(n) * 256 + i, np.full(n, 2**40 + i)], 1).astype(np.int32
                                                                                    if i else
                                                                                    np.int64)
        elif kind == "float":
            c = rng.random((n, 2)) * 1e5
        write_features_h5(cdir / "features" / f"{sid}.h5",
                          rng.standard_normal((n, 3)).astype(np.float16), coords=c)
    pd.DataFrame([(p, s, 100.0, 1) for p, s, _ in slides],
                 columns=["patient_id", "slide_id", "time", "event"]).to_csv(cdir / "labels.csv",
                                                                              index=False)
    return cdir


def test_coords_are_packed_per_slide(tmp_path):
    cdir = _write_coords_cohort(tmp_path)
    source = Cohort.load(cdir, use_pack=False)
    P.write_pack(source.pack_source())
    packed = Cohort.load(cdir)
    assert packed.pack is not None
    for pid in source.patient_ids:
        got, want = packed.load_coords(pid), source.load_coords(pid)
        assert len(got) == len(want) == len(packed.patient(pid)["slides"])
        for g, e in zip(got, want):
            if e is None:
                assert g is None
            else:
                assert g.dtype == e.dtype and g.shape == e.shape
                np.testing.assert_array_equal(g, e)
    a = packed.load_coords("A")
    assert a[0].dtype == np.int64 and a[1].dtype == np.float64 and a[0][0, 1] == 2**40
    with pytest.raises(DataError, match="unknown patient 'Z'"):
        packed.load_coords("Z")
    # without coords: no coords file, load_coords gives None per slide
    P.write_pack(source.pack_source(), coords=False, force=True)
    index = json.loads((P.pack_dir(cdir) / P.INDEX_NAME).read_text())
    assert index["coords"] is None
    assert not list(P.pack_dir(cdir).glob("coords-*"))
    assert Cohort.load(cdir).load_coords("A") == [None, None]


def _stale_warning(caplog, root: Path) -> str:
    msgs = pack_messages(caplog, logging.WARNING)
    assert len(msgs) == 1, msgs
    assert "cohort ST" in msgs[0] and "steph data pack" in msgs[0]
    caplog.clear()
    return msgs[0]


def test_changed_sources_make_the_pack_stale(make_cohort, caplog):
    w = make_cohort("ST", SPECS, dim=6)
    P.write_pack(Cohort.load(w.root).pack_source())
    caplog.set_level(logging.INFO, logger="steph")
    fdir = w.root / "features"
    target = fdir / f"{w.slide_ids['C'][1]}.h5"

    # touch: same bytes, new modification time
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    c = Cohort.load(w.root)
    assert c.pack is None and str(target) in _stale_warning(caplog, w.root)
    assert P.write_pack(c.pack_source()).written  # refreshing makes it fresh again
    assert Cohort.load(w.root).pack is not None
    caplog.clear()

    # rewrite with other values: the loader reads the new ones
    new = np.random.default_rng(9).standard_normal((9, 6)).astype(np.float16)
    write_features_h5(target, new)
    c = Cohort.load(w.root)
    assert c.pack is None and str(target) in _stale_warning(caplog, w.root)
    np.testing.assert_array_equal(c.load_bag("C").numpy()[7:], new.astype(np.float32))
    P.write_pack(c.pack_source())
    np.testing.assert_array_equal(Cohort.load(w.root).load_bag("C").numpy()[7:],
                                  new.astype(np.float32))
    caplog.clear()

    # delete a slide's file (skipped as bad) / remove a slide from the label table
    gone = fdir / f"{w.slide_ids['A'][2]}.h5"
    gone.unlink()
    c = Cohort.load(w.root, on_bad_slide="skip")
    msg = _stale_warning(caplog, w.root)
    assert c.pack is None and w.slide_ids["A"][2] in msg and "no longer in the cohort" in msg
    labels = pd.read_csv(w.root / "labels.csv")
    labels[labels["slide_id"] != w.slide_ids["A"][2]].to_csv(w.root / "labels.csv", index=False)
    assert Cohort.load(w.root).pack is None
    caplog.clear()
    P.write_pack(Cohort.load(w.root).pack_source())
    assert Cohort.load(w.root).pack is not None

    # add a slide to the label table
    extra = "D-extra"
    write_features_h5(fdir / f"{extra}.h5", np.ones((3, 6), np.float16))
    labels = pd.read_csv(w.root / "labels.csv")
    pd.concat([labels, pd.DataFrame([("D", extra, 20.0, 0)], columns=labels.columns)]).to_csv(
        w.root / "labels.csv", index=False)
    caplog.clear()
    c = Cohort.load(w.root)
    msg = _stale_warning(caplog, w.root)
    assert c.pack is None and extra in msg and "is not in it" in msg
    assert c.load_bag("D").shape[0] == 6 + 3


def test_damaged_pack_files_are_not_used(make_cohort, caplog):
    w = make_cohort("ST", SPECS, dim=6)
    P.write_pack(Cohort.load(w.root).pack_source())
    index = json.loads((P.pack_dir(w.root) / P.INDEX_NAME).read_text())
    data = P.pack_dir(w.root) / index["features"]["file"]
    with open(data, "r+b") as fh:
        fh.truncate(data.stat().st_size - 12)
    caplog.set_level(logging.INFO, logger="steph")
    assert Cohort.load(w.root).pack is None
    assert "bytes" in _stale_warning(caplog, w.root)
    (P.pack_dir(w.root) / P.INDEX_NAME).write_text("{not json")
    assert Cohort.load(w.root).pack is None
    assert "cannot be read" in _stale_warning(caplog, w.root)
    assert P.write_pack(Cohort.load(w.root, use_pack=False).pack_source()).written
    assert_same_bags(Cohort.load(w.root), Cohort.load(w.root, use_pack=False))


def test_interrupted_pack_leaves_nothing_a_loader_uses(make_cohort, monkeypatch):
    w = make_cohort("IN", SPECS, dim=6)
    folder = P.pack_dir(w.root)
    real = P.read_features_stored
    calls = []

    def crash_on_third(path, **kw):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # e.g. Ctrl-C mid-write
        return real(path, **kw)

    monkeypatch.setattr(P, "read_features_stored", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        P.write_pack(Cohort.load(w.root).pack_source())
    assert not (folder / P.INDEX_NAME).exists()
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # temp files removed
    assert Cohort.load(w.root).pack is None
    monkeypatch.setattr(P, "read_features_stored", real)
    P.write_pack(Cohort.load(w.root).pack_source())
    old_index = (folder / P.INDEX_NAME).read_text()

    # a crash after the new data file is in place but before the index: the old pack is used
    def no_index(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(P, "write_json", no_index)
    with pytest.raises(OSError):
        P.write_pack(Cohort.load(w.root).pack_source(), force=True)
    monkeypatch.undo()
    assert (folder / P.INDEX_NAME).read_text() == old_index
    assert len(list(folder.glob("features-*.npy"))) == 2  # the orphan is ignored...
    assert_same_bags(Cohort.load(w.root), Cohort.load(w.root, use_pack=False))
    P.write_pack(Cohort.load(w.root).pack_source(), force=True)
    assert len(list(folder.glob("features-*.npy"))) == 1  # ...and removed by the next pack


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_hard_crash_mid_write(make_cohort, monkeypatch):
    """A process killed mid-write (no cleanup runs) leaves a temp file no loader opens."""
    w = make_cohort("HC", SPECS, dim=6)
    folder = P.pack_dir(w.root)
    cohort = Cohort.load(w.root)
    real, n = P.read_features_stored, []

    def die(path, **kw):
        n.append(1)
        if len(n) == 4:
            os._exit(9)  # like SIGKILL: no except/finally, no cleanup
        return real(path, **kw)

    monkeypatch.setattr(P, "read_features_stored", die)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            P.write_pack(cohort.pack_source())
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    monkeypatch.undo()
    assert os.waitstatus_to_exitcode(status) == 9
    left = sorted(p.name for p in folder.iterdir())
    assert any(n.endswith(".tmp") for n in left) and P.INDEX_NAME not in left
    assert Cohort.load(w.root).pack is None
    P.write_pack(Cohort.load(w.root).pack_source())
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert_same_bags(Cohort.load(w.root), Cohort.load(w.root, use_pack=False))


def test_bad_slide_disk_space_and_concurrent_writer(make_cohort, monkeypatch):
    w = make_cohort("BAD", SPECS, dim=6)
    sid = w.slide_ids["C"][0]
    x = np.ones((7, 6), np.float16)
    x[2, 3] = np.inf
    write_features_h5(w.root / "features" / f"{sid}.h5", x)
    with pytest.raises(DataError, match=rf"patient 'C'.*{sid}.*1 inf"):
        P.write_pack(Cohort.load(w.root).pack_source())
    assert not (P.pack_dir(w.root) / P.INDEX_NAME).exists()
    write_features_h5(w.root / "features" / f"{sid}.h5", np.ones((7, 6), np.float16))

    class Usage:
        free = 100

    monkeypatch.setattr(P.shutil, "disk_usage", lambda _p: Usage)
    with pytest.raises(DataError, match="packing needs .* GB, only"):
        P.write_pack(Cohort.load(w.root).pack_source())
    monkeypatch.undo()

    fcntl = pytest.importorskip("fcntl")
    with open(P.pack_dir(w.root) / ".lock", "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        with pytest.raises(DataError, match="another `steph data pack`"):
            P.write_pack(Cohort.load(w.root).pack_source())


def test_store_pickles_without_its_memory_map(make_cohort):
    w = make_cohort("PK", SPECS, dim=6)
    P.write_pack(Cohort.load(w.root).pack_source())
    c = Cohort.load(w.root)
    c.load_bag("A")
    blob = pickle.dumps(c)
    assert len(blob) < 20_000  # the index, not the data
    c2 = pickle.loads(blob)
    np.testing.assert_array_equal(c2.load_bag("C").numpy(), c.load_bag("C").numpy())


def test_cli_pack(make_cohort, capsys):
    from steph.cli import main

    a = make_cohort("AAA", SPECS, dim=6)
    make_cohort("BBB", SPECS[:2], dim=6)
    root = a.root.parent

    def run(*args):
        with pytest.raises(SystemExit) as exc:
            main(list(args))
            raise SystemExit(0)
        out = capsys.readouterr()
        return exc.value.code or 0, out.out, out.err

    code, out, _ = run("data", "pack", "--data", str(root), "--cohorts", "AAA")
    assert code == 0 and "AAA: packed, 7 slides, 104 patches, float16" in out
    assert "BBB" not in out and not P.pack_dir(root / "BBB").exists()
    code, out, _ = run("data", "pack", "--data", str(root))
    assert code == 0 and "AAA: up to date" in out and "BBB: packed" in out
    code, out, _ = run("data", "pack", "--data", str(root), "--cohorts", "AAA", "--force",
                       "--no-coords")
    assert code == 0 and "AAA: packed" in out
    assert Cohort.load(a.root).pack is not None
    code, _, err = run("data", "pack", "--data", str(root / "nope"))
    assert code == 1 and "data root not found" in err and "Traceback" not in err


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan, 65504.0])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_read_features_stored_keeps_the_dtype_and_checks_values(tmp_path, bad, dtype):
    from steph.data.features import read_features, read_features_stored

    x = np.random.default_rng(1).standard_normal((80, 5)).astype(dtype)
    x[41, 2] = bad
    path = write_features_h5(tmp_path / "s.h5", x, layout="trident")
    if np.isfinite(bad):  # the largest float16 is a value, not an overflow
        got = read_features_stored(path)
        assert got.dtype == dtype and got.shape == (80, 5)
        np.testing.assert_array_equal(bits(got.astype(np.float32)), bits(read_features(path)))
        return
    with pytest.raises(DataError) as stored:
        read_features_stored(path)
    with pytest.raises(DataError) as f32:
        read_features(path)
    assert str(stored.value) == str(f32.value) and "first rows: [41]" in str(f32.value)
    assert read_features_stored(path, check_finite=False).shape == (80, 5)
