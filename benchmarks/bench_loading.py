"""Bag-loading throughput of the data layer for the feature-file layouts users bring.

    python benchmarks/bench_loading.py [--bags 40] [--patches 10000] [--dim 1536]
                                       [--dtype float16] [--repeats 3] [--json out.json]

Writes ``--bags`` single-slide patients of ``--patches x --dim`` features into a temporary
folder in three layouts: HDF5 contiguous, HDF5 as TRIDENT writes it (resizable, one-row
chunks ``(1, D)``, rows appended in batches) and CLAM ``.pt`` tensors. Then, for each layout:

* ``raw`` strategies: the stored array only (no float32 conversion), to compare ways of
  reading the one-row-chunk layout with h5py: ``ds[()]``, ``read_direct`` into a
  preallocated array, a 64 MiB chunk cache, and steph's chunk-index read (``chunk_iter`` +
  coalesced raw reads, what :func:`steph.data.features.read_features` uses);
* ``read_features``: what the library returns (float32, NaN/inf check);
* ``Cohort.load_bag``: the same through a loaded cohort (path look-up + concatenation),
  and the metadata-only ``Cohort.load`` time.

Throughput is in bags/s and MB/s of *stored* feature bytes (N x D x itemsize), median of
``--repeats`` passes over all bags. Files are freshly written, so reads come from a warm page
cache: this measures CPU-side decoding cost, not disk bandwidth.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from _timing import machine_info  # the script's folder is on sys.path

from steph.data import features as F
from steph.data.cohort import Cohort
from steph.data.features import read_features, write_features_h5, write_features_pt
from steph.utils.io import write_json

LAYOUTS = ("h5-contiguous", "h5-trident", "pt")


def _write_trident_appending(path: Path, x: np.ndarray, batch: int = 512) -> None:
    """The way TRIDENT builds its files: a resizable (1, D)-chunked dataset grown per batch."""
    n, d = x.shape
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("features", shape=(0, d), maxshape=(None, d), chunks=(1, d),
                              dtype=x.dtype)
        cs = f.create_dataset("coords", shape=(0, 2), maxshape=(None, 2), chunks=(1, 2),
                              dtype=np.int64)
        for i in range(0, n, batch):
            b = x[i:i + batch]
            ds.resize(ds.shape[0] + len(b), axis=0)
            ds[-len(b):] = b
            cs.resize(cs.shape[0] + len(b), axis=0)
            cs[-len(b):] = np.stack([np.arange(i, i + len(b)) * 256, np.zeros(len(b))], 1)


def build(root: Path, n_bags: int, n: int, d: int, dtype: str, seed: int) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    dirs = {}
    for layout in LAYOUTS:
        cdir = root / layout
        (cdir / "features").mkdir(parents=True)
        dirs[layout] = cdir
    rows = []
    for i in range(n_bags):
        x = rng.standard_normal((n, d), dtype=np.float32).astype(dtype)
        sid = f"slide-{i:04d}"
        write_features_h5(dirs["h5-contiguous"] / "features" / f"{sid}.h5", x,
                          layout="contiguous")
        _write_trident_appending(dirs["h5-trident"] / "features" / f"{sid}.h5", x)
        write_features_pt(dirs["pt"] / "features" / f"{sid}.pt", x)
        rows.append((f"P{i:04d}", sid, float(100 + i), i % 2))
    labels = pd.DataFrame(rows, columns=["patient_id", "slide_id", "time", "event"])
    for cdir in dirs.values():
        labels.to_csv(cdir / "labels.csv", index=False)
    return dirs


def _files(cdir: Path) -> list[Path]:
    return sorted((cdir / "features").iterdir())


def _time_passes(fn: Callable[[], int], repeats: int) -> tuple[float, int]:
    """Median seconds of one pass and the bytes it returned."""
    times, nbytes = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        nbytes = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), nbytes


def _raw_h5(files: list[Path], how: str) -> Callable[[], int]:
    def run() -> int:
        total = 0
        for p in files:
            kw = {"rdcc_nbytes": 64 * 2**20, "rdcc_nslots": 1_000_003} if how == "cache64" \
                else {}
            with h5py.File(p, "r", **kw) as f:
                ds = f["features"]
                if how in ("h5py", "cache64"):
                    a = ds[()]
                elif how == "read_direct":
                    a = np.empty(ds.shape, ds.dtype)
                    ds.read_direct(a)
                else:  # steph: chunk index + raw reads, h5py fallback
                    a = F._read_h5_array(ds, p, "auto")
            total += a.nbytes
        return total
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bags", type=int, default=40)
    p.add_argument("--patches", type=int, default=10_000, help="patches per bag (N)")
    p.add_argument("--dim", type=int, default=1536, help="feature dimension (D)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--repeats", type=int, default=3, help="median of N passes (default 3)")
    p.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    p.add_argument("--tmpdir", type=Path, default=None,
                   help="where to write the temporary files (default: system temp)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    itemsize = np.dtype(args.dtype).itemsize
    bag_mb = args.patches * args.dim * itemsize / 1e6
    print(f"{args.bags} bags of {args.patches} x {args.dim} {args.dtype} "
          f"({bag_mb:.1f} MB stored each); median of {args.repeats} pass(es); warm page cache")

    tmp = Path(tempfile.mkdtemp(prefix="steph-bench-", dir=args.tmpdir))
    results = []
    try:
        t0 = time.perf_counter()
        dirs = build(tmp, args.bags, args.patches, args.dim, args.dtype, args.seed)
        print(f"wrote {3 * args.bags} files in {time.perf_counter() - t0:.1f} s\n")

        def record(layout: str, method: str, sec: float, nbytes: int, note: str = "") -> None:
            results.append({
                "layout": layout, "method": method, "seconds_per_pass": sec,
                "bags_per_s": args.bags / sec, "MB_per_s": nbytes / 1e6 / sec,
                "ms_per_bag": 1000 * sec / args.bags, "note": note,
            })

        stored = args.bags * bag_mb * 1e6
        for layout in args.layouts:
            files = _files(dirs[layout])
            if layout.startswith("h5"):
                for how in ("h5py", "read_direct", "cache64", "steph"):
                    sec, _ = _time_passes(_raw_h5(files, how), args.repeats)
                    label = {"h5py": "raw ds[()]", "read_direct": "raw read_direct",
                             "cache64": "raw ds[()] + 64 MiB chunk cache",
                             "steph": "raw chunk-index read (steph)"}[how]
                    record(layout, label, sec, int(stored))

            def via_read_features(files: list[Path] = files) -> int:
                return sum(read_features(f).nbytes for f in files)
            sec, _ = _time_passes(via_read_features, args.repeats)
            record(layout, "read_features (float32 + finite check)", sec, int(stored))

            if layout == "h5-trident":
                def plain(files: list[Path] = files) -> int:
                    return sum(read_features(f, h5_method="read_direct").nbytes for f in files)
                sec, _ = _time_passes(plain, args.repeats)
                record(layout, "read_features, plain h5py (before)", sec, int(stored))

            t0 = time.perf_counter()
            cohort = Cohort.load(dirs[layout])
            load_s = time.perf_counter() - t0

            def via_cohort(cohort: Cohort = cohort) -> int:
                return sum(cohort.load_bag(pid).numel() for pid in cohort.patient_ids)
            sec, _ = _time_passes(via_cohort, args.repeats)
            record(layout, "Cohort.load_bag", sec, int(stored),
                   note=f"Cohort.load {1000 * load_s:.0f} ms")

        df = pd.DataFrame(results)
        with pd.option_context("display.width", 160, "display.max_colwidth", 60):
            print(df[["layout", "method", "bags_per_s", "MB_per_s", "ms_per_bag", "note"]]
                  .to_string(index=False, float_format=lambda v: f"{v:,.1f}"))
        tri = df[df.layout == "h5-trident"].set_index("method")["ms_per_bag"]
        if {"raw ds[()]", "raw chunk-index read (steph)"} <= set(tri.index):
            print(f"\none-row-chunk layout, raw read: h5py {tri['raw ds[()]']:.1f} ms/bag -> "
                  f"chunk-index {tri['raw chunk-index read (steph)']:.1f} ms/bag")
        if {"read_features, plain h5py (before)",
                "read_features (float32 + finite check)"} <= set(tri.index):
            print(f"one-row-chunk layout, read_features: before "
                  f"{tri['read_features, plain h5py (before)']:.1f} ms/bag -> after "
                  f"{tri['read_features (float32 + finite check)']:.1f} ms/bag")
        if args.json:
            write_json(args.json, {
                "config": {"bags": args.bags, "patches": args.patches, "dim": args.dim,
                           "dtype": args.dtype, "repeats": args.repeats},
                "machine": machine_info(h5py=h5py.__version__, hdf5=h5py.version.hdf5_version),
                "results": results,
            })
            print(f"wrote {args.json}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
