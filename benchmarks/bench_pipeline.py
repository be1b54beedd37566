"""The data pipeline at realistic sizes (issue 9). Sections run in one process, in order:

* ``read``: reading bags from the packed store vs TRIDENT h5 vs contiguous h5, in bags/s, MB/s
  and as a ratio to a raw sequential read of the same bytes (targets: packed >= 0.8 x raw and
  >= 5 x TRIDENT h5).
* ``epoch``: one ABMIL training epoch through the data pipeline (worker processes reading
  ahead) vs load-only vs compute-only time, for the packed store and the TRIDENT files
  (target: epoch <= 1.15 x max(load, compute)); see :func:`section_epoch`.

    python benchmarks/bench_pipeline.py [--bags 200] [--patches 10000] [--dim 1536]
        [--rounds 3] [--cache cold|warm] [--sections read,epoch] [--tmpdir DIR] [--keep]
        [--json OUT] [--device auto] [--workers N] [--prefetch 2] [--memory-bags 16]
        [--threads N]

    quick run:  python benchmarks/bench_pipeline.py --bags 20 --patches 2000 --rounds 2

Data: ``--bags`` single-slide patients of ``--patches x --dim`` float16 features (with int64
coords), written twice: as TRIDENT writes them (resizable datasets, one-row chunks ``(1, D)``,
grown batch by batch) and as contiguous datasets; then ``steph data pack`` of the TRIDENT
cohort. The default (200 x 10,000 x 1536) writes 3 x 6.1 GB: check ``df -h`` of ``--tmpdir``.

Page cache (``--cache cold``, the default): before every timed pass, each file the candidate is
about to read is dropped from the page cache with ``posix_fadvise(POSIX_FADV_DONTNEED)``
(Linux; no root needed; the pack's memory map is closed first, since mapped pages are not
dropped), and the script checks with ``mincore`` that the pages are gone. On a virtual machine
the host may still cache the disk image, so "cold" means "not in this OS's page cache". With
``--cache warm`` every pass reads from memory (files are read once before timing); the output
says which. Candidates are interleaved (rotated every round) and timed by the median over
``--rounds`` passes; MB/s count the *stored* feature bytes (N x D x 2) for every candidate.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from _epoch import drop_from_page_cache as drop_cache
from _epoch import in_memory, load_pass, train_epoch
from _timing import interleaved, machine_info
from bench_loading import _write_trident_appending

from steph.data.cohort import Cohort
from steph.data.features import read_features_stored, write_features_h5
from steph.data.pack import INDEX_NAME, pack_dir, write_pack
from steph.utils.io import read_json, write_json

# ---------------------------------------------------------------------------------------------
# page cache
# ---------------------------------------------------------------------------------------------


def resident_fraction(path: Path) -> float | None:
    """Fraction of the file's pages in the page cache (``mincore``), None if unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        size = path.stat().st_size
        page = os.sysconf("SC_PAGE_SIZE")
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            vec = ctypes.create_string_buffer((size + page - 1) // page)
            ok = libc.mincore(ctypes.c_void_p(addr), size, vec) == 0
            libc.munmap(ctypes.c_void_p(addr), size)
        finally:
            os.close(fd)
        if not ok:
            return None
        return sum(b & 1 for b in vec.raw) / len(vec.raw)
    except (OSError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    root: Path
    results: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def bag_bytes(self) -> int:
        return self.args.patches * self.args.dim * 2

    def record(self, section: str, name: str, what: str, seconds: float, **extra: Any) -> None:
        n = self.args.bags
        self.results.append({"section": section, "candidate": name, "what": what,
                             "seconds_per_pass": seconds, "bags_per_s": n / seconds,
                             "MB_per_s": n * self.bag_bytes / 1e6 / seconds, **extra})


def build(b: Bench) -> None:
    """Write the TRIDENT and contiguous cohorts and pack the TRIDENT one."""
    a = b.args
    rng = np.random.default_rng(a.seed)
    dirs = {k: b.root / k for k in ("trident", "contiguous")}
    for d in dirs.values():
        (d / "features").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = []
    for i in range(a.bags):
        x = rng.standard_normal((a.patches, a.dim), dtype=np.float32).astype(np.float16)
        coords = np.stack([np.arange(a.patches) * 256, np.zeros(a.patches)], 1).astype(np.int64)
        sid = f"slide-{i:04d}"
        _write_trident_appending(dirs["trident"] / "features" / f"{sid}.h5", x)
        write_features_h5(dirs["contiguous"] / "features" / f"{sid}.h5", x, coords=coords)
        rows.append((f"P{i:04d}", sid, float(100 + i), i % 2))
    labels = pd.DataFrame(rows, columns=["patient_id", "slide_id", "time", "event"])
    for d in dirs.values():
        labels.to_csv(d / "labels.csv", index=False)
    b.notes["write_s"] = time.perf_counter() - t0
    drop_cache(sorted((dirs["trident"] / "features").iterdir()))
    t0 = time.perf_counter()
    res = write_pack(Cohort.load(dirs["trident"], use_pack=False).pack_source())
    b.notes["pack_s"] = time.perf_counter() - t0
    b.notes["pack_bags_per_s"] = a.bags / b.notes["pack_s"]
    b.notes["pack_bytes"] = res.bytes
    print(f"wrote {2 * a.bags} h5 files in {b.notes['write_s']:.1f} s; "
          f"steph data pack (TRIDENT sources, cold cache): {b.notes['pack_s']:.1f} s, "
          f"{b.notes['pack_bags_per_s']:.1f} bags/s")


# ---------------------------------------------------------------------------------------------
# section "read": packed store vs TRIDENT h5 vs contiguous h5 vs a raw sequential read
# ---------------------------------------------------------------------------------------------


def section_read(b: Bench) -> None:
    a = b.args
    tri_dir, con_dir = b.root / "trident", b.root / "contiguous"
    packed = Cohort.load(tri_dir)  # the pack is fresh: bags come from the memory map
    tri = Cohort.load(tri_dir, use_pack=False)
    con = Cohort.load(con_dir, use_pack=False)
    assert packed.pack is not None and tri.pack is None
    store = packed.pack
    pids = packed.patient_ids
    pack_file = pack_dir(tri_dir) / read_json(pack_dir(tri_dir) / INDEX_NAME)["features"]["file"]
    tri_files = [Path(p) for p in tri.slides["path"]]
    con_files = [Path(p) for p in con.slides["path"]]
    header = int(store.features.offset)
    store.close()

    def raw() -> None:
        """The same bytes, one sequential read per bag into a reused buffer: what the disk
        (or the page cache) delivers with no decoding and no allocation."""
        buf = bytearray(b.bag_bytes)
        view = memoryview(buf)
        with open(pack_file, "rb", buffering=0) as fh:
            fh.seek(header)
            for _ in pids:
                got = 0
                while got < len(buf):
                    got += fh.readinto(view[got:])

    def packed_stored() -> None:
        for pid in pids:
            store.read_bag(pid, dtype=None)

    def packed_f32() -> None:
        for pid in pids:
            packed.load_bag(pid)

    def h5py_plain(files: list[Path]) -> Callable[[], None]:
        def run() -> None:
            for p in files:
                with h5py.File(p, "r") as f:
                    f["features"][()]
        return run

    def steph_stored(files: list[Path]) -> Callable[[], None]:
        def run() -> None:
            for p in files:
                read_features_stored(p)
        return run

    def load_bag(cohort: Cohort) -> Callable[[], None]:
        def run() -> None:
            for pid in cohort.patient_ids:
                cohort.load_bag(pid)
        return run

    # name -> (function, what it returns, files it reads)
    cands: dict[str, tuple[Callable[[], None], str, list[Path]]] = {
        "raw sequential read": (raw, "bytes", [pack_file]),
        "packed": (packed_stored, "float16", [pack_file]),
        "packed load_bag": (packed_f32, "float32 tensor", [pack_file]),
        "TRIDENT h5py ds[()]": (h5py_plain(tri_files), "float16", tri_files),
        "TRIDENT read_features_stored": (steph_stored(tri_files), "float16", tri_files),
        "TRIDENT load_bag": (load_bag(tri), "float32 tensor", tri_files),
        "contiguous h5py ds[()]": (h5py_plain(con_files), "float16", con_files),
        "contiguous load_bag": (load_bag(con), "float32 tensor", con_files),
    }
    cold = a.cache == "cold"
    resident: dict[str, float | None] = {}

    def before(name: str) -> None:
        store.close()  # mapped pages are never evicted; bags read earlier are copies
        if cold:
            files = cands[name][2]
            drop_cache(files)
            resident[name] = resident_fraction(files[0])

    if not cold:
        for fn, _, _ in cands.values():  # bring every file into the page cache
            fn()
    med = interleaved({k: v[0] for k, v in cands.items()}, rounds=a.rounds, warmup=0,
                      before=before)
    for name, sec in med.items():
        b.record("read", name, cands[name][1], sec, cache=a.cache,
                 resident_after_drop=resident.get(name))
    if cold:
        left = [v for v in resident.values() if v is not None]
        b.notes["resident_after_drop_max"] = max(left) if left else None

    rows = [r for r in b.results if r["section"] == "read"]
    raw_mb = next(r["MB_per_s"] for r in rows if r["candidate"] == "raw sequential read")
    for r in rows:
        r["x_raw"] = r["MB_per_s"] / raw_mb
    df = pd.DataFrame(rows)
    print(f"\nsection read: {a.bags} bags of {a.patches} x {a.dim} float16 "
          f"({b.bag_bytes / 1e6:.1f} MB each), {a.cache} page cache, median of {a.rounds}")
    if cold:
        print("  page cache dropped before every pass (posix_fadvise DONTNEED); largest "
              f"resident fraction left: {b.notes['resident_after_drop_max']}")
    print(df[["candidate", "what", "bags_per_s", "MB_per_s", "x_raw"]].to_string(
        index=False, float_format=lambda v: f"{v:,.2f}"))
    by = df.set_index("candidate")["MB_per_s"]
    checks = {
        "packed / raw (target >= 0.8)": by["packed"] / by["raw sequential read"],
        "packed / TRIDENT h5py ds[()] (target >= 5)": by["packed"] / by["TRIDENT h5py ds[()]"],
        "packed / TRIDENT read_features_stored": by["packed"] / by["TRIDENT read_features_stored"],
        "packed load_bag / TRIDENT load_bag (float32)":
            by["packed load_bag"] / by["TRIDENT load_bag"],
    }
    b.notes["ratios"] = checks
    for k, v in checks.items():
        print(f"  {k}: {v:.2f}")


# ---------------------------------------------------------------------------------------------
# section "epoch": one ABMIL training epoch through the pipeline vs load-only vs compute-only
# ---------------------------------------------------------------------------------------------


def section_epoch(b: Bench) -> None:
    """One ABMIL training epoch (``steph.training.fit``, 16 bags per step) over every bag,
    through the data pipeline, against the same epoch's two halves measured alone:

    * ``load``: the pipeline without the model: the same BagLoader (workers, prefetch) yields
      every bag, in the epoch's order, on the device in its stored dtype;
    * ``compute``: the same training epoch over bags already in memory (float16 on the host,
      ``--memory-bags`` distinct bags cycled: compute depends on the shape only), read by
      nobody: conversion to float32 on the device, forward, loss, backward, AdamW;
    * ``epoch``: ``fit`` over the cohort with ``--workers`` processes reading ahead (what
      ``steph cv`` does), and ``epoch, 0 workers``: the same read in the training process.

    Target: epoch <= 1.15 x max(load, compute): reading is hidden behind compute (or the other
    way round). Each source (the packed store, the TRIDENT h5 files) gets its own epoch and
    load; with ``--cache cold`` its files are dropped from the page cache before each pass."""
    import torch

    from steph.config import TrainConfig
    from steph.data.dataset import BagDataset
    from steph.data.loader import resolve_workers
    from steph.models import ABMIL
    from steph.survival.bins import TimeBins
    from steph.training.trainer import _epoch_permutation
    from steph.utils.device import device_description, resolve_device

    a = b.args
    device = resolve_device(a.device, option="--device")
    workers = resolve_workers(a.workers)
    tri_dir = b.root / "trident"
    sources = {"packed": Cohort.load(tri_dir), "TRIDENT h5": Cohort.load(tri_dir, use_pack=False)}
    assert sources["packed"].pack is not None
    pack_file = pack_dir(tri_dir) / read_json(pack_dir(tri_dir) / INDEX_NAME)["features"]["file"]
    files = {"packed": [pack_file],
             "TRIDENT h5": [Path(p) for p in sources["TRIDENT h5"].slides["path"]]}
    bins = TimeBins.uniform()
    cfg = TrainConfig(epochs=1, warmup_epochs=0, bags_per_step=min(16, a.bags), eval_every=0,
                      device=str(device), head_init="reference")
    data = {k: BagDataset(c, c.patient_ids, bins) for k, c in sources.items()}
    order = _epoch_permutation(cfg.seed, 0, a.bags)
    order = order[: (a.bags // cfg.bags_per_step) * cfg.bags_per_step]
    kept = len(order)
    runs = b.root / "epoch-runs"

    def model() -> ABMIL:
        torch.manual_seed(0)
        return ABMIL(a.dim, bins.n_bins)

    def train(dataset, n_workers: int) -> Callable[[], object]:
        return train_epoch(dataset, model, cfg, runs, n_workers, a.prefetch)

    cands: dict[str, tuple[Callable[[], object], list[Path]]] = {
        "compute (bags in memory)": (train(in_memory(data["packed"], a.bags, a.memory_bags), 0),
                                     [])}
    for name, dataset in data.items():
        cands[f"load {name}"] = (load_pass(dataset, order, device, workers, a.prefetch),
                                 files[name])
        cands[f"epoch {name}"] = (train(dataset, workers), files[name])
        cands[f"epoch {name}, 0 workers"] = (train(dataset, 0), files[name])

    def before(name: str) -> None:
        sources["packed"].pack.close()
        if a.cache == "cold" and cands[name][1]:
            drop_cache(cands[name][1])

    med = interleaved({k: v[0] for k, v in cands.items()}, rounds=a.rounds, warmup=0,
                      before=before)
    compute = med["compute (bags in memory)"]
    print(f"\nsection epoch: ABMIL, {kept} of {a.bags} bags of {a.patches} x {a.dim} "
          f"({cfg.bags_per_step} per step) on {device_description(device)}, {workers} worker(s), "
          f"prefetch {a.prefetch}, {torch.get_num_threads()} torch thread(s), {a.cache} page "
          f"cache, median of {a.rounds}")
    b.notes["epoch"] = {"device": device_description(device), "workers": workers,
                        "threads": torch.get_num_threads(), "bags_trained": kept}
    for name in cands:
        b.record("epoch", name, "seconds per epoch", med[name], cache=a.cache, device=str(device),
                 workers=0 if name.endswith("0 workers") or name.startswith("compute")
                 else workers)
    for source in data:
        load_s, epoch_s = med[f"load {source}"], med[f"epoch {source}"]
        ratio = epoch_s / max(load_s, compute)
        b.notes["epoch"][source] = {"epoch_s": epoch_s, "load_s": load_s, "compute_s": compute,
                                    "epoch_0_workers_s": med[f"epoch {source}, 0 workers"],
                                    "ratio": ratio}
        print(f"  {source:10s}: epoch {epoch_s:7.2f} s ({workers} workers), 0 workers "
              f"{med[f'epoch {source}, 0 workers']:7.2f} s | load {load_s:7.2f} s, compute "
              f"{compute:7.2f} s -> epoch / max(load, compute) = {ratio:.3f} (target <= 1.15)")


# ---------------------------------------------------------------------------------------------
# Sections. Each is a function of the Bench (data written, results recorded with b.record).
# ---------------------------------------------------------------------------------------------

SECTIONS: dict[str, Callable[[Bench], None]] = {
    "read": section_read,
    "epoch": section_epoch,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bags", type=int, default=200)
    p.add_argument("--patches", type=int, default=10_000, help="patches per bag (N)")
    p.add_argument("--dim", type=int, default=1536, help="feature dimension (D)")
    p.add_argument("--rounds", type=int, default=3, help="median of N passes per candidate")
    p.add_argument("--cache", choices=["cold", "warm"], default="cold")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated, from {list(SECTIONS)}")
    p.add_argument("--tmpdir", type=Path, default=None, help="where to write (default: system "
                   "temp)")
    p.add_argument("--keep", action="store_true", help="keep the written files")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="epoch section: auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--workers", type=int, default=None,
                   help="epoch section: reading processes (default: min(4, CPUs - 1))")
    p.add_argument("--prefetch", type=int, default=2, help="epoch section: bags read ahead per "
                   "worker")
    p.add_argument("--memory-bags", type=int, default=16, help="epoch section: distinct bags "
                   "held in memory for the compute-only epoch")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: "
                   "torch's)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; known: {list(SECTIONS)}")
    logging.basicConfig(level=logging.WARNING)

    need = 3 * args.bags * args.patches * args.dim * 2
    tmp = Path(tempfile.mkdtemp(prefix="steph-pipeline-", dir=args.tmpdir))
    free = shutil.disk_usage(tmp).free
    if need > 0.9 * free:
        shutil.rmtree(tmp)
        p.error(f"needs about {need / 1e9:.1f} GB in {tmp.parent}, {free / 1e9:.1f} GB free")
    b = Bench(args, tmp)
    try:
        build(b)
        for s in sections:
            SECTIONS[s](b)
        if args.json:
            write_json(args.json, {
                "config": {k: (str(v) if isinstance(v, Path) else v)
                           for k, v in vars(args).items()},
                "machine": machine_info(h5py=h5py.__version__,
                                        hdf5=h5py.version.hdf5_version, numpy=np.__version__),
                "notes": b.notes, "results": b.results,
            })
            print(f"wrote {args.json}")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
