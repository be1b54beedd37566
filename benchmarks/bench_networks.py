"""Parameters, inference FLOPs, latency and peak memory of every registered MIL network on one
bag (default 10,000 x 1536; Patch-GCN gets the 8-NN graph of a square raster of patches).

    python benchmarks/bench_networks.py [--instances 10000] [--dim 1536] [--threads 1]
                                        [--rounds 3] [--nets abmil,transmil,...] [--json OUT]

FLOPs are counted on the meta device (nothing computed): ``total`` is everything
torch.utils.flop_counter counts, ``layers`` only nn.Linear / nn.Conv layers (see
steph.models.flops). Latency: median inference forward. Peak memory: the growth of the
process's peak resident set during inference, then during one training forward + backward,
measured in a fresh process per network (CPU only; the input bag itself is not counted).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time
from pathlib import Path

import torch

from steph.data.graphs import raster_edges
from steph.models import create_model, list_models, model_class
from steph.models.flops import count_flops


def bag_inputs(name: str, n: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    if "edge_index" not in model_class(name).bag_inputs:
        return {}
    return {"edge_index": raster_edges(n).to(device)}


def _measure(name: str, n: int, d: int, threads: int, rounds: int, train: bool,
             queue: mp.Queue) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(name, in_dim=d, n_bins=32).eval()
    x = torch.randn(n, d)
    extra = bag_inputs(name, n)

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    base = peak_mb()
    times = []
    with torch.no_grad():
        for _ in range(rounds):
            t = time.perf_counter()
            model(x, **extra)
            times.append(time.perf_counter() - t)
    inference = peak_mb()
    if not train:
        queue.put({"latency_s": statistics.median(times), "peak_mb": inference - base})
        return
    # one training forward + backward (the peak only grows, so this is measured second)
    model.train()
    t = time.perf_counter()
    model(x, **extra).sum().backward()
    train_s = time.perf_counter() - t
    queue.put({"latency_s": statistics.median(times), "peak_mb": inference - base,
               "train_step_s": train_s, "train_peak_mb": peak_mb() - base})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--nets", type=str, default=",".join(list_models()))
    ap.add_argument("--no-run", action="store_true", help="count parameters and FLOPs only")
    ap.add_argument("--no-train", action="store_true", help="skip the training step")
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()
    n, d = args.instances, args.dim
    rows = []
    for name in args.nets.split(","):
        with torch.device("meta"):
            model = create_model(name, in_dim=d, n_bins=32)
        flops = count_flops(model, torch.empty(n, d, device="meta"), **bag_inputs(name, n, "meta"))
        row = {"net": name, "params": sum(p.numel() for p in model.parameters()),
               "gflops_total": flops.total / 1e9, "gflops_layers": flops.layers / 1e9}
        if not args.no_run:
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            proc = ctx.Process(target=_measure, args=(name, n, d, args.threads, args.rounds,
                                                        not args.no_train, queue))
            proc.start()
            row.update(queue.get())
            proc.join()
        rows.append(row)
        cols = f"{row['params']:>10,}  {row['gflops_total']:7.2f}  {row['gflops_layers']:7.2f}"
        if "latency_s" in row:
            cols += f"  {row['latency_s']:8.2f}  {row['peak_mb']:8.0f}"
        if "train_step_s" in row:
            cols += f"  {row['train_step_s']:8.2f}  {row['train_peak_mb']:8.0f}"
        print(f"{name:<10} {cols}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"instances": n, "dim": d, "threads": args.threads,
                                               "rows": rows}, indent=2))


if __name__ == "__main__":
    print("net            params  GF total GF layers latency s  peak MB  train s  peak MB")
    main()
