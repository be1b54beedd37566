"""Training-step time of steph's ABMIL on one 10,000-instance bag, relative to a plain PyTorch
ABMIL written inline here (target: ratio <= 1.1), plus inference latency and FLOPs.

    python benchmarks/bench_abmil.py [--instances 10000] [--dim 1536] [--rounds 7] [--json OUT]
        [--device auto|cpu|cuda|cuda:N|mps]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from _timing import bag_arguments, inference, interleaved, train_step

from steph.models import ABMIL


class PlainABMIL(nn.Module):
    """The textbook gated-attention MIL, written without any steph code."""

    def __init__(self, d: int, n_bins: int = 32):
        super().__init__()
        self.fc = nn.Linear(d, 512)
        self.att_a = nn.Linear(512, 384)
        self.att_b = nn.Linear(512, 384)
        self.att_c = nn.Linear(384, 1)
        self.drop = nn.Dropout(0.25)
        self.cls = nn.Linear(512, n_bins)

    def forward(self, x):
        h = F.relu(self.fc(x))
        a = self.drop(torch.tanh(self.att_a(h)))
        b = self.drop(torch.sigmoid(self.att_b(h)))
        w = torch.softmax(self.att_c(a * b).squeeze(-1), dim=0)
        return self.cls((w @ h).unsqueeze(0))


def main() -> None:
    args = bag_arguments(__doc__)
    torch.manual_seed(0)
    x = torch.randn(args.instances, args.dim, device=args.device)
    ours, plain = ABMIL(args.dim, 32), PlainABMIL(args.dim, 32)
    b, e = torch.tensor([5]), torch.tensor([1])

    ours.train(), plain.train()
    train = interleaved({"steph ABMIL": train_step(ours, x, b, e), "plain ABMIL": train_step(plain, x, b, e)},
                        rounds=args.rounds)
    ours.eval(), plain.eval()
    inf = interleaved({"steph ABMIL": inference(ours, x), "plain ABMIL": inference(plain, x)},
                      rounds=args.rounds)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        ours(x)
    res = {
        "instances": args.instances, "dim": args.dim, "threads": torch.get_num_threads(),
        "device": str(args.device),
        "params": sum(p.numel() for p in ours.parameters()),
        "gflops_inference": fc.get_total_flops() / 1e9,
        "train_step_s": train, "inference_s": inf,
        "train_step_ratio": train["steph ABMIL"] / train["plain ABMIL"],
        "inference_ratio": inf["steph ABMIL"] / inf["plain ABMIL"],
    }
    print(f"ABMIL, {args.instances} x {args.dim} bag on {args.device}, {res['threads']} threads, median of {args.rounds} rounds")
    print(f"  parameters {res['params']:,}   inference {res['gflops_inference']:.2f} GFLOPs")
    print(f"  training step: steph {train['steph ABMIL'] * 1e3:.1f} ms, plain {train['plain ABMIL'] * 1e3:.1f} ms,"
          f" ratio {res['train_step_ratio']:.3f} (target <= 1.1)")
    print(f"  inference:     steph {inf['steph ABMIL'] * 1e3:.1f} ms, plain {inf['plain ABMIL'] * 1e3:.1f} ms,"
          f" ratio {res['inference_ratio']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
