"""Property-based fuzzing of every reader of user files: label tables, split files, feature files
(HDF5 and .pt) and the configuration (YAML files and --set overrides).

Property: a reader either returns what its contract promises, or raises one of steph's own
errors (a StephError) in one line that names the file (and the column, line, key or dataset
at fault); never another exception.

The default run is derandomised (the same cases every time) with a modest number of cases per
reader; ``pytest -m slow`` runs many more. The number of cases each reader ran is printed after
the test summary ("fuzzed readers").
"""

from __future__ import annotations

import codecs
import csv
import io
import math
import re
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steph.config import ExperimentConfig, load_config, parse_override
from steph.data.features import read_coords, read_feature_shape, read_features
from steph.data.labels import LABEL_COLUMNS, read_labels
from steph.data.splits import read_splits
from steph.errors import StephError

FAST, SLOW = 150, 2000  # cases per reader: default run, `-m slow`


def _settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


# what a message says about a problem of the whole file or of an option of the reader (no
# single field of the file to name)
WHOLE_FILE = ("is empty", "cannot parse", "not UTF", "NUL character", "not found", "no rows",
              "match no known", "match several", "no labelled slide", "no split files",
              "several formats", "line ", "endpoint", "convention=")


def _check_error(err: Exception, path: Path | None, names: tuple[str, ...] = (),
                 fields: list[str] | None = None) -> None:
    """One of steph's errors, in one line, naming `path` (or one of `names`) and, when
    `fields` is given, one of them or the line (or saying what is wrong with the whole file)."""
    assert isinstance(err, StephError), f"{type(err).__name__}: {err}"
    msg = str(err)
    assert "\n" not in msg, msg
    wanted = ([str(path)] if path is not None else []) + list(names)
    assert any(w in msg for w in wanted), f"{msg!r} names none of {wanted}"
    if fields is not None:
        assert any(f and (repr(f) in msg or (len(f) > 3 and f in msg)) for f in fields) or any(
            w in msg for w in WHOLE_FILE), f"{msg!r} names no field of {fields}"


# -- bytes on disk: encodings, truncation, damage ----------------------------------------------

ENCODINGS = ("utf-8", "utf-8-sig", "utf-16", "utf-16-be", "latin-1", "cp1252")


@st.composite
def damage(draw, raw: bytes) -> bytes:
    """Leave the bytes alone, or truncate them, flip some, or overwrite a run with zeros."""
    how = draw(st.sampled_from(["truncate", "flip", "zeros"])) if chance(draw, 25) else "none"
    if not raw or how == "none":
        return raw
    i = draw(st.integers(0, len(raw) - 1))
    if how == "truncate":
        return raw[:i]
    b = bytearray(raw)
    if how == "flip":
        for j in draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=4)):
            b[j] ^= draw(st.integers(1, 255))
    else:
        end = min(len(b), i + draw(st.integers(1, 64)))
        b[i:end] = bytes(end - i)
    return bytes(b)


def encode(draw, text: str) -> bytes:
    enc = draw(st.sampled_from(ENCODINGS)) if chance(draw, 30) else "utf-8"
    return draw(damage(text.encode(enc, errors="replace")))


def chance(draw, percent: int) -> bool:
    """True `percent` % of the time: most cases stay well-formed enough to reach deep code."""
    return draw(st.integers(0, 99)) >= 100 - percent  # hypothesis favours small integers


def write_rows(rows: list[list[str]], sep: str, quoting: int, newline: str) -> str:
    buf = io.StringIO()
    csv.writer(buf, delimiter=sep, quoting=quoting, lineterminator=newline).writerows(rows)
    return buf.getvalue()


# -- label tables -------------------------------------------------------------------------------

LABEL_HEADERS = {
    "native": ["patient_id", "slide_id", "time", "event"],
    "mcat": ["case_id", "slide_id", "survival_months", "censorship"],
    "tcga_cdr": ["case_id", "slide_id", "os_survival_days", "os_censorship",
                 "dss_survival_days", "dss_censorship", "pfi_cr_censorship"],
    "steph": ["patient_id", "pathology_id", "t", "e"],
}
ODD_CELLS = ["", " ", "NA", "nan", "NaN", "null", "None", "inf", "-inf", "1e400", "-1", "2",
             "0.5", "-0", "1e308", "3e307", "True", "false", "é", "日本", "\u200b", "a,b", '"q"',
             "x\ny", "../x", "/abs/x", "C:\\x", "s.svs", ".svs", "\t", "0x1", "1_000", "١"]


def id_cells(prefix: str = "P"):
    return st.one_of(st.sampled_from([f"{prefix}{i}" for i in range(1, 6)]),
                     st.sampled_from([f"TCGA-AA-000{i}" for i in range(4)]),
                     st.sampled_from([f"{prefix}{i}.svs" for i in range(1, 4)]))


def odd_cells():
    return st.one_of(st.sampled_from(ODD_CELLS), st.text(max_size=12),
                     st.floats(allow_nan=True, allow_infinity=True).map(repr),
                     st.integers(-(10**30), 10**30).map(str))


def cell_for(column: str):
    low = column.strip().lower()
    if low in ("patient_id", "case_id"):
        return id_cells("P")
    if low in ("slide_id", "pathology_id"):
        return id_cells("S")
    if low in ("event", "censorship", "e") or low.endswith("censorship"):
        return st.sampled_from(["0", "1"])
    return st.one_of(st.integers(0, 5000).map(str), st.sampled_from(["12.5", "0", "1e3"]),
                     st.sampled_from(["1e308", "1.7e308", "5e-324", "0.0000001", "1e20"]))


@st.composite
def cells(draw, column: str) -> str:
    return draw(odd_cells() if chance(draw, 10) else cell_for(column))


@st.composite
def header_mutation(draw, header: list[str]) -> list[str]:
    cols = list(header)
    for _ in range(draw(st.integers(1, 2)) if chance(draw, 35) else 0):
        what = draw(st.sampled_from(["drop", "extra", "case", "space", "dup", "shuffle", "none",
                                     "none", "none"]))
        if what == "drop" and cols:
            cols.pop(draw(st.integers(0, len(cols) - 1)))
        elif what == "extra":
            cols.insert(draw(st.integers(0, len(cols))),
                        draw(st.sampled_from(["age", "Unnamed: 0", "", "time", "censorship"])
                             | st.text(max_size=8)))
        elif what == "case" and cols:
            i = draw(st.integers(0, len(cols) - 1))
            cols[i] = cols[i].upper()
        elif what == "space" and cols:
            i = draw(st.integers(0, len(cols) - 1))
            cols[i] = f" {cols[i]} "
        elif what == "dup" and cols:
            cols.append(draw(st.sampled_from(cols)))
        elif what == "shuffle":
            cols = draw(st.permutations(cols))
    return cols


@st.composite
def tables(draw, headers: list[list[str]], sep: str, max_rows: int = 8
           ) -> tuple[str, list[str]]:
    """(CSV text, header) with plausible and odd cells, ragged and duplicated rows."""
    header = draw(header_mutation(draw(st.sampled_from(headers))))
    rows = []
    for _ in range(0 if chance(draw, 5) else draw(st.integers(1, max_rows))):
        row = [draw(cells(c)) for c in header]
        if chance(draw, 5):  # ragged
            row = row[:-1] if draw(st.booleans()) else row + ["extra"]
        rows.append(row)
    if rows and draw(st.booleans()):
        rows += draw(st.lists(st.sampled_from(rows), max_size=3))  # duplicated rows
    if chance(draw, 5):
        rows.append(["x" * draw(st.integers(1000, 100_000))] * max(1, len(header)))  # huge value
    if chance(draw, 8):
        sep = draw(st.sampled_from([",", "\t", ";", "|"]))
    text = write_rows([header] + rows, sep, draw(st.sampled_from([csv.QUOTE_MINIMAL,
                                                                   csv.QUOTE_ALL])),
                      draw(st.sampled_from(["\n", "\r\n"])))
    return text, header


def _check_label_frame(df: pd.DataFrame) -> None:
    assert list(df.columns) == LABEL_COLUMNS and len(df) >= 1
    assert all(isinstance(v, str) and v for v in df.patient_id)
    assert all(isinstance(v, str) and v for v in df.slide_id)
    t = df.time.to_numpy(dtype=float)
    assert np.isfinite(t).all() and (t >= 0).all(), t
    assert set(df.event.unique()) <= {0, 1}
    assert (df.groupby("slide_id").patient_id.nunique() == 1).all()
    assert (df.groupby("patient_id")[["time", "event"]].nunique() == 1).all().all()


@st.composite
def label_cases(draw):
    suffix = draw(st.sampled_from([".csv", ".csv", ".tsv", ".txt"]))
    text, header = draw(tables(list(LABEL_HEADERS.values()), "," if suffix == ".csv" else "\t"))
    data = draw(st.binary(max_size=200)) if chance(draw, 4) else encode(draw, text)
    convention = draw(st.sampled_from([*LABEL_HEADERS])) if chance(draw, 20) else None
    endpoint = draw(st.sampled_from(["os", "dss", "pfi"])) if chance(draw, 15) else None
    return data, suffix, convention, endpoint, header


def labels_property(fuzz_counts, case):
    data, suffix, convention, endpoint, header = case
    fuzz_counts["label tables (steph.data.labels.read_labels)"] += 1
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"labels{suffix}"
        path.write_bytes(data)
        try:
            df = read_labels(path, convention=convention, endpoint=endpoint)
        except Exception as err:  # noqa: BLE001 - the property is about the error's type
            _check_error(err, path, fields=[c.strip() for c in header])
        else:
            _check_label_frame(df)


test_fuzz_label_tables = _settings(FAST)(given(label_cases())(labels_property))
test_fuzz_label_tables_slow = pytest.mark.slow(
    _settings(SLOW)(given(label_cases())(labels_property)))


# -- split files ----------------------------------------------------------------------------------

PATIENTS = [f"P{i}" for i in range(1, 7)]


def _fold_records(fmt: str, train: list[str], test: list[str]) -> list[tuple[list[str], list]]:
    """(columns, rows as dicts) of each file of one fold, before any damage."""
    if fmt == "native":
        rows = [{"patient_id": p, "split": "train"} for p in train] + [
            {"patient_id": p, "split": "test"} for p in test]
        return [(["patient_id", "split"], rows)]
    if fmt == "mcat":  # unequal columns: blank cells at the end of the shorter ones
        n = max(len(train), len(test))
        pad = lambda ids: ids + [""] * (n - len(ids))
        rows = [{"train": a, "val": b, "test": ""} for a, b in zip(pad(train), pad(test))]
        return [(["train", "val", "test"], rows)]
    return [(["case_id", "slide_id"], [{"case_id": p, "slide_id": f"{p}-S"} for p in ids])
            for ids in (train, test)]


def _split_file_names(fmt: str, k: str, prefix: str) -> list[str]:
    return {"native": [f"fold_{k}.csv"], "mcat": [f"splits_{k}.csv"],
            "perfold": [f"{prefix}fold{k}_train.csv", f"{prefix}fold{k}_test.csv"]}[fmt]


@st.composite
def split_folders(draw):
    """Folds of patients P1..P6 in one of the three formats, then damaged: odd cells, columns
    dropped or added, duplicated rows, encodings, truncation, a stray or duplicate file."""
    fmt = draw(st.sampled_from(["native", "mcat", "perfold"]))
    prefix = draw(st.sampled_from(["", "tcga_blca_"]))
    files = {}
    for k in draw(st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True)):
        test = draw(st.lists(st.sampled_from(PATIENTS), min_size=1, max_size=3, unique=True))
        train = [p for p in PATIENTS if p not in test]
        if chance(draw, 10):  # a patient on both sides
            train.append(test[0])
        names = _split_file_names(fmt, f"0{k}" if chance(draw, 8) else str(k), prefix)
        for name, (columns, records) in zip(names, _fold_records(fmt, train, test)):
            header = draw(header_mutation(columns))
            rows = [[draw(odd_cells()) if chance(draw, 8) else rec.get(c.strip().lower(), "x")
                     for c in header] for rec in records]
            if rows and chance(draw, 20):
                rows += draw(st.lists(st.sampled_from(rows), max_size=3))
            files[name] = encode(draw, write_rows([header] + rows, ",", csv.QUOTE_MINIMAL,
                                                  "\n"))
    if chance(draw, 8):
        files[draw(st.sampled_from(["fold_1.csv", "splits_0.csv", "README.txt"]))] = draw(
            st.binary(max_size=64))
    if chance(draw, 8):  # the same fold twice: fold_2.csv and fold_02.csv
        name = draw(st.sampled_from(sorted(files)))
        files[re.sub(r"(\d+)(_train|_test)?\.csv$", r"0\1\2.csv", name)] = files[name]
    known = None
    if chance(draw, 50):
        known = draw(st.lists(st.sampled_from(PATIENTS), min_size=2, unique=True))
    return files, known


def splits_property(fuzz_counts, case):
    files, known = case
    fuzz_counts["split folders (steph.data.splits.read_splits)"] += 1
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "splits"
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        folds = [int(m.group(1)) for name in files
                 if (m := re.match(r"^(?:fold_|splits_)(\d+)\.csv$", name))]
        try:
            splits = read_splits(folder, known)
        except Exception as err:  # noqa: BLE001
            _check_error(err, folder)
        else:
            assert len(folds) == len(set(folds)), f"two files for one fold were accepted: {files}"
            assert splits and [s.fold for s in splits] == sorted({s.fold for s in splits})
            for s in splits:
                assert s.train_ids and s.test_ids and not set(s.train_ids) & set(s.test_ids)
                ids = s.train_ids + s.test_ids
                assert all(isinstance(p, str) and p == p.strip() and p for p in ids)
                if known is not None:
                    assert set(ids) <= set(known)


test_fuzz_split_folders = _settings(FAST)(given(split_folders())(splits_property))
test_fuzz_split_folders_slow = pytest.mark.slow(
    _settings(SLOW)(given(split_folders())(splits_property)))


# -- feature files --------------------------------------------------------------------------------

NP_DTYPES = ["float16", "float32", "float64", "float32", "float32", "int32", "uint8", "bool",
             "complex64", "S4"]


@st.composite
def shapes(draw, min_rows: int = 0):
    rank = draw(st.sampled_from([2, 2, 2, 3, 1, 0, 4]))
    if rank == 3 and draw(st.booleans()):
        return (1, draw(st.integers(min_rows, 80)), draw(st.integers(0, 6)))
    return tuple(draw(st.integers(0 if i else min_rows, 80 if i == 0 else 6))
                 for i in range(rank))


def values(draw, shape, dtype: str) -> np.ndarray:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = np.array(rng.normal(size=shape) * draw(st.sampled_from([1.0, 1.0, 1e30, 1e-30])))
    if x.size and draw(st.integers(0, 4)) == 0:
        x.flat[draw(st.integers(0, x.size - 1))] = draw(st.sampled_from([np.nan, np.inf,
                                                                         -np.inf]))
    if dtype == "S4":
        return np.full(shape, b"ab", dtype="S4")
    with np.errstate(all="ignore"):
        return np.array(x.astype(dtype))


@st.composite
def h5_files(draw) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.h5"
        with h5py.File(path, "w") as f:
            what = draw(st.sampled_from(["features"] * 6 + ["group", "missing", "empty"]))
            if what == "features":
                dtype = draw(st.sampled_from(NP_DTYPES))
                shape = draw(shapes())
                x = values(draw, shape, dtype)
                kw = {}
                if len(shape) >= 2 and all(shape) and draw(st.booleans()):
                    kw["chunks"] = (1,) * (len(shape) - 1) + (shape[-1],)
                    if dtype != "S4" and draw(st.booleans()):
                        kw["compression"] = "gzip"
                f.create_dataset("features", data=x, **kw)
            elif what == "group":
                f.create_group("features")
            elif what == "empty":
                f.create_dataset("features", data=h5py.Empty("f4"))
            else:
                f.create_dataset("feats", data=np.ones((3, 4), "f4"))
            if draw(st.booleans()):
                cshape = draw(shapes())
                cdtype = draw(st.sampled_from(["int64", "float64", "S4", "float32"]))
                if draw(st.integers(0, 5)) == 0:
                    f.create_dataset("coords", data=h5py.Empty("i8"))
                else:
                    f.create_dataset("coords", data=values(draw, cshape, cdtype))
        return draw(damage(path.read_bytes()))


@st.composite
def pt_objects(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.float64,
                                  torch.bfloat16, torch.int64, torch.bool, torch.complex64]))
    shape = draw(shapes())
    t = torch.from_numpy(values(draw, shape, "float64")).to(dtype)
    how = draw(st.sampled_from(["plain"] * 4 + ["grad", "transposed", "sparse", "view"]))
    if how == "grad" and t.is_floating_point():
        t = (t.clone().requires_grad_(True) * 1.0)  # saved from a forward pass with autograd on
    elif how == "transposed" and t.dim() >= 2:
        t = t.transpose(-1, -2)
    elif how == "sparse" and t.dim() == 2 and t.dtype != torch.bool:
        t = t.to_sparse()
    elif how == "view" and t.numel() > 1:
        t = t.reshape(-1)[1:]
    container = draw(st.sampled_from(["tensor"] * 4 + ["dict", "dict_other", "list", "int",
                                                          "str", "none", "numpy"]))
    if container == "tensor":
        return t
    return {"dict": {"features": t, "coords": torch.zeros(2)},
            "dict_other": {1: t, "feats": t}, "list": [t, t], "int": 3, "str": "features",
            "none": None, "numpy": np.ones((3, 4), np.float32)}[container]


@st.composite
def pt_files(draw) -> bytes:
    obj = draw(pt_objects())
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=draw(st.sampled_from([True, True,
                                                                               False])))
    return draw(damage(buf.getvalue()))


@st.composite
def feature_cases(draw):
    suffix = draw(st.sampled_from([".h5", ".pt"]))
    if draw(st.integers(0, 14)) == 0:
        return suffix, draw(st.binary(max_size=300))
    return suffix, draw(h5_files() if suffix == ".h5" else pt_files())


def features_property(fuzz_counts, case):
    suffix, data = case
    fuzz_counts["feature files (steph.data.features: read_features, read_feature_shape, "
           "read_coords)"] += 1
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"TCGA-XX-0001-01Z-00-DX1.A-B{suffix}"
        path.write_bytes(data)
        try:
            n, dim, dtype = read_feature_shape(path)
            assert n >= 1 and dim >= 1 and np.dtype(dtype).kind == "f"
        except Exception as err:  # noqa: BLE001
            _check_error(err, path)
        for check_finite in (True, False):
            try:
                x = read_features(path, check_finite=check_finite)
            except Exception as err:  # noqa: BLE001
                _check_error(err, path)
            else:
                assert x.dtype == np.float32 and x.ndim == 2 and x.shape[0] >= 1
                assert x.shape[1] >= 1 and x.flags.c_contiguous
                assert not check_finite or np.isfinite(x).all()
        try:
            c = read_coords(path)
        except Exception as err:  # noqa: BLE001
            _check_error(err, path)
        else:
            assert c is None or (c.ndim == 2 and c.shape[1] == 2 and c.dtype.kind in "if")


test_fuzz_feature_files = _settings(FAST)(given(feature_cases())(features_property))
test_fuzz_feature_files_slow = pytest.mark.slow(
    _settings(SLOW)(given(feature_cases())(features_property)))


# -- configuration: YAML files and --set overrides ------------------------------------------------

SECTIONS = {"data": ["labels", "convention", "n_folds", "max_instances", "cache_mb"],
            "bins": ["kind", "n_bins", "max_time"],
            "model": ["hidden_dim", "dropout", "init_seed"],
            "train": ["epochs", "lr", "threads", "deterministic", "seed"],
            "steph": ["top_k", "gamma", "mixing", "beta"], "merge": ["ties_density", "init_coef"]}
PLAUSIBLE = ["3", "1", "0", "1.0e-4", "0.5", "true", "~", "uniform", "hyper", "native", "os",
             ".nan", ".inf", "-.inf", "1e999", "-1", "1e30"]
SCALARS = st.one_of(
    st.sampled_from(PLAUSIBLE).map(yaml.safe_load), st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.text(max_size=10))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)


@st.composite
def config_docs(draw):
    """A settings tree: known and unknown sections and keys, values of any type (mostly
    scalars), sections that are empty or not mappings."""
    doc = {}
    for section in draw(st.lists(st.sampled_from([*SECTIONS, "training"]), max_size=4,
                                 unique=True)):
        keys = SECTIONS.get(section, ["a"]) + ["nope"]
        if chance(draw, 15):
            doc[section] = draw(st.one_of(st.none(), SCALARS))
        else:
            doc[section] = draw(st.dictionaries(st.sampled_from(keys),
                                                VALUES if chance(draw, 20) else SCALARS,
                                                max_size=3))
    return doc


@st.composite
def overrides(draw) -> str:
    """One --set argument: mostly section.key=value with a YAML scalar."""
    if chance(draw, 10):
        return draw(st.text(max_size=12))
    keys = [f"{s}.{k}" for s, ks in SECTIONS.items() for k in ks]
    key = draw(st.sampled_from(["train", "train.", ".lr", "a.b.c", "train.nope", "x.y",
                                " train.epochs "])) if chance(draw, 10) else draw(
        st.sampled_from(keys))
    value = draw(st.one_of(st.text(max_size=8), st.sampled_from(["[1,", "{a: 1}", "'x"])
                           )) if chance(draw, 15) else draw(st.sampled_from(PLAUSIBLE))
    return f"{key}={value}"


@st.composite
def config_cases(draw):
    kind = draw(st.sampled_from(["yaml", "yaml", "yaml", "none", "text", "bytes"]))
    data = None
    if kind == "yaml":
        data = encode(draw, yaml.safe_dump(draw(config_docs()), allow_unicode=True))
    elif kind == "text":
        data = encode(draw, draw(st.text(max_size=60)) + draw(st.sampled_from(
            ["", ":\n  - [", "train: {epochs: 3", "\t- a", "a: *x", "? [1]\n: 2", "{{"])))
    elif kind == "bytes":
        data = draw(st.binary(max_size=80))
    return data, draw(st.lists(overrides(), max_size=3))


def config_property(fuzz_counts, case):
    data, sets = case
    fuzz_counts["configuration (steph.config.load_config on YAML files, --set overrides)"] += 1
    with tempfile.TemporaryDirectory() as d:
        path = None
        if data is not None:
            path = Path(d) / "cfg.yaml"
            path.write_bytes(data)
        try:
            overrides = dict(parse_override(s) for s in sets)
            cfg = load_config(path, overrides)
        except Exception as err:  # noqa: BLE001
            keys = [s.split("=", 1)[0].strip() for s in sets]
            keys += [k.split(".", 1)[0] for k in keys]  # an unknown section is named alone
            _check_error(err, path, names=tuple(keys + [repr(k) for k in keys + sets]))
        else:
            assert isinstance(cfg, ExperimentConfig)
            for section in cfg.to_dict().values():
                for key, value in section.items():
                    assert not isinstance(value, float) or math.isfinite(value), key


test_fuzz_config = _settings(FAST)(given(config_cases())(config_property))
test_fuzz_config_slow = pytest.mark.slow(_settings(SLOW)(given(config_cases())(config_property)))


def test_bom_and_encodings_are_what_the_fuzzer_thinks():
    """The encodings above really differ in their bytes (a guard on the generator itself)."""
    text = "patient_id\né\n"
    assert text.encode("utf-8-sig").startswith(codecs.BOM_UTF8)
    assert text.encode("utf-16")[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
    assert len({text.encode(e, errors="replace") for e in set(ENCODINGS)}) >= 5
