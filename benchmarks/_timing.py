"""Helpers shared by the benchmark scripts. Interleaved timing (candidates run in rotation for
several rounds so that machine noise hits all of them alike; ratios between medians of the same
run) lives in :mod:`steph.utils.timing` and is re-exported here."""

from __future__ import annotations

import argparse
import os
import platform
from typing import Any

from steph.utils.timing import interleaved  # noqa: F401  (the scripts import it from here)


def add_device_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", default="auto",
                    help="auto (CUDA, else mps, else CPU), cpu, cuda, cuda:N or mps")


def bag_arguments(doc: str) -> argparse.Namespace:
    """The options every model benchmark takes; sets the thread count when given and resolves
    ``--device`` into ``args.device`` (a torch.device)."""
    import torch

    from steph.utils.device import resolve_device

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=str, default=None)
    add_device_argument(ap)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = resolve_device(args.device, option="--device")
    return args


def synchronize(device) -> None:
    """Wait for the device's queued work (CUDA / mps run asynchronously: time after this)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def markdown_table(rows: list[dict[str, Any]], digits: int = 1) -> str:
    """A Markdown table of dict rows (columns in first-seen order; floats to ``digits``)."""
    cols: list[str] = []
    for row in rows:
        cols += [c for c in row if c not in cols]

    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:,.{digits}f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def machine_info(**extra: Any) -> dict[str, Any]:
    """What a benchmark's JSON records about where it ran (plus ``extra`` entries)."""
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "nice": os.nice(0),
            "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None, **extra}


def train_step(model, x, bins, events, amp_dtype=None):
    """One optimiser step on one bag (survival loss plus the model's auxiliary loss, if any),
    on the device of ``x`` (model, bins and events are moved there), optionally under
    autocast to ``amp_dtype``; returns when the device is done."""
    import torch

    from steph.models.module import as_output
    from steph.survival.loss import nll_survival_loss
    from steph.utils.device import autocast

    model.to(x.device)
    bins, events = bins.to(x.device), events.to(x.device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def run():
        opt.zero_grad()
        with autocast(x.device, amp_dtype):
            out = as_output(model(x))
        loss = nll_survival_loss(out.logits.float(), bins, events)
        if out.aux_loss is not None:
            loss = loss + out.aux_loss.float()
        loss.backward()
        opt.step()
        synchronize(x.device)
    return run


def inference(model, x, amp_dtype=None):
    """One prediction on ``x`` (no autograd, eval mode as the caller set), on its device."""
    import torch

    from steph.utils.device import autocast

    model.to(x.device)

    def run():
        with torch.no_grad(), autocast(x.device, amp_dtype):
            model(x)
        synchronize(x.device)
    return run


def make_steph(m: int, dim: int, top_k: int, chunk_size: int | None = None):
    """STEPH over m random source task vectors plus the target's (real ABMIL sizes at dim=1536;
    time and memory do not depend on the vectors' values), seeded."""
    import torch

    from steph.config import StephConfig
    from steph.merging.pool import ModelPool
    from steph.merging.steph import STEPH
    from steph.models import ABMIL

    torch.manual_seed(0)
    hp = {"in_dim": dim, "n_bins": 32}
    theta0 = ABMIL(**hp).state_dict()
    noisy = lambda: {k: v + 0.01 * torch.randn_like(v) for k, v in theta0.items()}
    pool = ModelPool(theta0=theta0, target=noisy(), sources={f"S{i}": noisy() for i in range(m)},
                     target_name="T")
    model = STEPH(pool.stack(), hp, StephConfig(top_k=top_k))
    if chunk_size is not None:
        model.chunk_size = model.network.chunk_size = chunk_size
    return model
