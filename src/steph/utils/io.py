"""Atomic file writes: a reader sees either the old file or the complete new one, never a torn
write, so an interrupted run never corrupts what it already wrote.

An I/O error while writing (a full disk, a quota, a read-only folder) raises a
:class:`~steph.errors.RunError` naming the file; the temporary file is removed and the previous
version of the file is left as it was.

Safetensors files are written byte for byte the same for the same tensors and metadata (the
header is serialised here with sorted keys: the library's own writer orders the metadata as a
hash map does, which differs between processes), and carry the SHA-256 of their tensor bytes in
their metadata (``steph.sha256``): :func:`load_tensors` checks it, so a truncated or damaged file
is reported as such instead of being read.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:  # torch is imported where tensors are read or written, not by config readers
    import torch

from steph.errors import CorruptFileError, DataError, RunError, StephError
from steph.utils.faults import fault_point

# metadata key of the SHA-256 (hex) of a safetensors file's data section
CHECKSUM_KEY = "steph.sha256"
_HEADER_MAX = 100_000_000  # the safetensors library's own limit on the header size


def _reason(err: OSError) -> str:
    if err.strerror:
        return f"{err.strerror} (errno {err.errno})"
    return str(err) or type(err).__name__


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


# read once at import: setting it briefly in every write would race with other threads' files
_UMASK = _read_umask()


def _temporary(path: Path) -> Path:
    """A new empty temporary file beside ``path`` (``.<name>.<random>.tmp``, the mode a plain
    open() would give it); RunError naming ``path`` when the folder cannot take it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:  # mkstemp makes the file 0600: give it the mode a plain open() would
            os.fchmod(fd, 0o666 & ~_UMASK)
        finally:
            os.close(fd)
    except OSError as e:
        raise RunError(f"cannot write {path}: {_reason(e)}") from e
    return Path(tmp)


def _commit(tmp: Path, path: Path, backup: Path | None = None) -> None:
    """Make ``tmp``'s bytes durable and rename it onto ``path`` (an existing ``path`` first to
    ``backup`` when given); RunError naming ``path`` on an I/O error."""
    moved_to_backup = False
    try:
        fault_point(f"write:{path.name}")
        with open(tmp, "rb+") as fh:  # make the bytes durable before the rename
            os.fsync(fh.fileno())
        if backup is not None and path.exists():
            os.replace(path, backup)
            moved_to_backup = True
            fault_point(f"backup:{path.name}")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        kept = (f"the previous version is kept as {backup}" if moved_to_backup
                else "the previous version, if any, is unchanged")
        raise RunError(f"cannot write {path}: {_reason(e)}; {kept}") from e


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, backup: str | os.PathLike | None = None
                ) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it onto `path`.

    With `backup`, an existing `path` is first renamed to `backup` (the previous version is
    kept), only once the new content is complete and on disk. An ``OSError`` while writing
    or renaming becomes a :class:`RunError` naming `path`; the temporary file is removed."""
    path = Path(path)
    tmp_path = _temporary(path)
    try:
        try:
            yield tmp_path
        except OSError as e:
            raise RunError(f"cannot write {path}: {_reason(e)}; the previous version, if any, "
                           "is unchanged") from e
        _commit(tmp_path, path, Path(backup) if backup is not None else None)
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)


class AtomicFile:
    """A file written as a stream (e.g. a large array, slide after slide) under a temporary
    name, put in place by :meth:`commit` (as :func:`atomic_path` does) or dropped by
    :meth:`discard`. Used as a context manager, it is discarded unless committed."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp = _temporary(self.path)
        try:
            self.fh = open(self.tmp, "wb")  # noqa: SIM115 - closed by commit() or discard()
        except OSError as e:
            self.tmp.unlink(missing_ok=True)
            raise RunError(f"cannot write {self.path}: {_reason(e)}") from e

    def write(self, data: bytes | memoryview) -> None:
        try:
            self.fh.write(data)
        except OSError as e:
            raise RunError(f"cannot write {self.path}: {_reason(e)}") from e

    def tell(self) -> int:
        return self.fh.tell()

    def commit(self) -> int:
        """Put the file in place; its size in bytes."""
        self.fh.close()
        size = self.tmp.stat().st_size
        _commit(self.tmp, self.path)
        return size

    def discard(self) -> None:
        if not self.fh.closed:
            self.fh.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.tmp.exists():
            self.discard()


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the renames in ``folder`` durable (best effort)."""
    _fsync_dir(Path(folder))


def remove_temporaries(folder: str | os.PathLike, *, recursive: bool = False) -> list[Path]:
    """Remove the temporary files (``.<name>.<random>.tmp``) that the atomic writes of a
    process killed while writing left in `folder` (and its subfolders with `recursive`);
    return them. Only for a folder that no other process writes to meanwhile (a run directory
    under its lease): a live writer's temporary file would go too."""
    folder = Path(folder)
    found = sorted(folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp"))
    for tmp in found:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return found


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content; :class:`RunError` naming the file when it is missing, unreadable
    or not JSON."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise RunError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise RunError(f"cannot read {path}: {_reason(e)}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RunError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column "
                       f"{e.colno})") from None


# byte-order marks, longest first (UTF-32 LE starts with UTF-16 LE's)
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))


def read_user_text(path: str | os.PathLike, what: str = "file",
                   error: type[StephError] = DataError) -> str:
    """A user's text file: UTF-8, or UTF-8 / UTF-16 / UTF-32 with a byte-order mark (as
    spreadsheet programs write them). Anything else raises `error` naming the file and the line
    of the first byte that is not text in that encoding, or of a NUL character."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, not a {what}") from None
    except OSError as e:
        raise error(f"cannot read {path}: {_reason(e)}") from None
    encoding = next((enc for bom, enc in _BOMS if raw.startswith(bom)), "utf-8")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise error(f"{path}: line {line}: not {encoding.upper()} text (byte "
                    f"0x{raw[e.start]:02x}); save the {what} as UTF-8") from None
    if "\0" in text:
        line = text[:text.index("\0")].count("\n") + 1
        raise error(f"{path}: line {line}: NUL character; the {what} is not text (damaged, or "
                    "a binary file)")
    return text


def read_user_table(path: str | os.PathLike, what: str = "table", sep: str = ",",
                    **kwargs: Any) -> pd.DataFrame:
    """A user's CSV / TSV table, every cell a string (blanks kept as ""), column names stripped.
    Unreadable, empty or malformed tables are a one-line DataError naming the file."""
    path = Path(path)
    text = read_user_text(path, what)
    try:
        df = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False,
                         na_filter=False, **kwargs)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the {what} is empty") from None
    except (pd.errors.ParserError, ValueError, csv.Error) as e:
        detail = " ".join(str(e).split())
        raise DataError(f"{path}: cannot parse the {what}: {detail}") from None
    df.columns = [str(c).strip() for c in df.columns]
    twice = sorted({c for c in df.columns if list(df.columns).count(c) > 1})
    if twice:
        raise DataError(f"{path}: column {twice[0]!r} appears more than once in the header "
                        f"(columns: {list(df.columns)})")
    return df


def write_csv(path: str | os.PathLike, df: pd.DataFrame, **kwargs: Any) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, **kwargs)


# -- safetensors --------------------------------------------------------------------------------

def _safetensors_parts(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None
                       ) -> tuple[bytes, memoryview]:
    """(length prefix + header, data section) of a safetensors file, reproducibly ordered, with
    the data's SHA-256 in the metadata."""
    from safetensors.torch import save

    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    blob = save(clean)
    n = int.from_bytes(blob[:8], "little")
    entries = json.loads(blob[8:8 + n])
    entries.pop("__metadata__", None)
    data = memoryview(blob)[8 + n:]
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta[CHECKSUM_KEY] = hashlib.sha256(data).hexdigest()
    header = {"__metadata__": dict(sorted(meta.items())), **dict(sorted(entries.items()))}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned, as the library does
    return len(text).to_bytes(8, "little") + text, data


def tensors_to_bytes(tensors: dict[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> bytes:
    """The bytes :func:`save_tensors` writes (the same for the same tensors and metadata)."""
    head, data = _safetensors_parts(tensors, metadata)
    return head + bytes(data)


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None, *,
                 backup: str | os.PathLike | None = None) -> None:
    """Save a name -> tensor dict as safetensors (never pickle), atomically, with a checksum.

    `backup`: keep the file being replaced under that name (see :func:`atomic_path`)."""
    head, data = _safetensors_parts(tensors, metadata)
    with atomic_path(path, backup=backup) as tmp, open(tmp, "wb") as fh:
        fh.write(head)
        fh.write(data)


def _parse_safetensors(raw: bytes, path: Path, size: int | None = None
                       ) -> tuple[dict[str, Any], int]:
    """(header, start of the data section) from the file's bytes (at least its header, with
    `size` the file's size); :class:`CorruptFileError` for a damaged file."""
    size = len(raw) if size is None else size
    if size < 8:
        raise CorruptFileError(f"{path}: truncated or not a safetensors file ({size} bytes)")
    n = int.from_bytes(raw[:8], "little")
    if n > _HEADER_MAX or 8 + n > size:
        raise CorruptFileError(f"{path}: truncated or not a safetensors file (header of {n} "
                               f"bytes announced, the file has {size} bytes)")
    try:
        header = json.loads(raw[8:8 + n])
        if not isinstance(header, dict):
            raise TypeError("the header is not a JSON object")
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise CorruptFileError(f"{path}: damaged safetensors header ({e})") from None
    have = size - 8 - n
    need = max(ends, default=0)
    if need > have:
        raise CorruptFileError(f"{path}: truncated: the tensor data should be {need} bytes, "
                               f"the file holds {have}")
    return header, 8 + n


def read_safetensors(path: str | os.PathLike, *, verify: bool = True
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file. Raises :class:`CorruptFileError` naming the
    file when it is truncated, its header is damaged, or (with `verify`) its data do not match
    the checksum recorded when it was written (files without a checksum are read unchecked)."""
    from safetensors.torch import load

    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RunError(f"{path}: file not found") from None
    except OSError as e:
        raise RunError(f"cannot read {path}: {_reason(e)}") from None
    header, start = _parse_safetensors(raw, path)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise CorruptFileError(f"{path}: damaged safetensors header (metadata is not an object)")
    expected = meta.get(CHECKSUM_KEY)
    if verify and expected is not None:
        actual = hashlib.sha256(memoryview(raw)[start:]).hexdigest()
        if actual != expected:
            raise CorruptFileError(f"{path}: damaged: the tensor data do not match the checksum "
                                   f"recorded when the file was written (sha256 {actual[:12]}..., "
                                   f"expected {expected[:12]}...)")
    try:
        loaded = load(raw)
    except Exception as e:  # noqa: BLE001 - the library's own error type varies by version
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CorruptFileError(f"{path}: damaged safetensors file ({first})") from None
    # in file order, as safetensors.torch.load_file gives them (load() follows a hash map,
    # whose order differs between processes)
    order = sorted((k for k in header if k != "__metadata__"),
                   key=lambda k: (header[k]["data_offsets"][0], k))
    return {k: loaded[k] for k in order}, _unpacked(meta)


# Another way of making metadata byte-stable, used by some versions of steph: every key packed
# into one JSON string under this key. Such files are read as if the keys were separate.
_PACKED_KEY = "steph"


def _unpacked(meta: dict[str, Any]) -> dict[str, str]:
    """The metadata the writer was given (the checksum is checked, not returned)."""
    out = {str(k): str(v) for k, v in meta.items() if k != CHECKSUM_KEY}
    if set(out) == {_PACKED_KEY}:
        try:
            inner = json.loads(out[_PACKED_KEY])
        except ValueError:
            return out
        if isinstance(inner, dict):
            out.pop(_PACKED_KEY)
            out.update({str(k): str(v) for k, v in inner.items()})
    return out


def load_tensor_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file, from its header only (the tensors are neither read
    nor checked). :class:`CorruptFileError` naming the file when the header is damaged."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            prefix = fh.read(8)
            n = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
            raw = prefix + fh.read(min(n, _HEADER_MAX))
    except FileNotFoundError:
        raise RunError(f"{path}: file not found") from None
    except OSError as e:
        raise RunError(f"cannot read {path}: {_reason(e)}") from None
    header, _ = _parse_safetensors(raw, path, size)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise CorruptFileError(f"{path}: damaged safetensors header (metadata is not an object)")
    return _unpacked(meta)


def load_tensors(path: str | os.PathLike, *, verify: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, checked as :func:`read_safetensors` does."""
    return read_safetensors(path, verify=verify)[0]


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
