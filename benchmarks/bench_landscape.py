"""The loss landscape's evaluation of the merged models (``steph.analysis.landscape``):
the algorithm before (the merged tensors of every group of grid points rebuilt for every bag;
kept below as ``reference_merged_loss_fn``) against the current ``merged_loss_fn`` (each
group's tensors built once for all bags, the feature projection formed from three products
per bag), interleaved in one run on the same inputs, with the largest difference of their
losses.

    python benchmarks/bench_landscape.py [--bags 30] [--min-patches 50] [--max-patches 200]
        [--dim 256] [--hidden 512] [--attn 384] [--bins 32] [--step 0.04] [--rounds 3]
        [--threads 1] [--json OUT]

Inputs: an ABMIL (``--hidden`` / ``--attn``: its widths; steph's defaults 512 / 384) with
random theta_0 and task vectors tau_s, tau_t (0.1 x a standard normal), ``--bags`` bags of
uniformly drawn sizes in [min, max] patches of ``--dim`` features, the grid C in {0, step, ..., 1}
squared (26 x 26 for the paper's 0.04), the loss as ``steph report`` evaluates it (all 676 points
in one call).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved, machine_info

from steph.analysis.landscape import Bag, LossFn, coefficient_grid, evaluate_grid, merged_loss_fn

log = logging.getLogger("steph.analysis")


def reference_merged_loss_fn(network: torch.nn.Module, theta0: dict[str, torch.Tensor],
                   tau_s: dict[str, torch.Tensor], tau_t: dict[str, torch.Tensor],
                   bags: Sequence[Bag], loss_alpha: float, device: str | torch.device = "cpu",
                   max_elements: int = 2 ** 26, progress: bool = False,
                   desc: str = "landscape") -> LossFn:
    """steph's ``merged_loss_fn`` before the grid points' tensors were built once per group
    (kept here, outside the package, as the reference of the benchmark and the tests): for
    every bag and every group of points the merged tensors are built again.

    The mean survival loss over ``bags`` of ``network`` with the tensors
    ``theta0 + C_s tau_s + C_t tau_t`` (floating tensors; others as in ``theta0``), for a batch of
    (C_s, C_t) points (a progress bar over the bags with ``progress``). ``max_elements`` bounds
    one vmapped call: its merged tensors (points x parameters) and its activations (points x
    instances x the widest tensor), so large networks and bags run in smaller groups of
    points."""
    from torch.func import functional_call, vmap
    from tqdm.auto import tqdm

    from steph.survival.loss import nll_survival_loss

    dev = torch.device(device)
    network = network.to(dev).eval()
    merged = [n for n, v in theta0.items() if v.is_floating_point()]
    fixed = {n: v.to(dev) for n, v in theta0.items() if not v.is_floating_point()}
    base = {n: theta0[n].to(dev, torch.float32) for n in merged}
    ts = {n: tau_s[n].to(dev, torch.float32) for n in merged}
    tt = {n: tau_t[n].to(dev, torch.float32) for n in merged}
    width = max(max(v.shape) if v.dim() else 1 for v in base.values())
    n_params = sum(v.numel() for v in base.values())
    on_device = [Bag(b.x.to(dev), {k: v.to(dev) for k, v in b.inputs.items()}, b.bin, b.event)
                 for b in bags]
    state = {"vmap": True}

    def one(params: dict[str, torch.Tensor], bag: Bag) -> torch.Tensor:
        return functional_call(network, {**fixed, **params}, (bag.x,), dict(bag.inputs))

    def logits(cs: torch.Tensor, ct: torch.Tensor, bag: Bag) -> torch.Tensor:
        params = {n: base[n] + cs.view(-1, *[1] * base[n].dim()) * ts[n]
                  + ct.view(-1, *[1] * base[n].dim()) * tt[n] for n in merged}
        if state["vmap"]:
            try:
                return vmap(lambda p: one(p, bag))(params).reshape(len(cs), -1)
            except Exception as err:  # noqa: BLE001 - data-dependent control flow and the like
                log.info("landscape: %s cannot be vmapped (%s); evaluating point by point",
                         type(network).__name__, type(err).__name__)
                state["vmap"] = False
        return torch.cat([one({n: v[g] for n, v in params.items()}, bag).reshape(1, -1)
                          for g in range(len(cs))])

    @torch.no_grad()
    def loss_fn(cs: torch.Tensor, ct: torch.Tensor) -> torch.Tensor:
        cs, ct = cs.to(dev, torch.float32), ct.to(dev, torch.float32)
        total = torch.zeros(len(cs), dtype=torch.float64, device=dev)
        for bag in tqdm(on_device, desc=desc, unit="bag", disable=None if progress else True,
                        leave=False):
            group = max(1, max_elements // max(n_params, bag.x.shape[0] * width))
            for a in range(0, len(cs), group):
                out = logits(cs[a:a + group], ct[a:a + group], bag)
                n = out.shape[0]
                loss = nll_survival_loss(out, torch.full((n,), bag.bin, device=dev),
                                         torch.full((n,), bag.event, device=dev),
                                         alpha=loss_alpha, reduction="none")
                total[a:a + n] += loss.double()
        return total / max(1, len(on_device))

    return loss_fn



def make_inputs(bags: int, min_patches: int, max_patches: int, dim: int, hidden: int,
                attn: int, n_bins: int, seed: int = 0):
    """(network, theta0, tau_s, tau_t, bags): an ABMIL and random task vectors and bags."""
    from steph.models import create_model

    torch.manual_seed(seed)
    net = create_model("abmil", in_dim=dim, n_bins=n_bins, hidden_dim=hidden, attn_dim=attn)
    theta0 = {k: v.detach().clone() for k, v in net.state_dict().items()}
    tau_s = {k: 0.1 * torch.randn_like(v) for k, v in theta0.items()}
    tau_t = {k: 0.1 * torch.randn_like(v) for k, v in theta0.items()}
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for i in range(bags):
        n = int(torch.randint(min_patches, max_patches + 1, (1,), generator=g))
        out.append(Bag(torch.randn(n, dim, generator=g), {},
                       int(torch.randint(0, n_bins, (1,), generator=g)), i % 2))
    return net, theta0, tau_s, tau_t, out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bags", type=int, default=30)
    ap.add_argument("--min-patches", type=int, default=50)
    ap.add_argument("--max-patches", type=int, default=200)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--attn", type=int, default=384)
    ap.add_argument("--bins", type=int, default=32)
    ap.add_argument("--step", type=float, default=0.04)
    ap.add_argument("--alpha", type=float, default=0.0, help="train.loss_alpha")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    net, theta0, tau_s, tau_t, bags = make_inputs(args.bags, args.min_patches, args.max_patches,
                                                  args.dim, args.hidden, args.attn, args.bins)
    c = coefficient_grid(args.step)
    points = len(c) ** 2
    values: dict[str, np.ndarray] = {}

    def run(name: str, make) -> callable:
        def call() -> None:
            fn: LossFn = make(net, theta0, tau_s, tau_t, bags, args.alpha)
            values[name] = evaluate_grid(fn, c, batch=points)
        return call

    t0 = time.perf_counter()
    times = interleaved({"before": run("before", reference_merged_loss_fn),
                         "now": run("now", merged_loss_fn)}, rounds=args.rounds, warmup=0)
    diff = np.abs(values["before"] - values["now"])
    rel = float((diff / np.maximum(np.abs(values["before"]), 1e-12)).max())
    sizes = [b.x.shape[0] for b in bags]
    res = {"bags": args.bags, "patches": [min(sizes), int(np.mean(sizes)), max(sizes)],
           "dim": args.dim, "hidden": args.hidden, "attn": args.attn, "bins": args.bins,
           "points": points, "threads": torch.get_num_threads(), "rounds": args.rounds,
           "before_s": times["before"], "now_s": times["now"],
           "ratio": times["before"] / times["now"], "max_abs_diff": float(diff.max()),
           "max_rel_diff": rel, "wall_s": time.perf_counter() - t0, **machine_info()}
    print(f"{args.bags} bags of {min(sizes)}-{max(sizes)} patches (mean {np.mean(sizes):.0f}) x "
          f"{args.dim} features, ABMIL {args.hidden}/{args.attn}, {args.bins} bins, "
          f"{len(c)} x {len(c)} grid, {res['threads']} thread(s), median of {args.rounds} "
          "interleaved rounds")
    print(f"before (tensors rebuilt per bag): {times['before']:8.2f} s")
    print(f"now (built once per group):       {times['now']:8.2f} s")
    print(f"ratio before / now:               {res['ratio']:8.1f}x")
    print(f"largest difference of the losses: {diff.max():.2e} (relative {rel:.2e})")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    ok = rel <= 1e-5
    if not ok:
        print("the two algorithms disagree", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
