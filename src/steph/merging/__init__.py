"""Model merging: task vectors, the model pool, STEPH and the model-merging baselines.

Where things live:
  task_vectors.py  tau = theta - theta_0, flat stacks, one fused merge (addmv)
  pool.py          theta_0 + target (fold k) + sources (fold 0) of one transfer problem
  steph.py         STEPH (method.md section 5): the formula is in ``STEPH._run``
  baselines.py     Model Avg, Task Arithmetic, AdaMerging, TIES / Iso-C / Iso-CTS / Surgery AM
  preprocess.py    TIES, Iso-C, Iso-CTS as pure functions on task-vector dicts
  analysis.py      subspace alignment ratio (appendix A)
"""

from steph.merging import baselines  # noqa: F401  (registers the mil_surgery artefact kind)
from steph.merging.analysis import subspace_alignment_ratio, subspace_alignment_ratios
from steph.merging.pool import ModelPool
from steph.merging.preprocess import (
    iso_c,
    iso_c_pair,
    iso_cts,
    iso_cts_pair,
    preprocess_pairwise,
    ties_merge,
    ties_pair,
)
from steph.merging.steph import STEPH, MergeExplanation
from steph.merging.task_vectors import FlatLayout, TaskVectorStack, task_vector

__all__ = [
    "STEPH",
    "FlatLayout",
    "MergeExplanation",
    "ModelPool",
    "TaskVectorStack",
    "iso_c",
    "iso_c_pair",
    "iso_cts",
    "iso_cts_pair",
    "preprocess_pairwise",
    "subspace_alignment_ratio",
    "subspace_alignment_ratios",
    "task_vector",
    "ties_merge",
    "ties_pair",
]
