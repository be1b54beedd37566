"""Peak memory (process RSS; CUDA max allocated on a GPU) of one training step and one
prediction of ABMIL and of STEPH on the largest real bag (243,906 x 1536, one SARC patient),
each case in a fresh subprocess so peaks do not mix.

    python benchmarks/bench_memory.py [--instances 243906] [--dim 1536] [--threads 1]
        [--chunk-size 65536] [--max-instances 65536] [--cases ...] [--tmpdir DIR] [--json OUT]
        [--device cpu|cuda|cuda:N|auto] [--sources 12] [--top-k 5]

The bag is written once as a float16 HDF5 file (a one-patient cohort) and every case reads it
the way training does (``Cohort.load_bag``: float16 on disk -> float32 tensor), then runs:

* ``load``: nothing more (the bag alone);
* ``train``: one training step (forward, NLL loss, backward, AdamW step) on the whole bag;
* ``train-sampled``: the same through ``BagDataset(max_instances=--max-instances)``, the
  training-only patch sampler;
* ``predict-chunked``: eval-mode prediction, attention pooled in chunks of ``--chunk-size``;
* ``predict-one-pass``: the same with ``chunk_size=0`` (the whole bag at once);
* ``steph-train``, ``steph-predict-chunked``, ``steph-predict-one-pass``: the same for STEPH
  (``--sources`` source task vectors plus the target's, K = ``--top-k``, random task vectors:
  memory does not depend on their values); chunked prediction computes both STEPH's bag
  embedding (the hypernetworks' input) and the merged ABMIL's attention pooling in chunks.

Reported per case: the process's peak RSS (``ru_maxrss``: includes reading the bag, when the
float16 array and its float32 copy coexist), the peak during the step alone (Linux: the peak is
reset through ``/proc/self/clear_refs`` once the bag is in memory), RSS after the imports and
after the bag was read, and the step's wall time. With ``--device cuda`` the bag and the model
are moved to the GPU after reading and ``torch.cuda.max_memory_allocated`` of the step is
reported too (``cuda_step_peak_mb``; the RSS columns then measure the host side).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

CASES = ("load", "train", "train-sampled", "predict-chunked", "predict-one-pass", "steph-train",
         "steph-predict-chunked", "steph-predict-one-pass")
MB = 2**20


def _proc_status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status in bytes (0 where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_now() -> int:
    """Current resident set size in bytes."""
    return _proc_status_bytes("VmRSS")


def vm_hwm() -> int:
    """Peak RSS since the last :func:`reset_peak` (VmHWM), bytes."""
    return _proc_status_bytes("VmHWM")


def reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident set size of this process in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def write_bag(root: Path, n: int, d: int, seed: int = 0, block: int = 16_384) -> Path:
    """A one-patient cohort whose single slide holds an (n, d) float16 bag, written in blocks
    (the parent never holds the whole bag)."""
    cdir = root / "BIG"
    (cdir / "features").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    with h5py.File(cdir / "features" / "slide-0.h5", "w") as f:
        ds = f.create_dataset("features", shape=(n, d), dtype=np.float16)
        for i in range(0, n, block):
            m = min(block, n - i)
            ds[i:i + m] = rng.standard_normal((m, d), dtype=np.float32).astype(np.float16)
    pd.DataFrame([("P0", "slide-0", 1000.0, 1)],
                 columns=["patient_id", "slide_id", "time", "event"]).to_csv(
        cdir / "labels.csv", index=False)
    return cdir


def child(args: argparse.Namespace) -> dict:
    """One case, in this (fresh) process."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from _timing import inference, make_steph, train_step

    from steph.data.cohort import Cohort
    from steph.data.dataset import BagDataset
    from steph.models import ABMIL
    from steph.survival import TimeBins
    from steph.utils.device import resolve_device

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = resolve_device(args.device, option="--device")
    case = args.child
    chunk = 0 if case.endswith("predict-one-pass") else args.chunk_size
    if case.startswith("steph"):
        model = make_steph(args.sources, args.dim, args.top_k, chunk)
        step = case[len("steph-"):]
    else:
        model = ABMIL(args.dim, 32, chunk_size=chunk)
        step = case
    model.to(device)
    cohort = Cohort.load(args.data, use_pack=False)
    pid = cohort.patient_ids[0]
    after_import = rss_now()
    t0 = time.perf_counter()
    if case == "train-sampled":
        ds = BagDataset(cohort, [pid], TimeBins.uniform(), max_instances=args.max_instances)
        x = ds[0]["features"]
    else:
        x = cohort.load_bag(pid)
    x = x.to(device)
    load_s = time.perf_counter() - t0
    after_load = rss_now()
    process_peak_before_step = peak_rss()
    can_reset = reset_peak()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before_step_cuda = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    if step.startswith("train"):
        model.train()
        train_step(model, x, torch.tensor([5]), torch.tensor([1]))()
    elif step.startswith("predict"):
        model.eval()
        inference(model, x)()
    step_s = time.perf_counter() - t0
    step_peak = vm_hwm() if can_reset else None
    row = {"case": case, "instances_in_model": int(x.shape[0]), "chunk_size": chunk,
           "peak_rss_mb": max(peak_rss(), process_peak_before_step, step_peak or 0) / MB,
           "step_peak_rss_mb": None if step_peak is None else step_peak / MB,
           "rss_after_imports_mb": after_import / MB, "rss_after_load_mb": after_load / MB,
           "load_s": load_s, "step_s": step_s, "threads": torch.get_num_threads(),
           "device": str(device)}
    if device.type == "cuda":
        row["cuda_before_step_mb"] = before_step_cuda / MB
        row["cuda_step_peak_mb"] = torch.cuda.max_memory_allocated(device) / MB
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", type=int, default=243_906)
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=65_536)
    p.add_argument("--max-instances", type=int, default=65_536)
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps or auto")
    p.add_argument("--sources", type=int, default=12, help="STEPH cases: source cohorts")
    p.add_argument("--top-k", type=int, default=5, help="STEPH cases: K")
    p.add_argument("--tmpdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", choices=CASES, default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0

    bag_gb = args.instances * args.dim * 2 / 1e9
    tmp = Path(tempfile.mkdtemp(prefix="steph-memory-", dir=args.tmpdir))
    rows = []
    try:
        t0 = time.perf_counter()
        cdir = write_bag(tmp, args.instances, args.dim)
        print(f"bag {args.instances} x {args.dim} float16 ({bag_gb:.2f} GB on disk, "
              f"{2 * bag_gb:.2f} GB as float32) written in {time.perf_counter() - t0:.0f} s; "
              f"{args.threads} thread(s), one fresh process per case")
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
                   MKL_NUM_THREADS=str(args.threads))
        for case in args.cases:
            cmd = [sys.executable, __file__, "--child", case, "--data", str(cdir),
                   "--instances", str(args.instances), "--dim", str(args.dim),
                   "--threads", str(args.threads), "--chunk-size", str(args.chunk_size),
                   "--max-instances", str(args.max_instances), "--device", args.device,
                   "--sources", str(args.sources), "--top-k", str(args.top_k)]
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"{case}: failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
                rows.append({"case": case, "error": proc.returncode})
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            during = row["step_peak_rss_mb"]
            cuda = (f", CUDA peak {row['cuda_step_peak_mb']:,.0f} MB"
                    if "cuda_step_peak_mb" in row else "")
            print(f"  {case:22s} peak RSS {row['peak_rss_mb']:8,.0f} MB, during the step "
                  f"{'n/a' if during is None else f'{during:,.0f}'} MB (after imports "
                  f"{row['rss_after_imports_mb']:,.0f}, after load {row['rss_after_load_mb']:,.0f};"
                  f" step {row['step_s']:.1f} s{cuda})", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    df = pd.DataFrame(rows)
    print()
    print(df.to_string(index=False, float_format=lambda v: f"{v:,.1f}"))
    if args.json:
        sys.path.insert(0, str(Path(__file__).parent))
        from _timing import machine_info

        from steph.utils.io import write_json

        write_json(args.json, {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                       if k not in ("child", "data")},
            "machine": machine_info(),
            "results": rows,
        })
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
