"""Atomic writes under I/O errors, reproducible safetensors bytes, checksums."""

import errno
import io
import os

import pandas as pd
import pytest
import torch

from steph.errors import CorruptFileError, RunError
from steph.utils import io as sio
from steph.utils.io import (
    CHECKSUM_KEY,
    load_tensors,
    read_json,
    read_safetensors,
    save_tensors,
    tensors_to_bytes,
    write_csv,
    write_json,
    write_text,
)


def tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.arange(5),
            "h": torch.randn(7, generator=g).half()}


def full_disk(monkeypatch, after_bytes=3):
    """Make writes to temporary files fail with ENOSPC after `after_bytes` bytes, as a full
    disk does (the first bytes go through, so a torn file would exist without atomicity)."""
    real_open = open

    class Failing:
        def __init__(self, fh):
            self.fh, self.written = fh, 0

        def write(self, data):
            if self.written + len(data) > after_bytes:
                self.fh.write(bytes(data[:1]) if isinstance(data, (bytes, memoryview))
                              else data[:1])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(data)
            return self.fh.write(data)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def fake_open(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        if "w" in mode and str(file).endswith(".tmp"):
            return Failing(fh)
        return fh

    monkeypatch.setattr("builtins.open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)  # what pathlib opens files with


WRITERS = {
    "text": (lambda p: write_text(p, "new text, long enough\n"), "old.txt"),
    "json": (lambda p: write_json(p, {"new": list(range(10))}), "old.json"),
    "csv": (lambda p: write_csv(p, pd.DataFrame({"a": range(10)})), "old.csv"),
    "safetensors": (lambda p: save_tensors(p, tensors(1)), "old.safetensors"),
}


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_full_disk_keeps_the_old_file_and_names_the_new_one(kind, tmp_path, monkeypatch):
    write, name = WRITERS[kind]
    target = tmp_path / name
    target.write_bytes(b"the previous content")
    full_disk(monkeypatch)
    with pytest.raises(RunError) as err:
        write(target)
    monkeypatch.undo()
    msg = str(err.value)
    assert str(target) in msg and "No space left on device" in msg and "\n" not in msg
    assert target.read_bytes() == b"the previous content"
    assert [p.name for p in tmp_path.iterdir()] == [name]  # the temporary file is gone


def test_failed_rename_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    write_json(target, {"v": 1})

    def no_rename(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(sio.os, "replace", no_rename)
    with pytest.raises(RunError, match="Read-only file system"):
        write_json(target, {"v": 2})
    monkeypatch.undo()
    assert read_json(target) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_backup_keeps_the_replaced_file(tmp_path):
    path, prev = tmp_path / "c.safetensors", tmp_path / "c.prev.safetensors"
    save_tensors(path, tensors(0), backup=prev)
    assert not prev.exists()
    save_tensors(path, tensors(1), backup=prev)
    assert torch.equal(load_tensors(prev)["w"], tensors(0)["w"])
    assert torch.equal(load_tensors(path)["w"], tensors(1)["w"])


def test_safetensors_bytes_do_not_depend_on_order_and_round_trip(tmp_path):
    t = tensors()
    meta = {"kind": "abmil", "format": "x/1", "epoch": "3"}
    a = tensors_to_bytes(t, meta)
    b = tensors_to_bytes(dict(reversed(list(t.items()))), dict(reversed(list(meta.items()))))
    assert a == b
    save_tensors(tmp_path / "x.safetensors", t, meta)
    assert (tmp_path / "x.safetensors").read_bytes() == a
    got, got_meta = read_safetensors(tmp_path / "x.safetensors")
    assert got.keys() == t.keys() and all(torch.equal(got[k], t[k]) for k in t)
    assert got_meta == meta  # the checksum is checked on reading, not handed back
    assert CHECKSUM_KEY.encode() in a[:200]
    from safetensors.torch import load_file  # the library reads what we write

    assert all(torch.equal(load_file(tmp_path / "x.safetensors")[k], t[k]) for k in t)
    assert list(got) == list(load_file(tmp_path / "x.safetensors"))  # file order, every time


def test_truncated_and_damaged_files_are_named(tmp_path):
    path = tmp_path / "m.safetensors"
    save_tensors(path, tensors())
    raw = path.read_bytes()
    for cut in (0, 4, 8, 40, len(raw) - 1):
        path.write_bytes(raw[:cut])
        with pytest.raises(CorruptFileError, match="truncated") as err:
            load_tensors(path)
        assert str(path) in str(err.value)
    flipped = bytearray(raw)
    flipped[-5] ^= 0x10
    path.write_bytes(bytes(flipped))
    with pytest.raises(CorruptFileError, match="checksum"):
        load_tensors(path)
    assert load_tensors(path, verify=False)  # the bytes still parse: only the checksum knows
    header = bytearray(raw)
    header[9] = ord("[")
    path.write_bytes(bytes(header))
    with pytest.raises(CorruptFileError, match="damaged safetensors header"):
        load_tensors(path)


def test_files_without_checksum_are_still_read(tmp_path):
    from safetensors.torch import save_file

    save_file(tensors(), tmp_path / "old.safetensors")
    assert torch.equal(load_tensors(tmp_path / "old.safetensors")["w"], tensors()["w"])


@pytest.mark.parametrize("content, needle", [
    (None, "file not found"),
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not a UTF-8 text file"),
])
def test_read_json_names_the_file(content, needle, tmp_path):
    path = tmp_path / "m.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(RunError, match=needle) as err:
        read_json(path)
    assert str(path) in str(err.value)


def test_tensors_come_back_in_file_order(tmp_path):
    """The order of the names is the file's (as safetensors' load_file gives it), never the
    order of a hash map, which differs between processes (STEPH's layout follows it)."""
    from safetensors.torch import load_file

    t = {f"layer{i}.weight": torch.ones(i + 1) for i in range(12)}
    t["double"] = torch.zeros(2, dtype=torch.float64)
    save_tensors(tmp_path / "x.safetensors", t)
    assert list(load_tensors(tmp_path / "x.safetensors")) == list(load_file(tmp_path / "x.safetensors"))


def test_metadata_from_the_header_and_packed_metadata(tmp_path):
    """load_tensor_metadata reads the header only (and sees a truncated file from it); metadata
    that another version of steph packed as one JSON string under 'steph' reads as separate
    keys."""
    import json

    from safetensors.torch import save_file

    from steph.utils.io import load_tensor_metadata

    path = tmp_path / "x.safetensors"
    save_tensors(path, tensors(), {"epoch": "3"})
    assert load_tensor_metadata(path)["epoch"] == "3"
    path.write_bytes(path.read_bytes()[:-10])  # the header alone tells the data are cut short
    with pytest.raises(CorruptFileError, match="truncated"):
        load_tensor_metadata(path)
    save_file(tensors(), path, metadata={"steph": json.dumps({"epoch": "4", "kind": "abmil"})})
    assert load_tensor_metadata(path) == {"epoch": "4", "kind": "abmil"}
    assert read_safetensors(path)[1] == {"epoch": "4", "kind": "abmil"}
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00[1, 2]  ")
    with pytest.raises(CorruptFileError, match="damaged safetensors header"):
        load_tensor_metadata(path)


def test_remove_temporaries_clears_what_killed_writes_left(tmp_path):
    run = tmp_path / "run"
    (run / "search").mkdir(parents=True)
    for name in (".model.safetensors.ab12.tmp", "search/.score.json.cd34.tmp", "keep.tmp",
                 "model.safetensors"):
        (run / name).write_text("x")
    assert [p.name for p in sio.remove_temporaries(run)] == [".model.safetensors.ab12.tmp"]
    assert (run / "search" / ".score.json.cd34.tmp").exists()
    assert [p.name for p in sio.remove_temporaries(run, recursive=True)] == [
        ".score.json.cd34.tmp"]
    assert sorted(p.name for p in run.rglob("*") if p.is_file()) == ["keep.tmp",
                                                                     "model.safetensors"]


def test_atomic_writes_get_the_mode_of_a_plain_open(tmp_path, monkeypatch):
    import os
    import stat

    from steph.utils import io
    from steph.utils.io import write_text

    monkeypatch.setattr(io, "_UMASK", 0o027)  # read at import; as if the process started so
    old = os.umask(0o027)
    try:
        write_text(tmp_path / "a.txt", "x")
        (tmp_path / "b.txt").write_text("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a.txt").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o640
