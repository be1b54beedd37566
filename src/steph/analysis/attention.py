"""Attention maps of the target's own model and of STEPH on a test slide (Figure S4).

For a slide of a test patient of a fold: the attention weights of the target's cancer-specific
model of that fold (``embed`` of the network) and of STEPH's merged model for the patient (the
network with the encoder tensors ``explain`` returns), over the patient's whole bag (every slide
of the patient, as the models see it), then the rows of that slide with its patch coordinates.
A weight sums to 1 over the patient's bag; figures show each model's weights as percentiles
within the slide, so that the two maps share one scale.

One table per slide: ``slide_id, patch, x, y, attention_<target method>,
attention_<STEPH method>`` (the per-patch CSV viewers such as QuPath can overlay on the slide),
cached under ``RUNS/.cache/analysis/attention/<cohort>/<method>/[rep<r>/]fold<k>/<slide>.json``.
A network without attention weights (TransMIL) has no map.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from steph.analysis.cache import cache_key, read_cached, run_cache_path, write_cached
from steph.analysis.runs import (
    RunRef,
    load_steph,
    read_predictions,
    steph_arch,
    target_run,
    weights_digest,
)
from steph.errors import ConfigError, DataError


def attention_columns(target_method: str, steph_method: str) -> list[str]:
    return ["slide_id", "patch", "x", "y", f"attention_{target_method}",
            f"attention_{steph_method}"]


def slide_patient(cohort, slide_id: str) -> str:
    """The patient a slide belongs to (DataError naming the cohort when it has no such slide)."""
    hits = cohort.slides.loc[cohort.slides["slide_id"] == slide_id, "patient_id"]
    if hits.empty:
        raise DataError(f"cohort {cohort.name!r} has no slide {slide_id!r}")
    return str(hits.iloc[0])


def fold_of_patient(runs_root: str | Path, runs: Sequence[RunRef], patient_id: str) -> RunRef:
    """The run (among ``runs``) whose test patients include ``patient_id``."""
    for run in runs:
        pred = read_predictions(run.path(runs_root))
        if ((pred["patient_id"] == patient_id) & (pred["split"] == "test")).any():
            return run
    raise ConfigError(f"patient {patient_id!r} is a test patient of none of the finished runs "
                      f"{', '.join(map(str, runs))}")


def locate_slide(runs_root: str | Path, data_root: str | Path, runs: Sequence[RunRef],
                 slide_id: str) -> RunRef:
    """The run among ``runs`` (of one or more cohorts) of the cohort that holds ``slide_id``
    whose test patients include the slide's patient."""
    from steph.analysis.bags import RunBags

    by_cohort: dict[str, list[RunRef]] = {}
    for run in runs:
        by_cohort.setdefault(run.cohort, []).append(run)
    for cohort_runs in by_cohort.values():
        cohort = RunBags(runs_root, data_root, cohort_runs[0]).cohort
        if (cohort.slides["slide_id"] == slide_id).any():
            return fold_of_patient(runs_root, cohort_runs, slide_patient(cohort, slide_id))
    raise ConfigError(f"slide {slide_id!r} is in none of the cohorts "
                      f"{', '.join(by_cohort) or '(none)'}")


def default_slides(runs_root: str | Path, data_root: str | Path, run: RunRef, n: int = 2
                   ) -> list[str]:
    """The first slide of the test patients of ``run`` with the highest and the lowest
    predicted risk (then the next highest, next lowest, ...): ``n`` slides."""
    from steph.analysis.bags import RunBags

    pred = read_predictions(run.path(runs_root))
    test = pred[pred["split"] == "test"].sort_values(["risk", "patient_id"], ascending=False)
    ids = test["patient_id"].tolist()
    order = [ids[i // 2] if i % 2 == 0 else ids[-1 - i // 2] for i in range(len(ids))]
    cohort = RunBags(runs_root, data_root, run).cohort
    slides = [cohort.patient(pid)["slides"][0] for pid in dict.fromkeys(order)]
    return slides[:n]


def attention_table(runs_root: str | Path, data_root: str | Path, steph_run: RunRef,
                    slide_id: str) -> pd.DataFrame:
    """The attention of the target model and of STEPH over the patches of ``slide_id`` (a slide
    of a test patient of ``steph_run``), computed or read from the cache."""
    from steph.analysis.bags import RunBags
    from steph.inference import load_artefact

    runs_root = Path(runs_root)
    target = target_run(steph_run, steph_arch(runs_root, steph_run))
    bags = RunBags(runs_root, data_root, steph_run)
    cohort = bags.cohort
    pid = slide_patient(cohort, slide_id)
    if pid not in bags.test_ids():
        raise ConfigError(f"slide {slide_id!r} (patient {pid!r}) is not a test slide of "
                          f"{steph_run}")
    cols = attention_columns(target.method, steph_run.method)
    key = cache_key("attention/1", weights_digest(target.path(runs_root)),
                    weights_digest(steph_run.path(runs_root)), pid, slide_id,
                    bags.files_key([pid]))
    path = run_cache_path(runs_root, "attention", steph_run, slide_id)
    cached = read_cached(path, key)
    if cached is None:
        slides = list(cohort.patient(pid)["slides"])
        coords = cohort.load_coords(pid)
        i = slides.index(slide_id)
        if coords[i] is None:
            raise DataError(f"slide {slide_id!r} of cohort {cohort.name!r} has no patch "
                            "coordinates: no attention map can be drawn")
        start = sum(len(c) if c is not None else _rows(cohort, s)
                    for c, s in zip(coords[:i], slides[:i]))
        rows = slice(start, start + len(coords[i]))
        bag = bags.bag(pid)
        target_net, _ = load_artefact(target.path(runs_root))
        steph = load_steph(runs_root, steph_run)
        with torch.no_grad():
            _, att_t = target_net.embed(bag, **bags.bag_inputs(pid, target_net.bag_inputs))
            att_s = merged_attention(steph, bag, bags.bag_inputs(pid, steph.bag_inputs))
        if att_t is None or att_s is None:
            raise ConfigError(f"the network {target.method!r} has no attention weights to map")
        xy = np.asarray(coords[i], dtype=np.float64)
        cached = [[slide_id, k, float(xy[k, 0]), float(xy[k, 1]), float(a), float(b)]
                  for k, (a, b) in enumerate(zip(att_t[rows].tolist(), att_s[rows].tolist()))]
        write_cached(path, key, cached)
    return pd.DataFrame(cached, columns=cols)


def _rows(cohort, slide_id: str) -> int:
    hit = cohort.slides.loc[cohort.slides["slide_id"] == slide_id, "n_patches"]
    return int(hit.iloc[0])


def merged_attention(steph: torch.nn.Module, bag: torch.Tensor,
                     bag_inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """STEPH's attention over ``bag``: its network with the encoder tensors merged for this bag
    (``explain``)."""
    ex = steph.explain(bag, **bag_inputs)
    net = copy.deepcopy(steph.network).eval()
    with torch.no_grad():
        for name, tensor in ex.merged.items():
            net.get_parameter(name).copy_(tensor)
        _, attention = net.embed(bag, **bag_inputs)
    return attention
