"""``steph analyze landscape | sar | attention``: one analysis of a runs folder, its tables as
CSV and its figure as PNG and SVG in ``RUNS/analysis/`` (or ``dest``); the computations are
cached as for the report, so the report reuses them (and these commands reuse the report's)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from steph.analysis import runs as R
from steph.errors import ConfigError
from steph.utils.io import write_csv
from steph.utils.plotting import save_figure

ANALYSIS_DIR = "analysis"


@dataclass
class Written:
    """What an analysis command wrote, and its table."""

    table: pd.DataFrame
    files: list[Path] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # a summary to print


def _dest(runs_root: str | Path, dest: str | Path | None) -> Path:
    return Path(dest) if dest is not None else Path(runs_root) / ANALYSIS_DIR


def steph_run(runs_root: str | Path, target: str, method: str = "steph",
              fold: int | None = None, repeat: int = 0) -> R.RunRef:
    """The finished STEPH run of ``target`` (its lowest finished fold when ``fold`` is None)."""
    inventory = R.run_inventory(runs_root)
    runs = [r for r in R.finished_runs(inventory, method=method, cohort=target)
            if r.repeat == repeat and (fold is None or r.fold == fold)]
    if not runs:
        have = R.finished_runs(inventory, method=method)
        listing = ", ".join(map(str, have)) or "none"
        raise ConfigError(f"no finished {method} run of cohort {target!r}"
                          f"{'' if fold is None else f' fold {fold}'} in {runs_root} "
                          f"(finished {method} runs: {listing})")
    return min(runs, key=lambda r: r.fold)


def check_device(device: str) -> None:
    import torch

    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")


def analyze_landscape(runs_root: str | Path, data_root: str | Path, target: str,
                      fold: int | None = None, sources: Sequence[str] | None = None,
                      top: int = 2, method: str = "steph", step: float = 0.04,
                      device: str = "cpu", progress: bool = True,
                      dest: str | Path | None = None) -> Written:
    """Landscapes of ``target`` with ``sources`` (default: the ``top`` sources of the STEPH
    run by final w) on the test patients of ``fold``; writes
    ``landscape-<target>-fold<k>.{png,svg,csv}``."""
    from steph.analysis.dynamics import sources_of, top_sources
    from steph.analysis.landscape import landscape_summary, steph_landscapes
    from steph.report.figures import landscape_figure

    check_device(device)
    run = steph_run(runs_root, target, method, fold)
    known = sources_of(runs_root, run)
    chosen = list(sources) if sources else top_sources(runs_root, run, top)
    unknown = [s for s in chosen if s not in known]
    if unknown:
        raise ConfigError(f"{unknown} are not sources of {run} (its sources: {', '.join(known)})")
    lands = steph_landscapes(runs_root, data_root, run, chosen, step=step, device=device,
                             progress=progress)
    stem = _dest(runs_root, dest) / f"landscape-{target}-fold{run.fold}"
    table = pd.concat([ls.table().assign(target=target, fold=run.fold, source=ls.source)
                       for ls in lands], ignore_index=True)
    out = Written(table[["target", "fold", "source", "c_s", "c_t", "loss", "loss_smoothed"]])
    write_csv(stem.with_suffix(".csv"), out.table)
    out.files = [*save_figure(landscape_figure(lands), stem).values(), stem.with_suffix(".csv")]
    for r in landscape_summary(lands).itertuples(index=False):
        out.lines.append(f"{target} fold {run.fold} x {r.source}: lowest smoothed test loss "
                         f"{r.loss:.4f} at C_s={r.c_s:.2f}, C_t={r.c_t:.2f}; on the mixup "
                         f"segment {r.mixup_loss:.4f} at lambda={r.mixup_lambda:.2f}; STEPH's "
                         f"final lambda {r.steph_lambda:.3f}")
    return out


def analyze_sar(runs_root: str | Path, target: str, fold: int | None = None,
                method: str = "steph", alpha: float = 0.95,
                dest: str | Path | None = None) -> Written:
    """SAR curves of every source of the STEPH run; writes ``sar-<target>-fold<k>.{png,svg,csv}``."""
    from steph.analysis.sar import sar_at_steph, steph_sar
    from steph.report.figures import sar_figure

    run = steph_run(runs_root, target, method, fold)
    table = steph_sar(runs_root, run, alpha=alpha)
    stem = _dest(runs_root, dest) / f"sar-{target}-fold{run.fold}"
    write_csv(stem.with_suffix(".csv"), table)
    out = Written(table, [*save_figure(sar_figure(table), stem).values(), stem.with_suffix(".csv")])
    for r in sar_at_steph(table).rename(columns={"lambda": "lam"}).itertuples(index=False):
        out.lines.append(f"{target} fold {run.fold}, {r.source}, {r.layer}: SAR {r.sar:.3f} at "
                         f"STEPH's lambda {r.lam:.3f}")
    return out


def analyze_attention(runs_root: str | Path, data_root: str | Path, slides: Sequence[str],
                      target: str | None = None, fold: int | None = None,
                      method: str = "steph", dest: str | Path | None = None) -> Written:
    """Attention maps of ``slides`` (test slides of a target of a STEPH run; the fold whose test
    patients include the slide's patient unless ``fold`` is given); writes
    ``attention-<slide>.{png,svg,csv}`` per slide."""
    from steph.analysis.attention import attention_table, locate_slide
    from steph.report.figures import attention_figure

    inventory = R.run_inventory(runs_root)
    runs = [r for r in R.finished_runs(inventory, method=method)
            if r.repeat == 0 and (target is None or r.cohort == target)
            and (fold is None or r.fold == fold)]
    if not runs:
        raise ConfigError(f"no finished {method} run{'' if target is None else f' of {target!r}'}"
                          f"{'' if fold is None else f' fold {fold}'} in {runs_root}")
    tables, files, lines = [], [], []
    for slide in slides:
        run = locate_slide(runs_root, data_root, runs, slide)
        table = attention_table(runs_root, data_root, run, slide)
        stem = _dest(runs_root, dest) / f"attention-{slide}"
        write_csv(stem.with_suffix(".csv"), table)
        files += [*save_figure(attention_figure(table), stem).values(), stem.with_suffix(".csv")]
        tables.append(table)
        lines.append(f"{slide}: {len(table)} patches, test patient of {run}")
    return Written(pd.concat(tables, ignore_index=True), files, lines)


def analyze_transferability(runs_root: str | Path, data_root: str | Path, arch: str = "abmil",
                            targets: Sequence[str] | None = None,
                            sources: Sequence[str] | None = None, probes: bool = False,
                            progress: bool = False, dest: str | Path | None = None) -> Written:
    """The zero-shot transfer matrix of every source model on every target (see
    :mod:`steph.analysis.transferability`); writes ``transferability.csv`` (per target, source,
    fold and split), ``transferability-matrix.csv``, ``transferability-statistics.csv``, the
    heatmap ``transferability.{png,svg}`` and, with ``probes``, ``transferability-probes.csv``
    (fixed-merge probes of every target fold and source)."""
    from steph.analysis import transferability as T
    from steph.report.figures import transferability_figure

    table = T.zero_shot_table(runs_root, data_root, arch, targets, sources, progress=progress)
    matrix = T.transfer_matrix(table)
    stats = T.transfer_statistics(matrix)
    stats_table = T.statistics_table(stats)
    folder = _dest(runs_root, dest)
    stem = folder / "transferability"
    write_csv(stem.with_suffix(".csv"), table)
    write_csv(folder / "transferability-matrix.csv", matrix.reset_index(names="source"))
    write_csv(folder / "transferability-statistics.csv", stats_table)
    out = Written(table, [*save_figure(transferability_figure(matrix), stem).values(),
                          stem.with_suffix(".csv"), folder / "transferability-matrix.csv",
                          folder / "transferability-statistics.csv"])
    for r in stats_table.itertuples(index=False):
        value = f"{r.value:.3f}" if isinstance(r.value, float) else str(r.value)
        out.lines.append(f"{r.statistic}: {value}")
    for target in matrix.columns:
        col = matrix[target].drop(target, errors="ignore").dropna().sort_values(ascending=False)
        if len(col):
            out.lines.append(f"{target}: own {matrix.loc[target, target]:.3f}; sources by "
                             "zero-shot test C: " + ", ".join(f"{s} {c:.3f}"
                                                               for s, c in col.items()))
    if probes:
        inv = R.run_inventory(runs_root)
        runs = [r for r in R.finished_runs(inv, method=arch) if r.cohort in matrix.columns
                and r.repeat == 0]
        frames = [T.merge_probes(runs_root, data_root, r,
                                 [s for s in matrix.index if s != r.cohort and s in
                                  set(table["source"])]) for r in runs]
        probe_table = pd.concat(frames, ignore_index=True)
        write_csv(folder / "transferability-probes.csv", probe_table)
        out.files.append(folder / "transferability-probes.csv")
        gain = (probe_table.pivot_table(index=["target", "fold"], columns="source",
                                        values="c_index"))
        gain = gain.sub(gain["none"], axis=0).drop(columns="none").groupby("target").mean()
        for target, row in gain.iterrows():
            row = row.dropna().sort_values(ascending=False)
            out.lines.append(f"{target}: fixed-merge probe gain over its own encoder (test C, "
                             "mean over folds): " + ", ".join(f"{s} {g:+.3f}" for s, g in
                                                              row.items()))
    return out
