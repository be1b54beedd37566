"""Patch-feature files of one slide: TRIDENT / CLAM HDF5 and CLAM ``.pt`` tensors.

Accepted inputs
---------------
- HDF5 (``.h5``): dataset ``features`` of shape ``(N, D)`` or ``(1, N, D)``, float16/32/64;
  optional ``coords`` of shape ``(N, 2)`` (or ``(1, N, 2)``). TRIDENT writes one-row chunks
  (``chunks=(1, D)``); CLAM writes contiguous or chunked datasets. Both are read here.
- ``.pt``: a tensor of shape ``(N, D)`` or ``(1, N, D)`` saved with ``torch.save`` (CLAM's
  ``pt_files``), or a dict holding such a tensor under ``features``. Loaded with
  ``weights_only=True``: arbitrary pickled objects are refused.

A slide's file is ``<features_dir>/<slide_id>.h5`` (or ``.pt``); CLAM's ``h5_files/`` and
``pt_files/`` subfolders are searched too. Slide ids may carry a WSI extension (``.svs``...),
which is stripped only when it is one of the known suffixes: TCGA ids contain dots
(``TCGA-...-DX1.05317C75-A8F3-...``) and keep them.

Reading one-row-chunk HDF5 files through h5py costs one chunk look-up per row (about 6 us),
which makes a 10,000-patch TRIDENT file several times slower to read than a contiguous one.
For unfiltered chunked datasets :func:`read_features` therefore reads the chunk index once
(``chunk_iter``) and copies the raw bytes in coalesced runs; anything unusual (filters,
partial chunks, a user block, a mismatch on a spot check) falls back to plain h5py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from steph.errors import DataError
from steph.utils.io import atomic_path

logger = logging.getLogger("steph.data.features")

WSI_EXTENSIONS: tuple[str, ...] = (
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".svslide", ".bif",
)
FEATURE_SUFFIXES: tuple[str, ...] = (".h5", ".pt")
CLAM_SUBDIRS: dict[str, str] = {".h5": "h5_files", ".pt": "pt_files"}
LAYOUTS = ("contiguous", "trident")

# Use the chunk-index fast path only above this many chunks (below it h5py is fast enough).
_FAST_PATH_MIN_CHUNKS = 64


# --------------------------------------------------------------------------------------------
# slide ids and file discovery
# --------------------------------------------------------------------------------------------


def strip_wsi_extension(slide_id: Any) -> str:
    """``"X.svs" -> "X"``; only the known WSI suffixes (case-insensitive) are removed."""
    s = str(slide_id).strip()
    low = s.lower()
    for ext in WSI_EXTENSIONS:
        if low.endswith(ext) and len(s) > len(ext):
            return s[: -len(ext)]
    return s


def slide_id_problem(slide_id: Any) -> str | None:
    """Why `slide_id` cannot name a file inside a features folder, or None when it can.

    Slide ids come from data files and become file names: an absolute path, or ``..``
    components that climb out of the folder, would read files elsewhere. (Symbolic links placed
    in the features folder are a different matter: the user made them, and they are followed.)
    """
    s = str(slide_id)
    if "\0" in s:
        return "contains a NUL character"
    unified = s.replace("\\", "/")
    if unified.startswith("/") or (len(s) >= 2 and s[1] == ":" and s[0].isalpha()):
        return "is an absolute path"
    depth = 0
    for part in unified.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return "climbs out of the features folder ('..')"
        elif part not in ("", "."):
            depth += 1
    return None


def _check_slide_id(slide_id: str) -> None:
    problem = slide_id_problem(slide_id)
    if problem is not None:
        raise DataError(f"slide id {slide_id!r} {problem}; slide ids name files inside the "
                        "features folder")


def _search_dirs(features_dir: Path) -> list[tuple[Path, tuple[str, ...]]]:
    """Folders to look in, each with the suffixes that may live there (preference order)."""
    return [
        (features_dir, FEATURE_SUFFIXES),
        (features_dir / CLAM_SUBDIRS[".h5"], (".h5",)),
        (features_dir / CLAM_SUBDIRS[".pt"], (".pt",)),
    ]


class FeatureIndex:
    """All feature files under a features folder, listed once (one ``scandir`` per folder).

    Lookup prefers ``.h5`` over ``.pt`` (HDF5 shapes can be read without reading data), and
    the features folder itself over CLAM's subfolders."""

    def __init__(self, features_dir: str | os.PathLike):
        self.features_dir = Path(features_dir)
        # stem -> {suffix: path}, first folder wins for each suffix
        self._files: dict[str, dict[str, Path]] = {}
        for folder, suffixes in _search_dirs(self.features_dir):
            if not folder.is_dir():
                continue
            with os.scandir(folder) as it:
                for entry in it:
                    name = entry.name
                    suffix = os.path.splitext(name)[1]
                    if suffix not in suffixes or name.startswith("."):
                        continue
                    if not entry.is_file():
                        continue
                    stem = name[: -len(suffix)]
                    self._files.setdefault(stem, {}).setdefault(suffix, Path(entry.path))

    def __len__(self) -> int:
        return len(self._files)

    def stems(self) -> list[str]:
        return sorted(self._files)

    def find(self, slide_id: str) -> Path | None:
        for stem in _candidate_stems(slide_id):
            found = self._files.get(stem)
            if found:
                for suffix in FEATURE_SUFFIXES:
                    if suffix in found:
                        return found[suffix]
        return None

    def missing_message(self, slide_id: str) -> str:
        return _missing_message(self.features_dir, slide_id)


def _candidate_stems(slide_id: str) -> list[str]:
    raw = str(slide_id).strip()
    stripped = strip_wsi_extension(raw)
    return [stripped] if stripped == raw else [stripped, raw]


def _missing_message(features_dir: Path, slide_id: str) -> str:
    problem = slide_id_problem(slide_id)
    if problem is not None:
        return f"slide id {slide_id!r} {problem}; not looked up"
    stem = _candidate_stems(slide_id)[0]
    looked = [str(folder / f"{stem}{sfx}") for folder, sfxs in _search_dirs(features_dir)
              for sfx in sfxs]
    return (f"slide {slide_id!r}: no feature file found; looked for "
            + ", ".join(looked))


def find_feature_file(features_dir: str | os.PathLike, slide_id: str) -> Path:
    """Path of the feature file of `slide_id` (``.h5`` preferred over ``.pt``).

    Looks in `features_dir`, then ``features_dir/h5_files`` and ``features_dir/pt_files``.
    Raises :class:`DataError` naming every path tried when nothing is there, or when the id
    would name a file outside `features_dir` (see :func:`slide_id_problem`)."""
    _check_slide_id(slide_id)
    features_dir = Path(features_dir)
    for stem in _candidate_stems(slide_id):
        for folder, suffixes in _search_dirs(features_dir):
            for suffix in (s for s in FEATURE_SUFFIXES if s in suffixes):
                p = folder / f"{stem}{suffix}"
                if p.is_file():
                    return p
    raise DataError(_missing_message(features_dir, slide_id))


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def _sid(path: Path, slide_id: str | None) -> str:
    return slide_id if slide_id is not None else path.stem


def _err(path: Path, slide_id: str | None, what: str) -> DataError:
    return DataError(f"slide {_sid(path, slide_id)!r} ({path}): {what}")


def _first_line(e: BaseException) -> str:
    """An exception's message on one line (its type when it has none)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _check_shape(shape: tuple[int, ...] | None, path: Path, slide_id: str | None,
                 name: str = "features") -> tuple[int, int]:
    if shape is None:  # an HDF5 dataset with a null dataspace
        raise _err(path, slide_id, f"{name} is an empty dataset (no shape)")
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2:
        raise _err(path, slide_id,
                   f"{name} must have shape (N, D) or (1, N, D), got {tuple(shape)}")
    n, d = int(shape[0]), int(shape[1])
    if n == 0:
        raise _err(path, slide_id, f"{name} has 0 patches (shape {tuple(shape)})")
    if d == 0:
        raise _err(path, slide_id, f"{name} has feature dimension 0 (shape {tuple(shape)})")
    return n, d


def _check_float(dtype: np.dtype, path: Path, slide_id: str | None) -> None:
    if dtype.kind != "f":
        raise _err(path, slide_id, f"features must be floating point, got dtype {dtype}")


@contextlib.contextmanager
def _open_h5(path: Path, slide_id: str | None) -> Iterator[h5py.File]:
    """The open HDF5 file; what h5py raises while reading a damaged file becomes a DataError
    naming the slide and the file."""
    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as e:
        raise _err(path, slide_id, f"cannot open as HDF5: {_first_line(e)}") from e
    try:
        with f:
            yield f
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
        raise _err(path, slide_id, f"cannot read the HDF5 file (damaged?): {_first_line(e)}"
                   ) from e


def _h5_dataset(f: h5py.File, key: str, path: Path, slide_id: str | None,
                required: bool = True) -> h5py.Dataset | None:
    obj = f.get(key)
    if obj is None:
        if not required:
            return None
        raise _err(path, slide_id, f"no {key!r} dataset in the HDF5 file (found: "
                   f"{sorted(f.keys())})")
    if not isinstance(obj, h5py.Dataset):
        raise _err(path, slide_id, f"{key!r} is a group, not a dataset")
    return obj


def _load_pt(path: Path, slide_id: str | None, mmap: bool) -> torch.Tensor:
    """Load a .pt feature tensor without unpickling arbitrary objects."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:
            # legacy (non-zip) files cannot be memory-mapped: load them normally
            if not mmap or zipfile.is_zipfile(path):
                raise
            logger.debug("mmap load of %s failed (%s); loading fully", path, e)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _err(path, slide_id, "the .pt file holds objects other than tensors; refusing to "
                   f"unpickle it (weights_only=True): {_first_line(e)}") from e
    except Exception as e:  # a damaged file fails anywhere in the restricted unpickler
        raise _err(path, slide_id, f"cannot read the .pt file (damaged?): {_first_line(e)}"
                   ) from e
    if isinstance(obj, dict):
        if "features" not in obj:
            raise _err(path, slide_id, f"the .pt dict has no 'features' entry (keys: "
                       f"{sorted(map(str, obj))})")
        obj = obj["features"]
    if not isinstance(obj, torch.Tensor):
        raise _err(path, slide_id, f"the .pt file holds a {type(obj).__name__}, not a tensor")
    if obj.layout != torch.strided:
        raise _err(path, slide_id, f"features must be a dense tensor, got layout {obj.layout}")
    return obj.detach()  # saved from a forward pass with autograd on: no gradient wanted


def _torch_to_np_dtype(dt: torch.dtype) -> np.dtype:
    if dt == torch.bfloat16:  # no numpy equivalent; reported as-is by name
        return np.dtype("float32")
    return torch.empty((), dtype=dt).numpy().dtype


def read_feature_shape(path: str | os.PathLike, *, slide_id: str | None = None
                       ) -> tuple[int, int, np.dtype]:
    """``(N, D, dtype)`` of a feature file from its metadata only (no feature values read).

    ``.pt`` files are memory-mapped, so only the header is touched. Raises :class:`DataError`
    for an unreadable file, a wrong rank, N = 0 or a non-float dtype."""
    path = Path(path)
    if path.suffix == ".pt":
        t = _load_pt(path, slide_id, mmap=True)
        if not t.is_floating_point():
            raise _err(path, slide_id, f"features must be floating point, got dtype {t.dtype}")
        n, d = _check_shape(tuple(t.shape), path, slide_id)
        return n, d, _torch_to_np_dtype(t.dtype)
    with _open_h5(path, slide_id) as f:
        ds = _h5_dataset(f, "features", path, slide_id)
        n, d = _check_shape(ds.shape, path, slide_id)
        _check_float(ds.dtype, path, slide_id)
        return n, d, ds.dtype


def _read_chunked_fast(ds: h5py.Dataset, path: Path) -> np.ndarray | None:
    """Raw read of an unfiltered dataset chunked along rows only; None to fall back."""
    shape, chunks = ds.shape, ds.chunks
    if chunks is None or len(shape) not in (2, 3):
        return None
    rows_axis = len(shape) - 2
    if tuple(chunks[rows_axis + 1:]) != tuple(shape[rows_axis + 1:]) or (
        len(shape) == 3 and (chunks[0] != 1 or shape[0] != 1)
    ):
        return None  # chunks must span whole rows
    dcpl = ds.id.get_create_plist()
    if dcpl.get_nfilters() != 0 or ds.file.id.get_create_plist().get_userblock() != 0:
        return None
    if ds.dtype.kind not in "fiu" or ds.dtype.hasobject:
        return None
    n_rows, c_rows = shape[rows_axis], chunks[rows_axis]
    n_chunks = -(-n_rows // c_rows)
    if n_chunks < _FAST_PATH_MIN_CHUNKS:
        return None
    row_bytes = int(np.prod(shape[rows_axis + 1:])) * ds.dtype.itemsize
    chunk_bytes = c_rows * row_bytes
    starts = np.empty(n_chunks, dtype=np.int64)
    offsets = np.empty(n_chunks, dtype=np.int64)
    count = 0

    def visit(info: Any) -> None:
        nonlocal count
        if count >= n_chunks or info.size != chunk_bytes or info.filter_mask != 0:
            count = n_chunks + 1  # marks "unexpected": fall back
            return
        starts[count] = info.chunk_offset[rows_axis]
        offsets[count] = info.byte_offset
        count += 1

    try:
        ds.id.chunk_iter(visit)
    except Exception:  # noqa: BLE001 - any low-level surprise means "use plain h5py"
        return None
    if count != n_chunks:
        return None  # unallocated or odd chunks
    order = np.argsort(offsets, kind="stable")
    offsets, starts = offsets[order], starts[order]
    if np.any(starts % c_rows) or len(np.unique(starts)) != n_chunks:
        return None
    # coalesce chunks contiguous both in the file and in row order into single reads
    breaks = np.flatnonzero((np.diff(offsets) != chunk_bytes) | (np.diff(starts) != c_rows)) + 1
    run_lo = np.r_[0, breaks]
    run_hi = np.r_[breaks, n_chunks]
    padded_rows = n_chunks * c_rows
    out = np.empty((padded_rows, row_bytes), dtype=np.uint8)
    with open(path, "rb") as fh:
        fd = fh.fileno()
        for lo, hi in zip(run_lo.tolist(), run_hi.tolist()):
            row0 = int(starts[lo])
            buf = out[row0: row0 + (hi - lo) * c_rows].reshape(-1)
            if not _pread_into(fd, buf, int(offsets[lo])):
                return None
    arr = out[:n_rows].view(ds.dtype).reshape((n_rows,) + tuple(shape[rows_axis + 1:]))
    if len(shape) == 3:
        arr = arr.reshape(shape)
    # spot check against h5py (first and last row) before trusting the raw path
    first = ds[0, 0] if len(shape) == 3 else ds[0]
    last = ds[0, -1] if len(shape) == 3 else ds[-1]
    a_first = arr[0, 0] if len(shape) == 3 else arr[0]
    a_last = arr[0, -1] if len(shape) == 3 else arr[-1]
    if not (np.array_equal(first, a_first, equal_nan=True)
            and np.array_equal(last, a_last, equal_nan=True)):
        logger.debug("raw chunk read of %s failed the spot check; using h5py", path)
        return None
    return arr


def _pread_into(fd: int, buf: np.ndarray, offset: int) -> bool:
    """Fill the contiguous uint8 array `buf` from file offset `offset`; False on a short file."""
    view = memoryview(buf)
    done, total = 0, len(view)
    while done < total:
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [view[done:]], offset + done)
        else:  # pragma: no cover - platforms without preadv
            data = os.pread(fd, total - done, offset + done)
            got = len(data)
            view[done: done + got] = data
        if got <= 0:
            return False
        done += got
    return True


def _read_h5_array(ds: h5py.Dataset, path: Path, method: str = "auto") -> np.ndarray:
    """Whole dataset as a numpy array. method: auto | h5py | read_direct (benchmarks)."""
    if method == "auto" and ds.chunks is not None:
        arr = _read_chunked_fast(ds, path)
        if arr is not None:
            return arr
    if method == "h5py":
        return ds[()]
    arr = np.empty(ds.shape, dtype=ds.dtype)
    if arr.size:
        ds.read_direct(arr)
    return arr


def _finite_check(arr: np.ndarray, path: Path, slide_id: str | None) -> None:
    if not np.isfinite(arr).all():
        bad = ~np.isfinite(arr)
        rows = np.flatnonzero(bad.any(axis=1))
        n_nan = int(np.isnan(arr).sum())
        n_inf = int(bad.sum()) - n_nan
        raise _err(path, slide_id, f"features contain {n_nan} NaN and {n_inf} inf values "
                   f"in {len(rows)} patches (first rows: {rows[:5].tolist()})")


def read_features(path: str | os.PathLike, *, slide_id: str | None = None,
                  check_finite: bool = True, h5_method: str = "auto") -> np.ndarray:
    """All patch features of a file as a float32 array of shape ``(N, D)``.

    Raises :class:`DataError` (naming the slide and file) for an unreadable file, a wrong rank,
    N = 0, non-float values, or NaN/inf values (unless ``check_finite=False``)."""
    path = Path(path)
    if path.suffix == ".pt":
        t = _load_pt(path, slide_id, mmap=True)
        if not t.is_floating_point():
            raise _err(path, slide_id, f"features must be floating point, got dtype {t.dtype}")
        n, d = _check_shape(tuple(t.shape), path, slide_id)
        t = t.reshape(n, d)
        if t.dtype == torch.bfloat16:  # no numpy equivalent
            arr = t.to(torch.float32, copy=True).numpy()
        else:  # numpy's conversion is faster than torch's on CPU; copy detaches the mmap
            arr = t.numpy().astype(np.float32, copy=True)
    else:
        with _open_h5(path, slide_id) as f:
            ds = _h5_dataset(f, "features", path, slide_id)
            n, d = _check_shape(ds.shape, path, slide_id)
            _check_float(ds.dtype, path, slide_id)
            try:
                raw = _read_h5_array(ds, path, h5_method)
            except (OSError, ValueError) as e:
                raise _err(path, slide_id, f"cannot read 'features': {e}") from e
        arr = raw.reshape(n, d).astype(np.float32, copy=False)
    if check_finite:
        _finite_check(arr, path, slide_id)
    return np.ascontiguousarray(arr)


def read_features_stored(path: str | os.PathLike, *, slide_id: str | None = None,
                         check_finite: bool = True) -> np.ndarray:
    """All patch features of a file, ``(N, D)``, in the dtype they are stored in.

    float16 stays float16 (half the bytes of :func:`read_features`' float32), float32 and
    float64 stay as they are; bfloat16 ``.pt`` tensors, which numpy cannot hold, come back as
    float32. ``read_features(p)`` equals ``read_features_stored(p).astype(np.float32)`` bit for
    bit. Same checks and errors as :func:`read_features` (the packed store is written with it).
    """
    path = Path(path)
    if path.suffix == ".pt":
        t = _load_pt(path, slide_id, mmap=True)
        if not t.is_floating_point():
            raise _err(path, slide_id, f"features must be floating point, got dtype {t.dtype}")
        n, d = _check_shape(tuple(t.shape), path, slide_id)
        t = t.reshape(n, d)
        # a copy either way: it detaches the result from the memory-mapped file
        arr = (t.to(torch.float32, copy=True) if t.dtype == torch.bfloat16 else t.clone()).numpy()
    else:
        with _open_h5(path, slide_id) as f:
            ds = _h5_dataset(f, "features", path, slide_id)
            n, d = _check_shape(ds.shape, path, slide_id)
            _check_float(ds.dtype, path, slide_id)
            try:
                arr = _read_h5_array(ds, path).reshape(n, d)
            except (OSError, ValueError) as e:
                raise _err(path, slide_id, f"cannot read 'features': {e}") from e
    if check_finite:
        if arr.dtype == np.float16:
            # NaN / inf are the magnitudes >= 0x7C00 (all exponent bits set); this integer
            # test is ~4x faster than np.isfinite on float16
            if arr.size and int((arr.view(np.uint16) & 0x7FFF).max()) >= 0x7C00:
                _finite_check(arr.astype(np.float32), path, slide_id)
        else:
            _finite_check(arr, path, slide_id)
    return np.ascontiguousarray(arr)


def read_coords(path: str | os.PathLike, *, slide_id: str | None = None,
                required: bool = False) -> np.ndarray | None:
    """Patch coordinates ``(N, 2)`` (int64 when integral, else float64), or None if the file
    has none (``.pt`` files never have any); with ``required=True`` a missing ``coords`` is a
    :class:`DataError` naming the slide and file. The row count must match the features."""
    path = Path(path)
    missing = ("has no patch coordinates ('coords' dataset), which graph-based networks "
               "(Patch-GCN) need")
    if path.suffix == ".pt":
        if required:
            raise _err(path, slide_id, "a .pt feature file carries no patch coordinates, which "
                       "graph-based networks (Patch-GCN) need; use the slide's .h5 file")
        return None
    with _open_h5(path, slide_id) as f:
        ds = _h5_dataset(f, "coords", path, slide_id, required=False)
        if ds is None:
            if required:
                raise _err(path, slide_id, missing)
            return None
        n_feat = None
        fds = _h5_dataset(f, "features", path, slide_id, required=False)
        if fds is not None:
            n_feat, _ = _check_shape(fds.shape, path, slide_id)
        if ds.shape is None:
            raise _err(path, slide_id, "coords is an empty dataset (no shape)")
        if ds.dtype.kind not in "iuf":
            raise _err(path, slide_id, f"coords must be numbers, got dtype {ds.dtype}")
        shape = ds.shape[1:] if len(ds.shape) == 3 and ds.shape[0] == 1 else ds.shape
        if len(shape) != 2 or shape[1] != 2:
            raise _err(path, slide_id, f"coords must have shape (N, 2), got {ds.shape}")
        if n_feat is not None and shape[0] != n_feat:
            raise _err(path, slide_id, f"coords has {shape[0]} rows but features has {n_feat}")
        arr = np.asarray(ds[()]).reshape(shape)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    return arr.astype(np.float64)


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.to(torch.float32)
        return x.numpy()
    return np.asarray(x)


def write_features_h5(path: str | os.PathLike, features: Any, coords: Any = None,
                      layout: str = "contiguous") -> Path:
    """Write one slide's features (and optional coords) as HDF5, atomically.

    ``layout="contiguous"``: unchunked datasets. ``layout="trident"``: TRIDENT's layout,
    resizable datasets with one-row chunks (``chunks=(1, D)``). The dtype is kept (float16 or
    float32). Returns the path."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    path = Path(path)
    feats = _as_numpy(features)
    if feats.ndim != 2 or feats.shape[0] == 0 or feats.shape[1] == 0:
        raise ValueError(f"features must be a non-empty (N, D) array, got shape {feats.shape}")
    if feats.dtype.kind != "f":
        raise ValueError(f"features must be floating point, got {feats.dtype}")
    c = None
    if coords is not None:
        c = _as_numpy(coords)
        if c.shape != (feats.shape[0], 2):
            raise ValueError(f"coords must have shape ({feats.shape[0]}, 2), got {c.shape}")
    _n, d = feats.shape
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        if layout == "trident":
            f.create_dataset("features", data=feats, chunks=(1, d), maxshape=(None, d))
            if c is not None:
                f.create_dataset("coords", data=c, chunks=(1, 2), maxshape=(None, 2))
        else:
            f.create_dataset("features", data=feats)
            if c is not None:
                f.create_dataset("coords", data=c)
    return path


def write_features_pt(path: str | os.PathLike, features: Any) -> Path:
    """Write one slide's features as a CLAM-style ``.pt`` tensor, atomically."""
    path = Path(path)
    t = torch.as_tensor(_as_numpy(features)).contiguous()
    if t.ndim != 2 or t.shape[0] == 0:
        raise ValueError(f"features must be a non-empty (N, D) array, got shape {tuple(t.shape)}")
    with atomic_path(path) as tmp:
        torch.save(t, tmp)
    return path


def iter_feature_files(features_dir: str | os.PathLike) -> Iterable[Path]:
    """Every feature file the index sees (one per stem, preferred suffix)."""
    index = FeatureIndex(features_dir)
    for stem in index.stems():
        p = index.find(stem)
        if p is not None:
            yield p
