"""Which cohorts can help which: the zero-shot transfer matrix of a runs folder.

Zero-shot transfer of source s to target t: s's own cancer-specific model (its fold-0 run,
method.md section 4: it never saw a target patient) applied unchanged to t's patients. For each
target fold k, its Harrell's C is computed on the fold's test patients (what the report shows)
and on its training patients (what a choice may use: a method choosing sources must not look at
test patients); the matrix entry is the mean over the target's folds. The diagonal holds the
target's own model: the mean test C-index of its fold-k runs on their test patients.

Statistics of the off-diagonal matrix (:func:`transfer_statistics`), those the real UNI2-h
study reports (13 TCGA cancers): mean and sd of the zero-shot C-indices, the shares above 0.5,
0.55 and 0.6, the share of their variance that the target's identity explains (and the
source's; eta squared of the one-way split by column, by row), the symmetry of transfer
(correlation of M[s, t] and M[t, s]), the pairs that are each other's best source, and how far
the best source of each target is from the target's own model.

Optional fixed-merge probes (:func:`merge_probes`): per target fold and source, the test
C-index of a linear proportional-hazards read-out (fitted on the training patients, ridge by
inner cross-validation) of the merged encoder theta_0 + tau_t + tau_s, against theta_0 + tau_t
alone: what adding that source's task vector to the target's model does, without training.

Every (target, source) unit is cached under ``RUNS/.cache/analysis/transferability`` (keyed by
the models' and feature files' digests), so the analysis resumes and reruns cheaply.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from steph.analysis.bags import RunBags
from steph.analysis.cache import cache_key, cache_path, read_cached, write_cached
from steph.analysis.runs import FINISHED, RunRef, read_predictions, run_inventory, weights_digest
from steph.data.synthetic import families
from steph.errors import ConfigError
from steph.survival.metrics import concordance_index_or_nan

log = logging.getLogger("steph.analysis")

COLUMNS = ["target", "source", "fold", "repeat", "split", "c_index", "n"]
OWN = "own"  # the source column of the target's own model


def _risks(module: torch.nn.Module, bags: RunBags, patients: Sequence[str]) -> np.ndarray:
    from steph.inference import predict_bag

    out = []
    for pid in patients:
        risk, _ = predict_bag(module, bags.bag(pid), **bags.bag_inputs(pid, module.bag_inputs))
        out.append(risk)
    return np.asarray(out, dtype=float)


def _scores(pred: pd.DataFrame, risk: pd.Series, target: RunRef, source: str
            ) -> list[dict[str, Any]]:
    rows = []
    for split in ("train", "test"):
        part = pred[pred["split"] == split]
        r = risk.loc[part["patient_id"]].to_numpy(float)
        rows.append({"target": target.cohort, "source": source, "fold": target.fold,
                     "repeat": target.repeat, "split": split,
                     "c_index": concordance_index_or_nan(part["time"], part["event"], r),
                     "n": len(part)})
    return rows


def zero_shot_table(runs_root: str | Path, data_root: str | Path, arch: str = "abmil",
                    targets: Sequence[str] | None = None, sources: Sequence[str] | None = None,
                    repeat: int = 0, progress: bool = False) -> pd.DataFrame:
    """One row per (target, source, fold, split): the C-index of the source's fold-0 model of
    network ``arch`` on the target fold's training or test patients (``source == "own"``: the
    target's own fold-k model, from its predictions). Targets: every cohort with finished
    ``arch`` runs (``targets`` to choose); sources: every cohort with a finished fold-0 run."""
    from steph.inference import load_artefact

    inv = run_inventory(runs_root)
    done = inv[(inv["state"] == FINISHED) & (inv["method"] == arch) & (inv["repeat"] == repeat)]
    have = sorted(set(done["cohort"]))
    fold0 = sorted(set(inv[(inv["state"] == FINISHED) & (inv["method"] == arch)
                           & (inv["repeat"] == 0) & (inv["fold"] == 0)]["cohort"]))
    targets = list(targets) if targets else have
    sources = list(sources) if sources else fold0
    missing = [c for c in targets if c not in have] + [c for c in sources if c not in fold0]
    if missing:
        raise ConfigError(f"no finished {arch} run of {sorted(set(missing))} in {runs_root} "
                          f"(sources need fold 0; train them with steph cv --methods {arch})")
    rows: list[dict[str, Any]] = []
    models: dict[str, torch.nn.Module] = {}
    for t in targets:
        folds = sorted(done.loc[done["cohort"] == t, "fold"])
        target_runs = [RunRef(t, arch, int(k), repeat) for k in folds]
        preds = {r.fold: read_predictions(r.path(runs_root)) for r in target_runs}
        for r in target_runs:  # the target's own model on its own folds
            own = preds[r.fold].set_index("patient_id")["risk"]
            rows += _scores(preds[r.fold], own, r, OWN)
        bags = RunBags(runs_root, data_root, target_runs[0])
        patients = sorted(set(bags.cohort.patient_ids))
        for s in sources:
            if s == t:
                continue
            ref = RunRef(s, arch, 0, 0)
            key = cache_key("zero-shot", weights_digest(ref.path(runs_root)),
                            bags.files_key(patients))
            path = cache_path(runs_root, "transferability", "zero_shot", t, s)
            risk = read_cached(path, key)
            if risk is None:
                if s not in models:
                    models[s] = load_artefact(ref.path(runs_root), device="cpu")[0]
                if progress:
                    log.info("zero-shot %s -> %s (%d patients)", s, t, len(patients))
                risk = dict(zip(patients, _risks(models[s], bags, patients).tolist()))
                write_cached(path, key, risk)
            risk = pd.Series(risk)
            for r in target_runs:
                rows += _scores(preds[r.fold], risk, r, s)
    return pd.DataFrame(rows, columns=COLUMNS)


def transfer_matrix(table: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Mean C-index over folds: rows = sources (``own`` renamed to the target on the
    diagonal), columns = targets."""
    t = table[table["split"] == split].copy()
    t["source"] = np.where(t["source"] == OWN, t["target"], t["source"])
    m = t.groupby(["source", "target"])["c_index"].mean().unstack("target")
    names = sorted(set(m.index) | set(m.columns))
    return m.reindex(index=names, columns=names)


def _eta_squared(values: pd.Series, groups: pd.Series) -> float:
    total = float(((values - values.mean()) ** 2).sum())
    if total == 0:
        return float("nan")
    means = values.groupby(groups).transform("mean")
    return float(((means - values.mean()) ** 2).sum() / total)


def transfer_statistics(matrix: pd.DataFrame) -> dict[str, Any]:
    """Statistics of a :func:`transfer_matrix` (see the module docstring)."""
    names = [n for n in matrix.columns if n in matrix.index]
    own = pd.Series({t: matrix.loc[t, t] for t in names}, dtype=float)
    pairs = [(s, t, matrix.loc[s, t]) for s in matrix.index for t in matrix.columns
             if s != t and np.isfinite(matrix.loc[s, t])]
    off = pd.DataFrame(pairs, columns=["source", "target", "c"])
    out: dict[str, Any] = {"targets": len(names), "pairs": len(off)}
    if off.empty:
        return out
    c = off["c"]
    out.update({
        "own_mean": float(own.mean()), "own_sd": float(own.std(ddof=1)) if len(own) > 1 else
        float("nan"), "own_min": float(own.min()), "own_max": float(own.max()),
        "zero_shot_mean": float(c.mean()), "zero_shot_sd": float(c.std(ddof=1)),
        "share_above_0.50": float((c > 0.5).mean()), "share_above_0.55": float((c > 0.55).mean()),
        "share_above_0.60": float((c > 0.60).mean()),
        "variance_by_target": _eta_squared(c, off["target"]),
        "variance_by_source": _eta_squared(c, off["source"]),
    })
    sym = [(matrix.loc[a, b], matrix.loc[b, a]) for a, b in itertools.combinations(names, 2)
           if np.isfinite(matrix.loc[a, b]) and np.isfinite(matrix.loc[b, a])]
    out["symmetry_corr"] = (float(np.corrcoef(np.array(sym).T)[0, 1]) if len(sym) > 2
                            else float("nan"))
    best = off.loc[off.groupby("target")["c"].idxmax()].set_index("target")
    gap = best["c"] - own.reindex(best.index)
    out["best_source"] = best["source"].to_dict()
    out["best_source_gap_mean"] = float(gap.mean())
    out["best_source_beats_own"] = int((gap > 0).sum())
    out["mutual_best_pairs"] = sorted({tuple(sorted((t, s))) for t, s in out["best_source"].items()
                                       if out["best_source"].get(s) == t})
    return out


STATISTIC_NAMES = {
    "own_mean": "cancer-specific C-index, mean over targets",
    "own_sd": "cancer-specific C-index, sd over targets",
    "own_min": "cancer-specific C-index, lowest target",
    "own_max": "cancer-specific C-index, highest target",
    "zero_shot_mean": "zero-shot C-index, mean over pairs",
    "zero_shot_sd": "zero-shot C-index, sd over pairs",
    "share_above_0.50": "share of pairs above 0.50",
    "share_above_0.55": "share of pairs above 0.55",
    "share_above_0.60": "share of pairs above 0.60",
    "variance_by_target": "variance explained by the target",
    "variance_by_source": "variance explained by the source",
    "symmetry_corr": "symmetry: corr(M[s,t], M[t,s])",
    "best_source_gap_mean": "best source minus own model, mean",
    "best_source_beats_own": "targets whose best source beats their own model",
}


def statistics_table(stats: dict[str, Any]) -> pd.DataFrame:
    """:func:`transfer_statistics` as rows (statistic, value)."""
    rows = [{"statistic": STATISTIC_NAMES[k], "key": k, "value": stats[k]}
            for k in STATISTIC_NAMES if k in stats]
    if "mutual_best_pairs" in stats:
        rows.append({"statistic": "pairs that are each other's best source",
                     "key": "mutual_best_pairs",
                     "value": ", ".join("-".join(p) for p in stats["mutual_best_pairs"]) or "none"})
    return pd.DataFrame(rows, columns=["statistic", "key", "value"])


def helpful_sources(table: pd.DataFrame, target: str, fold: int, repeat: int = 0,
                    threshold: float = 0.5) -> list[str]:
    """The sources whose zero-shot C-index on the target fold's *training* patients is above
    ``threshold``, best first (what a choice may use)."""
    t = table[(table["target"] == target) & (table["fold"] == fold) & (table["repeat"] == repeat)
              & (table["split"] == "train") & (table["source"] != OWN)]
    t = t[t["c_index"] > threshold].sort_values("c_index", ascending=False)
    return t["source"].tolist()


def merge_probes(runs_root: str | Path, data_root: str | Path, target: RunRef,
                 sources: Sequence[str], loss_alpha: float | None = None, seed: int = 0
                 ) -> pd.DataFrame:
    """Fixed-merge probes of ``target`` (a cancer-specific run of fold k): for ``none`` (the
    target's model theta_0 + tau_t) and each source s (theta_0 + tau_t + tau_s), a linear
    proportional-hazards read-out of the merged encoder's bag embeddings fitted on the fold's
    training patients, scored on its test patients (``c_index``) and by inner cross-validation
    on the training patients (``train_cv_c_index``)."""
    from steph.analysis.runs import run_config
    from steph.merging.baselines import merged_network
    from steph.merging.pool import ModelPool
    from steph.runs import RunsFolder
    from steph.survival.baseline import baseline_hazard_logits
    from steph.survival.bins import TimeBins
    from steph.training.head_start import fit_ph_head

    runs = RunsFolder(runs_root)
    cfg = run_config(target.path(runs_root))
    alpha = cfg.train.loss_alpha if loss_alpha is None else loss_alpha
    arch = target.method
    pred = read_predictions(target.path(runs_root))
    bags = RunBags(runs_root, data_root, target)
    key = cache_key("probe", weights_digest(target.path(runs_root)),
                    [weights_digest(RunRef(s, arch, 0).path(runs_root)) for s in sources],
                    bags.files_key(list(pred["patient_id"])), alpha, seed)
    path = cache_path(runs_root, "transferability", "probes", target.cohort,
                      f"{arch}-rep{target.repeat}-fold{target.fold}")
    cached = read_cached(path, key)
    if cached is not None:
        return pd.DataFrame(cached)
    from steph.analysis.runs import read_manifest
    from steph.experiments.workspace import load_theta0

    _, meta = load_theta0(runs, arch)
    pool = ModelPool.from_files(runs.theta0(arch), (target.cohort, runs.run(target).weights),
                                [(s, runs.run(RunRef(s, arch, 0)).weights) for s in sources],
                                hparams=meta["hparams"], arch=arch)
    bins = TimeBins.from_dict(read_manifest(target.path(runs_root))["bins"])
    names = pool.encoder_names
    tau_t, taus = pool.task_vectors(names)
    train = pred[pred["split"] == "train"]
    test = pred[pred["split"] == "test"]
    b = bins.to_bins(train["time"].to_numpy(float))
    e, times = train["event"].to_numpy(int), train["time"].to_numpy(float)
    base = baseline_hazard_logits(b, e, bins.n_bins)
    rows = []
    for name, extra in [("none", None), *zip(sources, taus)]:
        state = dict(pool.target)
        for n in names:
            state[n] = pool.theta0[n] + tau_t[n] + (extra[n] if extra is not None else 0.0)
        net = merged_network(state, meta["hparams"], arch).eval()
        with torch.no_grad():
            z = {pid: net.head_input(bags.bag(pid), **bags.bag_inputs(pid, net.bag_inputs))
                 .reshape(-1).double() for pid in pred["patient_id"]}
        z_train = torch.stack([z[p] for p in train["patient_id"]])
        w, c, info = fit_ph_head(z_train, b, e, times, base, alpha, seed=seed)
        z_test = torch.stack([z[p] for p in test["patient_id"]])
        risk = (z_test @ w[0].double()).numpy()
        rows.append({"target": target.cohort, "fold": target.fold, "repeat": target.repeat,
                     "source": name,
                     "c_index": concordance_index_or_nan(test["time"], test["event"], risk),
                     "train_cv_c_index": float(np.nanmax(list(info["head_cv_cindex"].values())))})
    write_cached(path, key, rows)
    return pd.DataFrame(rows)


def zero_shot_text(runs_root: str | Path, data_root: str | Path, target: str) -> str:
    """Which cohorts can help the target: each source's fold-0 ABMIL applied unchanged to the
    target's test patients (zero-shot C-index, mean over folds) next to the target's own model
    (``steph analyze transferability`` for the whole matrix)."""
    table = zero_shot_table(runs_root, data_root, targets=[target])
    test = table[table["split"] == "test"]
    if test["source"].nunique() < 2:
        return ""
    mean = test.groupby("source")["c_index"].mean()
    own = mean.pop(OWN)
    fam = families(data_root)
    lines = [(f"Which cohorts can help {target} (zero-shot: each source's ABMIL applied unchanged "
             f"to {target}'s test patients, mean C-index over {test['fold'].nunique()} folds; "
             f"{target}'s own ABMIL {own:.3f}):")]
    for name, value in mean.sort_values(ascending=False).items():
        tag = ""
        if target in fam and name in fam:
            tag = " (related)" if fam[name] == fam[target] else " (unrelated)"
        lines.append(f"  {name:8s} {value:.3f}{tag}")
    return "\n".join(lines)
