"""``steph demo``: the project's main job. Generates the ``demo`` synthetic cohorts (unless they
exist), cross-validates every method on the target cohort, prints the table, the paired
comparison with cancer-specific ABMIL and the sources STEPH weighted most. Sized to finish within
ten minutes on two CPU cores, with steph's default settings (nothing tuned for the demo)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from steph.config import ExperimentConfig, build_config
from steph.data import synthetic
from steph.experiments.cv import run_cv
from steph.methods import resolve_methods
from steph.runs import RunsFolder

DEMO_TARGET = "ALPHA"

# Performance settings only (neither is part of a run's identity): bags stay in memory (the
# cohorts are tiny) and the test C-index is computed at the last epoch only.
DEMO_CONFIG = {"data": {"cache_mb": 512}, "train": {"eval_every": 0}}


def demo_methods() -> list[str]:
    from steph.methods import list_methods

    # Left to `steph cv` to keep the demo within ten minutes (a fresh clone with TIES AM and
    # Surgery AM took 637 s, ~55 s of it each): the ablations, the AdaMerging variants (TIES
    # AM, Iso-C / Iso-CTS AM, Surgery AM; AdaMerging stands for them), the other MIL networks
    # (Table S2), steph_xfit (five inner target models per run) and joint (an epoch over every
    # cohort: ~8x an ABMIL run here, 488 s against 15-50 s per fold on a busy machine).
    skip = {"steph_lambda1", "steph_free_lambda", "steph_dense", "steph_free_w", "steph_xfit",
            "ties_am", "isoc_am", "isocts_am", "surgery_am", "transmil", "ilra", "r2t_mil",
            "patch_gcn", "joint"}
    return [m for m in list_methods() if m not in skip]


def source_weights(runs_root: str | Path, target: str = DEMO_TARGET,
                   method: str = "steph") -> pd.DataFrame:
    """Coefficient of every source's own task vector in STEPH's merge, w (1 - lambda), mean over
    the last epoch's bags, per fold (rows) and source (columns), from the runs' log.jsonl (a log
    written before steph logged it: mean w x (1 - mean lambda)). w alone would also count the
    target's share: a source slot with lambda = 1 merges tau_t only."""
    rows = {}
    for ref, run in RunsFolder(runs_root).walk():
        if (ref.cohort, ref.method, ref.repeat) != (target, method, 0):
            continue
        history = run.read_log()
        if not (history and run.manifest.exists()):
            continue
        last = history[-1]
        sources = run.read_manifest()["settings"]["sources"]
        if "mean_source_coef" in last:
            rows[run.path.name] = dict(zip(sources, last["mean_source_coef"]))
        elif "mean_w" in last:
            rows[run.path.name] = {s: w * (1 - lam) for s, w, lam in
                              zip(sources, last["mean_w"], last["mean_lambda"])}
    return pd.DataFrame.from_dict(rows, orient="index")


def family_of(data_root: str | Path) -> dict[str, str]:
    """Cohort -> family of a synthetic data root (from synth.json); {} for real data."""
    return synthetic.families(data_root)


def top_sources_text(runs_root: str | Path, data_root: str | Path,
                     target: str = DEMO_TARGET) -> str:
    w = source_weights(runs_root, target)
    if w.empty:
        return ""
    fam = family_of(data_root)
    mean = w.mean().sort_values(ascending=False)
    lines = [(f"Sources STEPH weighted most on {target}: coefficient w (1 - lambda) of each "
             f"source's task vector (last epoch, mean over {len(w)} folds):")]
    for name, value in mean.items():
        tag = ""
        if fam:
            tag = " (related)" if fam.get(name) == fam.get(target) else " (unrelated)"
        lines.append(f"  {name:8s} {value:.3f}{tag}")
    return "\n".join(lines)


def run_demo(out: str | Path, methods: Sequence[str] | None = None, folds: str | None = None,
             epochs: int | None = None, progress: bool = True,
             echo: Callable[[str], None] = print, cfg: ExperimentConfig | None = None,
             zero_shot_text: Callable[[Path, Path, str], str] | None = None):
    """``zero_shot_text(runs, data, target)``: the transferability summary printed before the
    sources STEPH used (the CLI passes ``steph.analysis.transferability.zero_shot_text``; the
    analysis layer sits above this one)."""
    from steph.experiments.compare import comparison_markdown
    from steph.experiments.summary import (
        collect_timing,
        input_runs_line,
        markdown_table,
        timing_table,
    )

    out = Path(out)
    data_root, runs_root = out / "data", out / "runs"
    t0 = time.perf_counter()
    if not (data_root / "synth.json").exists():
        echo(f"generating the demo cohorts in {data_root} ...")
        synthetic.generate(synthetic.preset("demo"), data_root, seed=0, overwrite=True,
                           progress=progress)
    cfg = cfg or build_config(DEMO_CONFIG)
    if epochs is not None:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs})})
    names = resolve_methods(list(methods) if methods else demo_methods())
    summary = run_cv(data_root, runs_root, names, targets=[DEMO_TARGET], folds=folds, cfg=cfg,
                     progress=progress)
    echo("")
    echo(markdown_table(summary, names))
    inputs = input_runs_line(runs_root)
    if inputs:
        echo(inputs + "\n")
    comparisons = RunsFolder(runs_root) / RunsFolder.COMPARISONS_CSV
    if comparisons.exists():
        echo(comparison_markdown(pd.read_csv(comparisons)))
    # the zero-shot map needs the target's own ABMIL runs
    zero_shot = ""
    if zero_shot_text is not None and "abmil" in names:
        zero_shot = zero_shot_text(runs_root, data_root, DEMO_TARGET)
    for text in (zero_shot, top_sources_text(runs_root, data_root)):
        if not text:
            continue
        echo(text)
        echo("")
    echo(timing_table(collect_timing(runs_root, summary)))
    echo(f"demo finished in {time.perf_counter() - t0:.0f} s; tables and plot in {runs_root}")
    return summary
