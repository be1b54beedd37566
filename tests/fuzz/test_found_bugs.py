"""The crashes the fuzzers of test_readers.py found, each kept as a plain test of its smallest
input (each failed before its fix with an exception that was not one of steph's own)."""

from __future__ import annotations

import io

import h5py
import numpy as np
import pytest
import torch

from steph.config import load_config, parse_override
from steph.data.features import read_coords, read_feature_shape, read_features
from steph.data.labels import read_labels
from steph.data.splits import read_splits
from steph.errors import ConfigError, DataError


def _one_line(err, *needles):
    msg = str(err.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


# -- label tables and split files -------------------------------------------------------------

def test_parser_error_is_one_line(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("patient_id,slide_id,time,event\nP1,S1,1,0\nP2,S2,1,0,extra\n")
    with pytest.raises(DataError) as err:
        read_labels(path)
    _one_line(err, str(path), "cannot parse", "line 3")


def test_months_too_large_for_days(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("case_id,slide_id,survival_months,censorship\nP1,S1,1e308,0\nP2,S2,10,1\n")
    with pytest.raises(DataError) as err:  # was: a time of inf days, accepted
        read_labels(path)
    _one_line(err, str(path), "'survival_months'", "line 2", "'P1'")


def test_a_column_twice_after_stripping(tmp_path):
    (tmp_path / "splits").mkdir()
    path = tmp_path / "splits" / "fold_0.csv"
    path.write_text("patient_id, split ,split\nP1,train,train\nP2,test,test\n")
    with pytest.raises(DataError) as err:  # was: AttributeError ('DataFrame' has no 'str')
        read_splits(tmp_path / "splits")
    _one_line(err, str(path), "'split' appears more than once")


def test_the_same_fold_in_two_files(tmp_path):
    folder = tmp_path / "splits"
    folder.mkdir()
    (folder / "fold_1.csv").write_text("patient_id,split\nP1,train\nP2,test\n")
    (folder / "fold_01.csv").write_text("patient_id,split\nP2,train\nP1,test\n")
    with pytest.raises(DataError) as err:  # was: one of them silently ignored
        read_splits(folder)
    _one_line(err, "fold_01.csv and fold_1.csv both hold fold 1")


def test_utf16_tables_are_read_and_other_encodings_named(tmp_path):
    text = "patient_id,slide_id,time,event\nPé,S1,10,1\n"
    path = tmp_path / "labels.csv"
    path.write_bytes(text.encode("utf-16"))  # spreadsheet "Unicode text", with its BOM
    assert read_labels(path).patient_id.tolist() == ["Pé"]
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError) as err:
        read_labels(path)
    _one_line(err, str(path), "line 2", "not UTF-8", "0xe9")


# -- feature files -----------------------------------------------------------------------------

def _pt(path, obj, **kw):
    buf = io.BytesIO()
    torch.save(obj, buf, **kw)
    path.write_bytes(buf.getvalue())
    return path


def test_pt_saved_with_autograd_on_reads(tmp_path):
    x = torch.randn(4, 3, requires_grad=True) * 2  # features of a forward pass under autograd
    path = _pt(tmp_path / "s.pt", x)
    np.testing.assert_array_equal(read_features(path), x.detach().numpy())  # was: RuntimeError


@pytest.mark.parametrize("data", [b"", b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02"])
def test_empty_or_truncated_legacy_pt(tmp_path, data):
    path = tmp_path / "s.pt"
    path.write_bytes(data)
    with pytest.raises(DataError) as err:  # was: IndexError (empty message / unpickler stack)
        read_feature_shape(path)
    _one_line(err, str(path), "cannot read the .pt file")


def test_sparse_pt_is_refused(tmp_path):
    path = _pt(tmp_path / "s.pt", torch.randn(4, 3).to_sparse())
    with pytest.raises(DataError) as err:
        read_features(path)
    _one_line(err, str(path), "dense")


def test_h5_null_dataspace_and_text_coords(tmp_path):
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=h5py.Empty("f4"))
    with pytest.raises(DataError) as err:  # was: TypeError (len of None)
        read_features(path)
    _one_line(err, str(path), "features is an empty dataset")
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.ones((2, 3), "f4"))
        f.create_dataset("coords", data=np.full((2, 2), b"ab", "S4"))
    with pytest.raises(DataError) as err:  # was: ValueError (could not convert to float)
        read_coords(path)
    _one_line(err, str(path), "coords must be numbers")


@pytest.mark.parametrize("error", [RuntimeError("Link iteration failed (bad local heap "
                                                "signature)"), ValueError("Insufficient precision"),
                                   KeyError("bad object header")])
def test_damaged_h5_structure(tmp_path, monkeypatch, error):
    """What h5py raises for a file damaged inside (seen: RuntimeError, ValueError) becomes a
    DataError naming the file (simulated: which byte breaks what depends on the HDF5 build)."""
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.ones((20, 3), "f4"))

    def damaged(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(h5py.Group, "get", damaged)
    for reader in (read_features, read_feature_shape, read_coords):
        with pytest.raises(DataError) as err:  # was: the h5py exception itself
            reader(path)
        _one_line(err, str(path), "damaged")


# -- configuration -------------------------------------------------------------------------------

@pytest.mark.parametrize("content, needle", [
    (b"train:\n  lr: \"\\U00CBBD80\"\n", "not valid YAML"),  # was: ValueError from PyYAML
    (b"train: {epochs: 3\n", "not valid YAML"),  # was: a message over several lines
    (b"train:\n  lr: 1.0e-4 \xb5\n", "not UTF-8"),  # was: UnicodeDecodeError
    (b"train:\n  lr: .inf\n", "train.lr"),  # was: accepted (gt=0 holds for inf)
    (b"merge:\n  init_coef: .nan\n", "merge.init_coef"),  # was: accepted
])
def test_bad_config_files(tmp_path, content, needle):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    _one_line(err, str(path), needle)


def test_override_of_an_empty_section(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n")  # an empty section means "defaults"
    # was: "config section 'train' must be a mapping"
    assert load_config(path, dict([parse_override("train.epochs=3")])).train.epochs == 3
    path.write_text("steph: 3\n")
    with pytest.raises(ConfigError) as err:  # was: a message that did not name the file
        load_config(path, dict([parse_override("steph.top_k=2")]))
    _one_line(err, str(path), "'steph.top_k'")
