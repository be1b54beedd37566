"""steph on a GPU (issue 9), in one run, written to ``--out`` as bench_gpu.json and
bench_gpu.md. Sections (``--sections``, default all):

* ``step``: one training step (forward, loss, backward, AdamW) and one prediction of ABMIL and
  of STEPH (m = 12 sources, K = 5) on a 10,000 x 1536 bag, in every precision of
  ``--precisions`` (default fp32,bf16), interleaved, median of ``--rounds``: times, STEPH / ABMIL
  ratios, fp32 / bf16 speed-ups, CUDA peak memory of one call.
* ``epoch``: one training epoch over 800 bags of 10,000 x 1536 (the size of BRCA's training
  split; the paper reports about 78-80 s per epoch for the merging methods on RTX 3090s) through
  steph's trainer and data pipeline (``--workers`` processes reading a packed store), for ABMIL
  and STEPH in each precision, with the GPU's utilisation sampled during the epoch (NVML via
  ``torch.cuda.utilization``, else ``nvidia-smi``); also the pipeline's reading alone and an
  ABMIL epoch over bags held in memory, so that epoch / max(load, compute) can be read off.
  The bags are synthetic float16, written to ``--tmpdir`` as ``--distinct-bags`` HDF5 files
  (the other slides are hard links to them, so the sources take 100 x 30.7 MB) and packed with
  ``steph data pack`` (the pack holds all 800 bags: 24.6 GB); ``--cache cold`` (default) drops
  the pack from the page cache before each epoch.
* ``cindex``: the test C-index of ABMIL and STEPH on the ``transfer`` synthetic preset (5-fold
  cross-validation of TARGET, steph.gamma = 0.005 as in the README) in each precision.

    python benchmarks/bench_gpu.py --device cuda --out gpu-results           # all sections
    python benchmarks/bench_gpu.py --device cuda --out gpu-results --sections step,epoch
    python benchmarks/bench_gpu.py --device cpu --small --out /tmp/smoke      # smoke test, CPU

``--small`` shrinks everything (200 x 16 bags, 8 bags per epoch, a 2-cohort preset, one fold,
one epoch, 1 CPU thread) so that the script runs in seconds anywhere; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _epoch import (
    UtilizationSampler,
    drop_from_page_cache,
    in_memory,
    load_pass,
    timed,
    train_epoch,
)
from _timing import (
    add_device_argument,
    inference,
    interleaved,
    machine_info,
    make_steph,
    markdown_table,
    synchronize,
    train_step,
)

from steph.utils.device import check_precision, device_description, resolve_device
from steph.utils.io import write_json, write_text

SECTIONS = ("step", "epoch", "cindex")
FULL = {"instances": 10_000, "dim": 1536, "rounds": 7, "bags": 800, "distinct_bags": 100,
        "sources": 12, "top_k": 5, "folds": "0-4", "epochs": 20, "preset": "transfer"}
SMALL = {"instances": 200, "dim": 16, "rounds": 1, "bags": 8, "distinct_bags": 2,
         "sources": 3, "top_k": 2, "folds": "0", "epochs": 1, "preset": "small"}
MB = 2**20


def _abmil(dim: int):
    from steph.models import ABMIL

    torch.manual_seed(0)
    return ABMIL(dim, 32)


def _peak_mb(fn, device) -> float | None:
    """CUDA memory high-water mark of one call of ``fn`` (None off CUDA)."""
    if device.type != "cuda":
        fn()
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return torch.cuda.max_memory_allocated(device) / MB


# -- step ---------------------------------------------------------------------------------------

def section_step(r: dict[str, Any]) -> None:
    s, device = r["sizes"], r["device"]
    x = torch.randn(s["instances"], s["dim"], device=device)
    b, e = torch.tensor([5]), torch.tensor([1])
    models = {"ABMIL": _abmil(s["dim"]).to(device),
              "STEPH": make_steph(s["sources"], s["dim"], s["top_k"]).to(device)}
    train, infer = {}, {}
    for p, dtype in r["precisions"].items():
        for name, model in models.items():
            train[(name, p)] = train_step(model, x, b, e, dtype)
            infer[(name, p)] = inference(model, x, dtype)
    rows = []
    for kind, fns in (("train step", train), ("inference", infer)):
        for m in models.values():
            m.train(kind == "train step")
        peaks = {k: _peak_mb(fn, device) for k, fn in fns.items()}  # also warms up
        med = interleaved({f"{k[0]} {k[1]}": fn for k, fn in fns.items()}, rounds=s["rounds"],
                          warmup=1)
        for (name, p) in fns:
            rows.append({"what": kind, "model": name, "precision": p,
                         "ms": med[f"{name} {p}"] * 1e3, "cuda_peak_mb": peaks[(name, p)]})
    df = pd.DataFrame(rows)
    ms = df.set_index(["what", "model", "precision"])["ms"]
    ratios = {}
    for kind in ("train step", "inference"):
        for p in r["precisions"]:
            ratios[f"{kind} STEPH / ABMIL, {p}"] = ms[(kind, "STEPH", p)] / ms[(kind, "ABMIL", p)]
        for name in models:
            for p in r["precisions"]:
                if p != "fp32" and "fp32" in r["precisions"]:
                    ratios[f"{kind} {name} fp32 / {p} (speed-up)"] = (
                        ms[(kind, name, "fp32")] / ms[(kind, name, p)])
    r["results"]["step"] = {"rows": rows, "ratios": ratios,
                            "bag": [s["instances"], s["dim"]], "sources": s["sources"],
                            "top_k": s["top_k"]}
    r["markdown"].append(
        f"## Training step and inference, {s['instances']:,} x {s['dim']} bag "
        f"(STEPH: m = {s['sources']}, K = {s['top_k']}), median of {s['rounds']}\n\n"
        + markdown_table(rows) + "\n\n"
        + "\n".join(f"- {k}: **{v:.2f}**" for k, v in ratios.items()) + "\n")


# -- epoch --------------------------------------------------------------------------------------

def write_epoch_cohort(root: Path, bags: int, distinct: int, n: int, d: int, seed: int = 0) -> Path:
    """``bags`` one-slide patients of (n, d) float16 features: ``distinct`` real files, the
    other slides hard links to them (symlink copies where hard links are refused)."""
    from steph.data.features import write_features_h5

    cdir = root / "EPOCH"
    fdir = cdir / "features"
    fdir.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(distinct):
        x = rng.standard_normal((n, d), dtype=np.float32).astype(np.float16)
        write_features_h5(fdir / f"slide-{i:04d}.h5", x)
    for i in range(distinct, bags):
        src, dst = fdir / f"slide-{i % distinct:04d}.h5", fdir / f"slide-{i:04d}.h5"
        try:
            dst.hardlink_to(src)
        except OSError:
            shutil.copyfile(src, dst)
    pd.DataFrame({"patient_id": [f"P{i:04d}" for i in range(bags)],
                  "slide_id": [f"slide-{i:04d}" for i in range(bags)],
                  "time": rng.uniform(30, 4000, bags).round(1),
                  "event": (rng.random(bags) < 0.4).astype(int)}).to_csv(cdir / "labels.csv",
                                                                        index=False)
    return cdir


def section_epoch(r: dict[str, Any]) -> None:
    from steph.config import TrainConfig
    from steph.data.cohort import Cohort
    from steph.data.dataset import BagDataset
    from steph.data.loader import resolve_workers
    from steph.data.pack import write_pack
    from steph.survival.bins import TimeBins
    from steph.training.trainer import _epoch_permutation

    s, device, a = r["sizes"], r["device"], r["args"]
    bag_bytes = s["instances"] * s["dim"] * 2
    need = (s["bags"] + s["distinct_bags"]) * bag_bytes
    free = shutil.disk_usage(r["tmp"]).free
    if need > 0.9 * free:
        raise SystemExit(f"epoch section: needs {need / 1e9:.1f} GB in {r['tmp']}, "
                         f"{free / 1e9:.1f} GB free (use --tmpdir)")
    t_write, cdir = timed(lambda: write_epoch_cohort(r["tmp"], s["bags"], s["distinct_bags"],
                                                     s["instances"], s["dim"]))
    t_pack, res = timed(lambda: write_pack(Cohort.load(cdir, use_pack=False).pack_source(), coords=False))
    cohort = Cohort.load(cdir)
    assert cohort.pack is not None
    pack_file = res.folder / next(p.name for p in res.folder.glob("features-*.npy"))
    bins = TimeBins.uniform()
    ds = BagDataset(cohort, cohort.patient_ids, bins)
    workers = resolve_workers(a.workers)
    base = {"epochs": 1, "warmup_epochs": 0, "bags_per_step": min(16, s["bags"]),
            "eval_every": 0, "device": str(device), "head_init": "reference"}
    order = _epoch_permutation(0, 0, s["bags"])
    makers = {"ABMIL": lambda: _abmil(s["dim"]),
              "STEPH": lambda: make_steph(s["sources"], s["dim"], s["top_k"])}
    runs = r["tmp"] / "runs"
    rows = []

    def measure(name: str, fn, precision: str | None = None) -> None:
        cohort.pack.close()
        if a.cache == "cold":
            drop_from_page_cache([pack_file])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with UtilizationSampler(device) as util:
            seconds, out = timed(fn)
        row = {"what": name, "precision": precision, "seconds": seconds,
               "bags_per_s": s["bags"] / seconds,
               "cuda_peak_mb": (torch.cuda.max_memory_allocated(device) / MB
                                if device.type == "cuda" else None),
               **{f"gpu_util_{k}": v for k, v in util.summary().items()}}
        if isinstance(out, dict) and "seconds" in out:
            row["epoch_seconds_logged"] = out["seconds"]
        rows.append(row)
        print(f"  {name:36s} {seconds:8.1f} s, {row['bags_per_s']:7.1f} bags/s, GPU busy "
              f"{row.get('gpu_util_mean', float('nan')):5.1f} % (mean)", flush=True)

    for p, dtype in r["precisions"].items():  # warm-up: CUDA context, kernels, autotuning
        for make in makers.values():
            x = torch.randn(s["instances"], s["dim"], device=device)
            train_step(make().to(device), x, torch.tensor([5]), torch.tensor([1]), dtype)()
    print(f"epoch section: {s['bags']} bags of {s['instances']} x {s['dim']} float16 written in "
          f"{t_write:.0f} s, packed in {t_pack:.0f} s; {workers} worker(s), {a.cache} cache")
    measure("load only (pipeline, no model)", load_pass(ds, order, device, workers, a.prefetch))
    cfg32 = TrainConfig(**base)
    held = in_memory(ds, s["bags"], min(16, s["bags"]))
    measure("compute only ABMIL (bags in memory)",
            train_epoch(held, makers["ABMIL"], cfg32, runs, 0), "fp32")
    for p in r["precisions"]:
        cfg = TrainConfig(**base, precision=p)
        for name, make in makers.items():
            measure(f"epoch {name}", train_epoch(ds, make, cfg, runs, workers, a.prefetch), p)
    sec = {(row["what"], row["precision"]): row["seconds"] for row in rows}
    load_s = sec[("load only (pipeline, no model)", None)]
    compute_s = sec[("compute only ABMIL (bags in memory)", "fp32")]
    ratio = (sec[("epoch ABMIL", "fp32")] / max(load_s, compute_s)
             if ("epoch ABMIL", "fp32") in sec else None)
    r["results"]["epoch"] = {"rows": rows, "bags": s["bags"], "bag": [s["instances"], s["dim"]],
                             "workers": workers, "prefetch": a.prefetch, "cache": a.cache,
                             "write_s": t_write, "pack_s": t_pack,
                             "abmil_epoch_over_max_load_compute": ratio}
    cols = [c for c in ("what", "precision", "seconds", "bags_per_s", "gpu_util_mean",
                        "gpu_util_median", "gpu_util_p10", "gpu_util_samples", "cuda_peak_mb")
            if any(c in row for row in rows)]
    r["markdown"].append(
        f"## One epoch, {s['bags']} bags of {s['instances']:,} x {s['dim']} (packed store, "
        f"{workers} workers, prefetch {a.prefetch}, {a.cache} page cache)\n\n"
        + markdown_table([{c: row.get(c) for c in cols} for row in rows]) + "\n\n"
        + (f"- ABMIL fp32 epoch / max(load, compute) = **{ratio:.2f}** (target <= 1.15)\n"
           if ratio is not None else ""))


# -- cindex -------------------------------------------------------------------------------------

def _small_preset():
    from steph.data import synthetic

    kw = {"patches_mean": 10.0, "patches_max": 30, "slides_per_patient": 1.0}
    return synthetic.SynthConfig(
        feature_dim=8, n_phenotypes=4, latent_dim=4, min_patches=4,
        cohorts=(synthetic.CohortSpec("TARGET", 20, "a", 0.6, **kw),
                 synthetic.CohortSpec("REL1", 16, "a", 0.6, **kw)))


def section_cindex(r: dict[str, Any]) -> None:
    from steph.config import build_config
    from steph.data import synthetic
    from steph.experiments.cv import run_cv

    s, device = r["sizes"], r["device"]
    data = r["tmp"] / "transfer"
    preset = _small_preset() if s["preset"] == "small" else synthetic.preset(s["preset"])
    synthetic.generate(preset, data, seed=0, progress=False)
    rows = []
    for p in r["precisions"]:
        settings = {"train": {"device": str(device), "precision": p, "epochs": s["epochs"]},
                    "steph": {"gamma": 0.005}}
        if s["preset"] == "small":
            settings["train"]["bags_per_step"] = 4
            settings["model"] = {"hidden_dim": 16, "attn_dim": 8}
            settings["steph"]["embed_dim"] = 16
        t0 = time.perf_counter()
        summary = run_cv(data, r["tmp"] / f"cv-{p}", ["abmil", "steph"], targets=["TARGET"],
                         folds=s["folds"], cfg=build_config(settings), progress=False)
        t = time.perf_counter() - t0
        got = summary[summary["method"].isin(["abmil", "steph"])]
        for method, g in got.groupby("method"):
            rows.append({"method": method, "precision": p, "c_index_mean": g["c_index"].mean(),
                         "c_index_std": g["c_index"].std(ddof=1) if len(g) > 1 else 0.0,
                         "folds": len(g), "grid_seconds": t})
        print(f"  cindex {p}: {t:.0f} s", flush=True)
    r["results"]["cindex"] = {"rows": rows, "preset": s["preset"], "folds": s["folds"],
                              "epochs": s["epochs"]}
    r["markdown"].append(
        f"## Test C-index on the `{s['preset']}` preset (TARGET, folds {s['folds']}, "
        f"{s['epochs']} epochs, steph.gamma = 0.005)\n\n"
        + markdown_table(rows, digits=3) + "\n")


# -- main ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_argument(p)
    p.add_argument("--out", type=Path, required=True, help="folder for bench_gpu.json / .md")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--small", action="store_true", help="tiny sizes: a smoke test")
    p.add_argument("--workers", type=int, default=None, help="epoch: reading processes "
                   "(default: min(4, CPUs - 1))")
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--cache", choices=["cold", "warm"], default="cold")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--bags", type=int, default=None, help="epoch: bags (default 800)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: "
                   "torch's; 1 with --small)")
    p.add_argument("--tmpdir", type=Path, default=None)
    p.add_argument("--keep", action="store_true", help="keep the written data")
    args = p.parse_args(argv)
    sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown section(s) {unknown}; known: {list(SECTIONS)}")
    logging.basicConfig(level=logging.WARNING)
    threads = args.threads or (1 if args.small else None)
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(args.device, option="--device")
    sizes = dict(SMALL if args.small else FULL)
    sizes.update({k: v for k, v in (("rounds", args.rounds), ("bags", args.bags)) if v})
    precisions, skipped = {}, {}
    for name in [x.strip() for x in args.precisions.split(",") if x.strip()]:
        try:
            precisions[name] = check_precision(device, name, option="--precisions")
        except Exception as err:  # noqa: BLE001 -- recorded, the others still run
            skipped[name] = str(err)
    tmp = Path(tempfile.mkdtemp(prefix="steph-gpu-", dir=args.tmpdir))
    r: dict[str, Any] = {"args": args, "device": device, "sizes": sizes, "tmp": tmp,
                         "precisions": precisions, "results": {}, "markdown": []}
    extra = {"torch": torch.__version__, "cuda": torch.version.cuda,
             "device": device_description(device), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        extra.update(gpu_memory_gb=props.total_memory / 1e9,
                     capability=f"{props.major}.{props.minor}")
    t0 = time.perf_counter()
    try:
        for name in sections:
            print(f"== {name}", flush=True)
            {"step": section_step, "epoch": section_epoch, "cindex": section_cindex}[name](r)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    head = (f"# bench_gpu on {extra['device']} (torch {torch.__version__}, CUDA "
            f"{torch.version.cuda}){' -- SMALL smoke sizes' if args.small else ''}\n\n"
            + (f"Skipped precisions: {skipped}\n\n" if skipped else ""))
    md = head + "\n".join(r["markdown"])
    write_text(args.out / "bench_gpu.md", md)
    write_json(args.out / "bench_gpu.json", {
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "sizes": sizes, "skipped_precisions": skipped},
        "machine": machine_info(**extra), "seconds": time.perf_counter() - t0,
        "results": r["results"]})
    print(md)
    print(f"wrote {args.out / 'bench_gpu.json'} and {args.out / 'bench_gpu.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
