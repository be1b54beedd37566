"""STEPH's cost next to ABMIL's and ROUPKT's on one 10,000-instance bag (Table S4 / S7 of the
appendix):

* learnable parameters and inference FLOPs (paper: 1.34 M and 40.1 GFLOPs; ABMIL 1.20 M, 23.6);
  ROUPKT (method.md section 6, 12 sources + self, as served: it runs its 13 expert ABMILs and
  its router on the bag) 4.62 M learnable;
* inference latency ratio STEPH / ABMIL (target <= 1.9; the FLOP ratio is ~1.7) and ROUPKT /
  STEPH (the paper's efficiency argument), all three timed in one interleaved run;
* training-step time ratio STEPH / ABMIL (target <= 2.0);
* growth of STEPH's training step from m = 6 to m = 12 sources with K = m (target <= +15 %).

    python benchmarks/bench_steph.py [--instances 10000] [--dim 1536] [--rounds 7] [--json OUT]
        [--device auto|cpu|cuda|cuda:N|mps]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from _timing import bag_arguments, inference, interleaved, make_steph, train_step

from steph.methods import CostSpec, get_method
from steph.models import ABMIL


def main() -> None:
    args = bag_arguments(__doc__)
    x = torch.randn(args.instances, args.dim, device=args.device)
    b, e = torch.tensor([5]), torch.tensor([1])
    abmil = ABMIL(args.dim, 32)
    steph12 = make_steph(12, args.dim, 5)
    dense6, dense12 = make_steph(6, args.dim, 6), make_steph(12, args.dim, 12)
    torch.manual_seed(0)
    roupkt, _ = get_method("roupkt").cost_model(CostSpec(in_dim=args.dim, n_bins=32, n_sources=12,
                                                         n_instances=args.instances))

    ts = lambda m: train_step(m, x, b, e)

    for mdl in (abmil, steph12, dense6, dense12, roupkt):
        mdl.to(args.device).eval()
    flops = {}
    for name, mdl in [("ABMIL", abmil), ("STEPH", steph12), ("ROUPKT", roupkt)]:
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            mdl(x)
        flops[name] = fc.get_total_flops() / 1e9
    inf = interleaved({"ABMIL": inference(abmil, x), "STEPH": inference(steph12, x),
                       "ROUPKT": inference(roupkt, x)}, rounds=args.rounds)
    for mdl in (abmil, steph12, dense6, dense12):
        mdl.train()
    train = interleaved({"ABMIL": ts(abmil), "STEPH": ts(steph12),
                         "STEPH m=6 K=6": ts(dense6), "STEPH m=12 K=12": ts(dense12)},
                        rounds=args.rounds)
    res = {
        "instances": args.instances, "dim": args.dim, "threads": torch.get_num_threads(),
        "device": str(args.device),
        "params_M": {"ABMIL": sum(p.numel() for p in abmil.parameters()) / 1e6,
                     "STEPH": steph12.trainable_parameter_count() / 1e6,
                     "ROUPKT": roupkt.trainable_parameter_count() / 1e6},
        "encoders_per_bag": {"ABMIL": 1, "STEPH": 1, "ROUPKT": roupkt.encoders_per_bag()},
        "gflops": flops, "inference_s": inf, "train_step_s": train,
        "inference_ratio": inf["STEPH"] / inf["ABMIL"],
        "roupkt_over_steph_inference": inf["ROUPKT"] / inf["STEPH"],
        "train_ratio": train["STEPH"] / train["ABMIL"],
        "m12_over_m6": train["STEPH m=12 K=12"] / train["STEPH m=6 K=6"],
    }
    print(f"{args.instances} x {args.dim} bag on {args.device}, {res['threads']} threads, median of {args.rounds} interleaved rounds")
    print(f"  learnable params: ABMIL {res['params_M']['ABMIL']:.2f} M, STEPH {res['params_M']['STEPH']:.2f} M "
          "(paper 1.20 / 1.34)")
    print(f"  learnable params: ROUPKT {res['params_M']['ROUPKT']:.3f} M (method.md 4.618913), "
          f"{roupkt.encoders_per_bag()} MIL encoders per bag")
    print(f"  inference GFLOPs: ABMIL {flops['ABMIL']:.1f}, STEPH {flops['STEPH']:.1f} (paper 23.6 / 40.1), "
          f"ratio {flops['STEPH'] / flops['ABMIL']:.2f}; ROUPKT {flops['ROUPKT']:.1f}, "
          f"{flops['ROUPKT'] / flops['STEPH']:.2f} x STEPH")
    print(f"  inference latency: ABMIL {inf['ABMIL'] * 1e3:.0f} ms, STEPH {inf['STEPH'] * 1e3:.0f} ms, "
          f"ratio {res['inference_ratio']:.2f} (target <= 1.9); ROUPKT {inf['ROUPKT'] * 1e3:.0f} ms, "
          f"ROUPKT / STEPH {res['roupkt_over_steph_inference']:.2f}")
    print(f"  training step: ABMIL {train['ABMIL'] * 1e3:.0f} ms, STEPH {train['STEPH'] * 1e3:.0f} ms, "
          f"ratio {res['train_ratio']:.2f} (target <= 2.0)")
    print(f"  STEPH training step m=6 (K=6) {train['STEPH m=6 K=6'] * 1e3:.0f} ms, m=12 (K=12) "
          f"{train['STEPH m=12 K=12'] * 1e3:.0f} ms: +{(res['m12_over_m6'] - 1) * 100:.1f} % (target <= +15 %)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
