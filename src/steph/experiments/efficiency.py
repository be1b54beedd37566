"""``steph bench efficiency``: Table S4 as a measurement. For every method with a cost model
(``Method.cost_model``: the module as it runs at inference, with random weights where training
would give them), on one bag of ``n_instances`` x ``in_dim`` (default 10,000 x 1536):

* **learnable parameters**: what training learns (``module.trainable_parameter_count()`` when
  the module defines it, else the parameters that require grad): a cancer-specific network all
  of its own, STEPH its bag embedding, hypernetworks and head, the AdaMerging family its
  coefficients and head (and surgery), Model Avg / Task Arithmetic nothing;
* **inference GFLOPs**, counted two ways by :func:`steph.models.flops.count_flops` (``total``:
  everything ``torch.utils.flop_counter`` counts; ``layers``: only nn.Linear / nn.Conv layers,
  the counting Table S4 matches, see docs/method-notes.md);
* **latency**: median seconds of one inference forward (eval mode, no autograd) over
  ``repeats`` rounds, all candidates measured in one run, interleaved and in rotating order
  (:func:`steph.utils.timing.interleaved`), after ``warmup`` untimed rounds.

Transfer methods are measured over ``arch`` (their backbone, ``model.arch``) with m =
``n_sources`` random source task vectors.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pandas as pd
import torch
from torch import nn

from steph.errors import ConfigError
from steph.models.module import SurvivalModule, check_module
from steph.methods import CostSpec, get_method, list_methods, resolve_methods
from steph.models.flops import count_flops
from steph.utils.timing import interleaved

log = logging.getLogger("steph.experiments")

# Table S4 of the STEPH appendix (10,000 x 1536 bag, 32 bins, m = 12, ABMIL backbone):
# learnable parameters (millions) and inference GFLOPs, shown next to a measurement made in
# that setting.
TABLE_S4_SPEC = CostSpec()
TABLE_S4: dict[str, tuple[float, float]] = {
    "abmil": (1.20, 23.6),
    "transmil": (2.95, 60.3),
    "ilra": (4.21, 55.3),
    "r2t_mil": (2.98, 40.7),
    "patch_gcn": (1.69, 21.7),
    "steph": (1.34, 40.1),
}

COLUMNS = ["method", "arch", "learnable_params", "gflops_total", "gflops_layers", "latency_ms",
           "paper_params_m", "paper_gflops"]


def learnable_parameters(module: SurvivalModule) -> int:
    return int(check_module(module).trainable_parameter_count())


def measured_methods() -> list[str]:
    """Every registered method with a cost model, in registration order."""
    return [m for m in list_methods() if get_method(m).cost_model is not None]


def measure_efficiency(methods: str | Sequence[str] | None = None, spec: CostSpec | None = None,
                       device: str = "cpu", repeats: int = 3, warmup: int = 1,
                       seed: int = 0) -> pd.DataFrame:
    """One row per method (see the module docstring); ``arch`` is the network a method runs
    (its own for a cancer-specific one, ``spec.arch`` for a transfer method)."""
    spec = spec or CostSpec()
    names = resolve_methods(methods) if methods else measured_methods()
    missing = [n for n in names if get_method(n).cost_model is None]
    if missing:
        raise ConfigError(f"no cost model for {', '.join(missing)} (measurable: "
                          f"{', '.join(measured_methods())})")
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    x = torch.randn(spec.n_instances, spec.in_dim, generator=torch.Generator().manual_seed(seed)).to(dev)
    rows: list[dict[str, Any]] = []
    calls = {}
    for name in names:
        method = get_method(name)
        module, inputs = method.cost_model(spec)
        module = module.to(dev).eval()
        inputs = {k: v.to(dev) for k, v in inputs.items()}
        flops = count_flops(module, x, **inputs)
        arch = method.arch or spec.arch
        # a cancer-specific network does not depend on the transfer methods' backbone
        in_setting = (replace(spec, arch=TABLE_S4_SPEC.arch) if method.arch else spec) == TABLE_S4_SPEC
        paper = TABLE_S4.get(name, (None, None)) if in_setting else (None, None)
        rows.append({"method": name, "arch": arch, "learnable_params": learnable_parameters(module),
                     "gflops_total": flops.total / 1e9, "gflops_layers": flops.layers / 1e9,
                     "paper_params_m": paper[0], "paper_gflops": paper[1]})
        calls[name] = _forward(module, x, inputs, dev)
        log.info("%s: %d learnable parameters, %.2f GFLOPs (layers %.2f)", name,
                 rows[-1]["learnable_params"], rows[-1]["gflops_total"], rows[-1]["gflops_layers"])
    seconds = interleaved(calls, rounds=repeats, warmup=warmup)
    for row in rows:
        row["latency_ms"] = 1000.0 * seconds[row["method"]]
    return pd.DataFrame(rows, columns=COLUMNS)


def _forward(module: nn.Module, x: torch.Tensor, inputs: dict[str, torch.Tensor],
             device: torch.device):
    def run() -> None:
        with torch.no_grad():
            module(x, **inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return run


def efficiency_markdown(table: pd.DataFrame) -> str:
    """The table as markdown: parameters in millions, GFLOPs and latency rounded."""
    header = ("| method | arch | learnable params (M) | GFLOPs all ops | GFLOPs layers | "
              "latency ms | Table S4 params (M) | Table S4 GFLOPs |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        def opt(v, fmt):
            return "" if v is None or pd.isna(v) else format(v, fmt)
        lines.append(f"| {r.method} | {r.arch} | {r.learnable_params / 1e6:.3f} | "
                     f"{r.gflops_total:.2f} | {r.gflops_layers:.2f} | {r.latency_ms:.1f} | "
                     f"{opt(r.paper_params_m, '.2f')} | {opt(r.paper_gflops, '.1f')} |")
    return "\n".join(lines)
