"""Helpers shared by the benchmark scripts. Interleaved timing (candidates run in rotation for
several rounds so that machine noise hits all of them alike; ratios between medians of the same
run) lives in :mod:`steph.utils.timing` and is re-exported here."""

from __future__ import annotations

import argparse
import os
import platform
from typing import Any

from steph.utils.timing import interleaved  # noqa: F401  (the scripts import it from here)


def bag_arguments(doc: str) -> argparse.Namespace:
    """The options every model benchmark takes; sets the thread count when given."""
    import torch

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def machine_info(**extra: Any) -> dict[str, Any]:
    """What a benchmark's JSON records about where it ran (plus ``extra`` entries)."""
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "nice": os.nice(0),
            "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None, **extra}


def train_step(model, x, bins, events):
    """One optimiser step on one bag (survival loss plus the model's auxiliary loss, if any)."""
    import torch

    from steph.models.output import as_output
    from steph.survival.loss import nll_survival_loss

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def run():
        opt.zero_grad()
        out = as_output(model(x))
        loss = nll_survival_loss(out.logits, bins, events)
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        loss.backward()
        opt.step()
    return run


def inference(model, x):
    import torch

    def run():
        with torch.no_grad():
            model(x)
    return run
