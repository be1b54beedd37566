"""Methods: the recipes ``steph cv --methods`` knows, between the modules (models, merging) and
the experiment grid. Importing this package registers every method.

  registry.py       Method, Built, MethodContext; register_method / get_method / list_methods
  networks.py       cancer-specific training of every MIL network (abmil, transmil, ilra,
                    r2t_mil, patch_gcn) from its theta_0; their per-bag inputs (graphs)
  steph.py          STEPH, its ablations and the K sweep
  model_merging.py  Model Avg, Task Arithmetic, AdaMerging, TIES / Iso-C / Iso-CTS / Surgery AM
  transfer.py       representation transfer: ROUPKT, zero_shot, linear_probe, fusion_mean
  joint.py          multi-cancer joint learning (the target's training patients + the sources')
"""

from steph.methods import joint, model_merging, networks, steph, transfer  # noqa: F401  (registration)
from steph.methods.registry import (
    Built,
    CostModel,
    CostSpec,
    InnerTarget,
    Method,
    MethodContext,
    SearchSpec,
    config_for,
    get_method,
    list_methods,
    method_patterns,
    register_method,
    register_method_pattern,
    resolve_methods,
)

__all__ = [
    "Built",
    "CostModel",
    "CostSpec",
    "InnerTarget",
    "Method",
    "MethodContext",
    "SearchSpec",
    "config_for",
    "get_method",
    "list_methods",
    "method_patterns",
    "register_method",
    "register_method_pattern",
    "resolve_methods",
]
