"""The packed feature store: every bag of a cohort in one memory-mapped file.

``steph data pack`` (or :func:`write_pack`) writes, per cohort::

    DATA/<cohort>/.steph-pack/index.json            written last: the only thing a loader trusts
    DATA/<cohort>/.steph-pack/features-<tag>.npy    (rows, D) little-endian float16 or float32
    DATA/<cohort>/.steph-pack/coords-<tag>.npy      (rows, 2) float64, when any slide has coords

Both data files are plain ``.npy`` arrays (``np.load(path, mmap_mode="r")`` opens them). Rows
follow the cohort's concatenation order: patients sorted by id, each patient's slides in
label-table order, so a patient's bag is one contiguous slice. ``index.json`` holds the format
version, the feature dimension and dtype, ``patients`` (patient id -> ``[offset, length]`` in
rows) and ``slides`` in concatenation order, each with its patient, source path (relative to
the cohort folder), source size and modification time (ns), row offset, patch count, stored
dtype and coordinate kind (``int64``, ``float64`` or null for a slide without coords). Coords
rows line up with feature rows, so the per-slide offsets keep a patient's slides apart.

**dtype.** A cohort whose feature files are all float16 (what TRIDENT and CLAM write for UNI2-h)
is packed as float16. If any slide is stored in another dtype (float32, float64, bfloat16) the
whole pack is float32: :meth:`Cohort.load_bag` returns float32, the float16 -> float32 and
bfloat16 -> float32 conversions are exact and float64 -> float32 is the very cast
:func:`~steph.data.features.read_features` applies, so a bag read from any pack is bit-identical
to the same bag read from its source files. A pack never rounds values.

**Freshness.** :meth:`Cohort.load` uses a pack only if it is fresh: same format version and
feature dimension, exactly the cohort's slides in the same order (a slide added to or removed
from the label table, or one now skipped as bad, makes it stale), and every source file with
the size and modification time it had when packed (one ``stat`` per slide; nothing is read).
A stale pack is ignored with a WARNING naming the cohort and the first changed file; ``steph data
pack`` again refreshes it. A modification time only resolves changes as finely as the file
system stores it (a rewrite with the same size within that resolution goes unnoticed).

**Atomicity.** Data files are written under temporary names, fsynced and renamed; the index is
written (atomically) last, so an interrupted pack leaves at most unreferenced files, which no
loader opens and the next pack deletes. A previous pack stays usable until the new index
replaces it. One writer per cohort at a time (an advisory lock on ``.steph-pack/.lock``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from steph.data.features import read_coords, read_features_stored
from steph.errors import DataError
from steph.utils.io import AtomicFile, fsync_dir, write_json

logger = logging.getLogger("steph.data.pack")

PACK_DIRNAME = ".steph-pack"
INDEX_NAME = "index.json"
FORMAT = "steph-pack"
FORMAT_VERSION = 1
_LOCK_NAME = ".lock"
_DATA_PREFIXES = ("features-", "coords-")
_COORDS_DTYPE = np.dtype("<f8")  # integer coords are exact in float64 (|x| < 2**53)


def pack_dir(cohort_root: str | os.PathLike) -> Path:
    """The pack folder of a cohort folder."""
    return Path(cohort_root) / PACK_DIRNAME


def pack_dtype(dtypes: Any) -> np.dtype:
    """Little-endian float16 if every source dtype is float16, else float32 (never lossy)."""
    names = {str(np.dtype(d)) for d in dtypes}
    return np.dtype("<f2") if names == {"float16"} else np.dtype("<f4")


@dataclass(frozen=True)
class SlideRecord:
    slide_id: str
    patient_id: str
    path: Path  # the feature file
    n_patches: int
    dtype: str  # the stored dtype of its features


@dataclass(frozen=True)
class PackSource:
    """What a pack is made of: one cohort's slides in the order its bags concatenate them
    (patients sorted by id, each patient's slides in label-table order); a
    :class:`~steph.data.cohort.Cohort` gives it with ``pack_source()``."""

    name: str
    root: Path  # the cohort folder
    feature_dim: int
    slides: tuple[SlideRecord, ...]


def _slide_plan(source: PackSource) -> list[tuple[str, str, Path]]:
    """(slide id, patient id, path) in concatenation order."""
    return [(s.slide_id, s.patient_id, s.path) for s in source.slides]


def _rel(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:  # a slide outside the cohort folder: keep it absolute
        return Path(path).as_posix()


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


class PackedStore:
    """A fresh pack of one cohort: bags and coords read from memory-mapped ``.npy`` files.

    The memory maps are opened on first use and not pickled (a copy sent to a worker process
    reopens them), so holding a store costs nothing until bags are read."""

    def __init__(self, folder: Path, index: dict[str, Any]):
        self.folder = Path(folder)
        self.index = index
        self.cohort = str(index["cohort"])
        self.dtype = np.dtype(index["dtype"])
        self.feature_dim = int(index["feature_dim"])
        self.rows = int(index["rows"])
        self._patients = {p: (int(o), int(n)) for p, (o, n) in index["patients"].items()}
        self._slides: dict[str, list[dict[str, Any]]] = {}
        for s in index["slides"]:
            self._slides.setdefault(s["patient_id"], []).append(s)
        self._features: np.ndarray | None = None
        self._coords: np.ndarray | None = None

    def __repr__(self) -> str:
        return (f"PackedStore({self.cohort!r}, {self.folder}, {len(self._patients)} patients, "
                f"{self.rows} rows, {self.dtype.name})")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_features"] = state["_coords"] = None
        return state

    def _open(self, entry: dict[str, Any], shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
        path = self.folder / entry["file"]
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DataError(f"cohort {self.cohort!r}: cannot open the pack file {path}: {e} "
                            "(run `steph data pack` again)") from e
        if arr.shape != shape or arr.dtype != dtype:
            raise DataError(f"cohort {self.cohort!r}: the pack file {path} holds "
                            f"{arr.dtype}{arr.shape}, its index says {dtype}{shape} "
                            "(run `steph data pack` again)")
        return arr

    @property
    def features(self) -> np.ndarray:
        """The whole packed array ``(rows, D)`` (a read-only memory map)."""
        if self._features is None:
            self._features = self._open(self.index["features"], (self.rows, self.feature_dim),
                                        self.dtype)
        return self._features

    @property
    def coords(self) -> np.ndarray | None:
        """All packed coords ``(rows, 2)`` float64 (a read-only memory map), or None."""
        entry = self.index.get("coords")
        if entry is not None and self._coords is None:
            self._coords = self._open(entry, (self.rows, 2), _COORDS_DTYPE)
        return self._coords

    def close(self) -> None:
        """Release the memory maps (bags already read stay valid); reopened on next use."""
        self._features = self._coords = None

    def verify(self) -> None:
        """Open the data files and check their ``.npy`` headers against the index."""
        _ = self.features, self.coords

    def span(self, patient_id: str) -> tuple[int, int]:
        """``(offset, length)`` of the patient's rows."""
        try:
            return self._patients[patient_id]
        except KeyError:
            raise DataError(f"cohort {self.cohort!r}: patient {patient_id!r} is not in the "
                            f"pack {self.folder}") from None

    def read_bag(self, patient_id: str, dtype: Any = np.float32) -> np.ndarray:
        """The patient's bag ``(N, D)`` as a new array of `dtype` (float32: exactly what the
        source files give; ``None``: the stored dtype)."""
        off, n = self.span(patient_id)
        rows = self.features[off:off + n]
        return rows.astype(self.dtype if dtype is None else dtype)  # astype always copies

    def read_coords(self, patient_id: str) -> list[np.ndarray | None]:
        """The coords ``(n_i, 2)`` of each of the patient's slides, in concatenation order
        (int64 or float64 as :func:`~steph.data.features.read_coords` gives them, None for a
        slide without coords)."""
        self.span(patient_id)  # unknown patient: DataError
        coords = self.coords
        out: list[np.ndarray | None] = []
        for s in self._slides[patient_id]:
            if s["coords"] is None or coords is None:
                out.append(None)
            else:
                block = coords[s["offset"]: s["offset"] + s["n_patches"]]
                out.append(block.astype(np.dtype(s["coords"])))
        return out


def _read_index(folder: Path) -> dict[str, Any] | None:
    path = folder / INDEX_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def check_pack(cohort: PackSource) -> tuple[PackedStore | None, str | None]:
    """``(store, None)`` if the cohort's pack is fresh, ``(None, why)`` if it is stale or
    unreadable, ``(None, None)`` if there is none. Only stats files (and reads the index and the
    ``.npy`` headers of the pack)."""
    folder = pack_dir(cohort.root)
    try:
        index = _read_index(folder)
    except (OSError, ValueError) as e:
        return None, f"its index {folder / INDEX_NAME} cannot be read ({e})"
    if index is None:
        return None, None
    try:
        why = _stale_reason(index, cohort, folder)
        if why is not None:
            return None, why
        store = PackedStore(folder, index)
        store.verify()
    except (KeyError, TypeError, ValueError, DataError) as e:
        return None, f"it is unreadable ({e})"
    return store, None


def _stale_reason(index: dict[str, Any], cohort: PackSource, folder: Path) -> str | None:
    if index.get("format") != FORMAT or index.get("version") != FORMAT_VERSION:
        return (f"it was written in format {index.get('format')!r} version "
                f"{index.get('version')!r}, this steph reads {FORMAT!r} version {FORMAT_VERSION}")
    if int(index["feature_dim"]) != cohort.feature_dim:
        return (f"it holds {index['feature_dim']}-d features, the cohort has "
                f"{cohort.feature_dim}-d")
    packed = [(s["slide_id"], s["patient_id"], s["path"]) for s in index["slides"]]
    now = [(sid, pid, _rel(path, cohort.root)) for sid, pid, path in _slide_plan(cohort)]
    if packed != now:
        was, new = set(packed), set(now)
        for sid, pid, path in now:
            if (sid, pid, path) not in was:
                return f"slide {sid!r} of patient {pid!r} ({path}) is not in it"
        for sid, pid, path in packed:
            if (sid, pid, path) not in new:
                return f"slide {sid!r} of patient {pid!r} ({path}) is no longer in the cohort"
        return "the order of the slides changed in the label table"
    for s in index["slides"]:
        path = Path(s["path"])
        path = path if path.is_absolute() else cohort.root / path
        try:
            st = os.stat(path)
        except OSError:
            return f"{path} was deleted"
        if st.st_size != s["size"] or st.st_mtime_ns != s["mtime_ns"]:
            return f"{path} changed since packing"
    for key in ("features", "coords"):
        entry = index.get(key)
        if entry is None:
            continue
        try:
            size = os.stat(folder / entry["file"]).st_size
        except OSError:
            return f"its data file {folder / entry['file']} is missing"
        if size != entry["bytes"]:
            return f"its data file {folder / entry['file']} has {size} bytes, not {entry['bytes']}"
    return None


def attach_pack(cohort: PackSource) -> PackedStore | None:
    """The cohort's pack when fresh (INFO once: the loader reads from it), else None (WARNING
    when a pack exists but is stale or unreadable)."""
    store, why = check_pack(cohort)
    folder = pack_dir(cohort.root)
    if store is not None:
        logger.info("cohort %s: reading features from the pack %s (%d rows, %s)", cohort.name,
                    folder, store.rows, store.dtype.name)
    elif why is not None:
        logger.warning("cohort %s: the feature pack %s is stale: %s; reading the source files "
                       "(run `steph data pack --data %s --cohorts %s` to refresh it)",
                       cohort.name, folder, why, cohort.root.parent, cohort.name)
    return store


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


@dataclass
class PackResult:
    cohort: str
    folder: Path
    written: bool  # False: the pack was already fresh
    rows: int
    slides: int
    dtype: str
    bytes: int
    seconds: float


@contextlib.contextmanager
def _writer_lock(folder: Path, cohort: str) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no advisory locks (Windows)
        yield
        return
    with open(folder / _LOCK_NAME, "a") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DataError(f"cohort {cohort!r}: another `steph data pack` is writing "
                            f"{folder}") from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _remove_unreferenced(folder: Path, index: dict[str, Any] | None) -> None:
    """Delete leftovers of earlier (interrupted or replaced) packs: temp files and data files
    the index does not name. Called only while holding the writer lock."""
    keep = set()
    if index is not None:
        keep = {index[k]["file"] for k in ("features", "coords") if index.get(k)}
    for p in folder.iterdir():
        name = p.name
        leftover = name.endswith(".tmp") or (name.startswith(_DATA_PREFIXES)
                                              and name not in keep)
        if leftover and p.is_file():
            p.unlink(missing_ok=True)


class _NpyWriter:
    """Sequential writer of one ``.npy`` array, written atomically (utils.io.AtomicFile)."""

    def __init__(self, folder: Path, final: str, shape: tuple[int, int], dtype: np.dtype):
        self.final = folder / final
        self.dtype, self.shape = dtype, shape
        self.out = AtomicFile(self.final)
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": dtype.str, "fortran_order": False, "shape": shape})
        self.out.write(header.getvalue())
        self.header = self.out.tell()
        self.rows = 0

    def write(self, arr: np.ndarray) -> None:
        block = np.ascontiguousarray(arr, dtype=self.dtype)
        self.out.write(memoryview(block).cast("B"))
        self.rows += block.shape[0]

    def finish(self) -> int:
        expected = self.header + self.shape[0] * self.shape[1] * self.dtype.itemsize
        if self.rows != self.shape[0] or self.out.tell() != expected:  # pragma: no cover - a bug
            raise RuntimeError(f"{self.final}: wrote {self.rows} rows / {self.out.tell()} bytes, "
                               f"expected {self.shape[0]} / {expected}")
        return self.out.commit()

    def discard(self) -> None:
        self.out.discard()


def write_pack(cohort: PackSource, *, coords: bool = True, force: bool = False) -> PackResult:
    """Pack the cohort's feature files (and coords) unless its pack is already fresh.

    Raises :class:`DataError` for a slide that cannot be read (naming it), a file that changes
    while it is packed, too little free disk space, or a concurrent pack of the same cohort."""
    t0 = time.perf_counter()
    folder = pack_dir(cohort.root)
    try:
        folder.mkdir(exist_ok=True)
    except OSError as e:
        raise DataError(f"cohort {cohort.name!r}: cannot create the pack folder {folder}: "
                        f"{e}") from e
    with _writer_lock(folder, cohort.name):
        if not force:
            store, _ = check_pack(cohort)
            if store is not None:
                return PackResult(cohort.name, folder, False, store.rows, len(store.index["slides"]),
                                  store.dtype.name, int(store.index["features"]["bytes"]),
                                  time.perf_counter() - t0)
        _remove_unreferenced(folder, _safe_index(folder))
        index = _write_data(cohort, folder, coords)
        write_json(folder / INDEX_NAME, index)  # last: from here on loaders use the new pack
        _remove_unreferenced(folder, index)
    nbytes = index["features"]["bytes"] + (index["coords"]["bytes"] if index["coords"] else 0)
    logger.info("cohort %s: packed %d slide(s), %d rows (%s, %.1f MB) into %s", cohort.name,
                len(index["slides"]), index["rows"], index["dtype"], nbytes / 1e6, folder)
    return PackResult(cohort.name, folder, True, index["rows"], len(index["slides"]),
                      index["dtype"], nbytes, time.perf_counter() - t0)


def _safe_index(folder: Path) -> dict[str, Any] | None:
    try:
        return _read_index(folder)
    except (OSError, ValueError):
        return None


def _write_data(cohort: PackSource, folder: Path, coords: bool) -> dict[str, Any]:
    """Write the data files (fsynced, renamed to their final names); return the index."""
    plan = _slide_plan(cohort)
    n_of = {(s.patient_id, s.slide_id): int(s.n_patches) for s in cohort.slides}
    rows = sum(n_of[pid, sid] for sid, pid, _ in plan)
    dim = int(cohort.feature_dim)
    dtype = pack_dtype([s.dtype for s in cohort.slides])
    need = rows * dim * dtype.itemsize + (rows * 2 * _COORDS_DTYPE.itemsize if coords else 0)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise DataError(f"cohort {cohort.name!r}: packing needs {need / 1e9:.2f} GB, only "
                        f"{free / 1e9:.2f} GB free on {folder}")
    tag = uuid.uuid4().hex[:12]
    feats = _NpyWriter(folder, f"features-{tag}.npy", (rows, dim), dtype)
    cw = _NpyWriter(folder, f"coords-{tag}.npy", (rows, 2), _COORDS_DTYPE) if coords else None
    slides: list[dict[str, Any]] = []
    patients: dict[str, list[int]] = {}
    try:
        offset = 0
        for sid, pid, path in plan:
            where = f"cohort {cohort.name!r}, patient {pid!r}"
            try:
                before = os.stat(path)
                arr = read_features_stored(path, slide_id=sid)
                c = read_coords(path, slide_id=sid) if cw is not None else None
                after = os.stat(path)
            except OSError as e:
                raise DataError(f"{where}: slide {sid!r}: {e}") from e
            except DataError as e:
                raise DataError(f"{where}: {e}") from e
            if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or (
                    arr.shape != (n_of[pid, sid], dim)):
                raise DataError(f"{where}: slide {sid!r} ({path}) changed while it was packed "
                                "(or since the cohort was loaded); pack again")
            feats.write(arr)
            kind = None
            if cw is not None:
                kind = None if c is None else ("int64" if c.dtype.kind in "iu" else "float64")
                if kind == "int64" and c.size and int(np.abs(c).max()) > 2**53:
                    raise DataError(f"{where}: slide {sid!r} ({path}): coords beyond 2**53 "
                                    "cannot be packed exactly (pack with --no-coords)")
                cw.write(np.zeros((len(arr), 2)) if c is None else c)
            slides.append({"slide_id": sid, "patient_id": pid, "path": _rel(path, cohort.root),
                           "size": after.st_size, "mtime_ns": after.st_mtime_ns,
                           "offset": offset, "n_patches": len(arr), "dtype": str(arr.dtype),
                           "coords": kind})
            start, length = patients.get(pid, (offset, 0))
            patients[pid] = [start, length + len(arr)]
            offset += len(arr)
        f_bytes = feats.finish()
        has_coords = cw is not None and any(s["coords"] for s in slides)
        c_bytes = cw.finish() if has_coords else None
        if cw is not None and not has_coords:
            cw.discard()
    except BaseException:
        feats.discard()
        if cw is not None:
            cw.discard()
        raise
    fsync_dir(folder)
    return {
        "format": FORMAT, "version": FORMAT_VERSION, "cohort": cohort.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "feature_dim": dim, "dtype": dtype.name, "rows": rows,
        "features": {"file": feats.final.name, "bytes": f_bytes},
        "coords": {"file": cw.final.name, "bytes": c_bytes} if has_coords else None,
        "patients": patients,
        "slides": slides,
    }
