"""The report's figures, each a function of tables (from :mod:`steph.analysis` and
:mod:`steph.experiments`) returning a :class:`matplotlib.figure.Figure` in steph's one style
(:mod:`steph.utils.plotting`): axes labelled with units, legends naming cohorts and methods,
series told apart by line style, marker or hatch (readable in greyscale), and a panel only where
there is data. Every function raises ``NothingToDraw`` (a ``ValueError``) when given nothing
to draw.

    fig = km_figure(risk_groups(runs, runs_of_abmil + runs_of_steph))
    save_figure(fig, "km")   # km.png, km.svg
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from steph.experiments.summary import cindex_figure
from steph.utils.plotting import (
    COLOURS,
    LINESTYLES,
    MARKERS,
    NothingToDraw,
    bar_style,
    new_figure,
    panel_grid,
    series_style,
    styled,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "attention_figure",
    "cindex_figure",
    "dynamics_figure",
    "efficiency_figure",
    "forest_figure",
    "km_figure",
    "landscape_figure",
    "sar_figure",
    "selection_figure",
    "transferability_figure",
]

SEQUENTIAL = "viridis"  # lightness rises monotonically: readable in greyscale


def _need(frame, what: str) -> None:
    if frame is None or len(frame) == 0:
        raise NothingToDraw(f"nothing to draw: no {what}")


def _fmt_p(p: float) -> str:
    if not np.isfinite(p):
        return "p = n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


# -- results ------------------------------------------------------------------------------------

def forest_figure(comparisons: pd.DataFrame) -> Figure:
    """Each method's difference of the test C-index to the baseline, per cohort: the pooled
    out-of-fold difference with its 95 % patient-bootstrap interval (``compare_methods``), and
    per method the mean of its per-cohort differences over cohorts (a diamond)."""
    from steph.experiments.compare import ALL

    _need(comparisons, "comparison with the baseline")
    per = comparisons[comparisons["cohort"] != ALL]
    across = comparisons[comparisons["cohort"] == ALL]
    _need(per, "comparison with the baseline")
    baseline = str(comparisons["baseline"].iloc[0])
    methods = list(dict.fromkeys(per["method"]))
    cohorts = list(dict.fromkeys(per["cohort"]))
    rows: list[tuple[str, str, float, float, float, bool]] = []
    for cohort in cohorts:
        for m in methods:
            hit = per[(per["cohort"] == cohort) & (per["method"] == m)]
            if len(hit):
                r = hit.iloc[0]
                rows.append((cohort, m, r["pooled_diff"], r["ci_low"], r["ci_high"], False))
    if len(cohorts) > 1:
        for m in methods:
            hit = across[across["method"] == m]
            if len(hit):
                rows.append(("mean over cohorts", m, hit.iloc[0]["mean_diff"], np.nan, np.nan,
                             True))
    fig = new_figure(6.5, 0.32 * len(rows) + 1.3)
    with styled(fig):
        ax = fig.add_subplot(1, 1, 1)
        seen = set()
        for y, (cohort, m, d, lo, hi, is_all) in enumerate(rows):
            i = methods.index(m)
            if np.isfinite(lo) and np.isfinite(hi):
                ax.plot([lo, hi], [y, y], color="black", linewidth=1.2,
                        linestyle=LINESTYLES[i % len(LINESTYLES)])
            ax.plot([d], [y], marker="D" if is_all else MARKERS[i % len(MARKERS)],
                    markersize=8 if is_all else 6, color=COLOURS[i % len(COLOURS)],
                    markeredgecolor="black", linestyle="none",
                    label=None if m in seen else m)
            seen.add(m)
        ax.axvline(0.0, color="grey", linewidth=1.0, linestyle=":")
        ax.set_yticks(range(len(rows)), [f"{c} · {m}" for c, m, *_ in rows])
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_ylabel("cohort · method")
        ax.set_xlabel(f"difference of test C-index to {baseline} (pooled out-of-fold; "
                      "line: 95 % bootstrap interval)")
        ax.legend(title="method", loc="best", frameon=False)
    return fig


# -- survival by risk ---------------------------------------------------------------------------

def km_figure(groups: pd.DataFrame, methods: Sequence[str] | None = None) -> Figure:
    """Kaplan-Meier curves of the test patients in the high- and low-risk groups (median of the
    training risks as the cut, pooled over folds; ``risk_groups``), one panel per cohort and
    method, with the log-rank p-value."""
    from steph.analysis.survival import HIGH, LOW, km_curve, logrank_p

    _need(groups, "test predictions")
    order = list(methods or dict.fromkeys(groups["method"]))
    pairs = [(c, m) for c in dict.fromkeys(groups["cohort"]) for m in order
             if ((groups["cohort"] == c) & (groups["method"] == m)).any()]
    ncols = min(len(pairs), max(1, len({m for _, m in pairs})), 3)
    nrows = math.ceil(len(pairs) / ncols)
    fig = new_figure(3.3 * ncols, 2.9 * nrows)
    with styled(fig):
        axes = panel_grid(fig, len(pairs), ncols)
        for ax, (cohort, method) in zip(axes, pairs):
            sub = groups[(groups["cohort"] == cohort) & (groups["method"] == method)]
            for k, (group, ls) in enumerate(((HIGH, "-"), (LOW, "--"))):
                g = sub[sub["group"] == group]
                if g.empty:
                    continue
                curve = km_curve(g["time"].to_numpy(float), g["event"].to_numpy(int))
                colour = COLOURS[2 * k + 2]
                ax.step(curve["time"], curve["survival"], where="post", color=colour,
                        linestyle=ls, linewidth=1.5,
                        label=f"{group} (n = {len(g)}, {int(g['event'].sum())} events)")
                ax.fill_between(curve["time"], curve["lower"], curve["upper"], step="post",
                                color=colour, alpha=0.12, linewidth=0)
                cens = g[g["event"] == 0]["time"].to_numpy(float)
                if len(cens):
                    at = np.interp(cens, curve["time"], curve["survival"], left=1.0)
                    ax.plot(cens, at, linestyle="none", marker="|", markersize=6, color=colour)
            ax.set_ylim(0, 1.02)
            ax.set_xlim(left=0)
            ax.set_xlabel("time (days)")
            ax.set_ylabel("survival probability")
            ax.set_title(f"{cohort} · {method}: {sub['fold'].nunique()} fold(s), "
                         f"{_fmt_p(logrank_p(sub))} (log-rank)")
            ax.legend(loc="lower left", frameon=False, fontsize=7)
    return fig


# -- STEPH --------------------------------------------------------------------------------------

def dynamics_figure(dynamics: pd.DataFrame) -> Figure:
    """Mean merge weight w and mixup coefficient lambda of every source per training epoch
    (appendix D.1, Figures S1 and S2), averaged over folds: two panels per STEPH run group."""
    _need(dynamics, "STEPH training log")
    groups = list(dynamics.groupby(["cohort", "method"], sort=False))
    fig = new_figure(7.0, 2.8 * len(groups) + 0.3)
    with styled(fig):
        axes = panel_grid(fig, 2 * len(groups), 2)
        for g, ((cohort, method), sub) in enumerate(groups):
            mean = sub.groupby(["source", "epoch"], sort=False)[["w", "lambda"]].mean()
            folds = sub["fold"].nunique()
            for p, (col, label) in enumerate((("w", "mean merge weight w"),
                                              ("lambda", "mean mixup coefficient λ"))):
                ax = axes[2 * g + p]
                for i, source in enumerate(dict.fromkeys(sub["source"])):
                    series = mean.loc[source][col]
                    ax.plot(series.index, series.to_numpy(), markersize=4, linewidth=1.3,
                            label=source, **series_style(i))
                ax.set_xlabel("epoch")
                ax.set_ylabel(f"{label} (training bags)")
                ax.set_title(f"target {cohort} · {method}: {label.split()[-1]} "
                             f"({folds} fold(s), mean)")
                if col == "lambda":
                    ax.set_ylim(-0.02, 1.02)
                else:
                    ax.set_ylim(bottom=0)
            axes[2 * g].legend(title="source cohort", frameon=False, fontsize=7)
    return fig


def selection_figure(frequency: pd.DataFrame, on: str = "test patients") -> Figure:
    """How often each source was among STEPH's K selected ones (``selection_frequency`` or the
    training log's last epoch), one panel per target and method; bars are hatched by source."""
    _need(frequency, "selections")
    col = "selected_share" if "selected_share" in frequency else "selected"
    groups = list(frequency.groupby(["cohort", "method"], sort=False))
    fig = new_figure(min(7.0, 3.5 * len(groups)) if len(groups) > 1 else 4.5,
                     2.9 * math.ceil(len(groups) / 2))
    with styled(fig):
        axes = panel_grid(fig, len(groups), 2)
        for ax, ((cohort, method), sub) in zip(axes, groups):
            sources = list(sub["source"])
            for i, (source, share) in enumerate(zip(sources, sub[col].to_numpy(float))):
                ax.bar(i, 100.0 * share, width=0.7, **bar_style(i))
                ax.text(i, 100.0 * share + 1.5, f"{100 * share:.0f}", ha="center", fontsize=7)
            ax.set_xticks(range(len(sources)), sources, rotation=30, ha="right")
            ax.set_ylim(0, 110)
            ax.set_xlabel("source cohort")
            ax.set_ylabel(f"selected (% of {on})")
            ax.set_title(f"target {cohort} · {method}")
    return fig


def landscape_figure(landscapes: Sequence, sigma: float = 1.0) -> Figure:
    """The smoothed test loss of theta_0 + C_s tau_s + C_t tau_t (appendix C.2.3), one panel per
    source: contours, the mixup segment C_s + C_t = 1, the path of STEPH's mean lambda over the
    epochs (circles, the last one filled), the lowest point (star) and the lowest point on the
    mixup segment (square)."""
    from matplotlib import colors as mcolors

    _need(landscapes, "loss landscape")
    zs = [ls.smoothed(sigma) for ls in landscapes]
    norm = mcolors.Normalize(vmin=min(float(z.min()) for z in zs),
                             vmax=max(float(z.max()) for z in zs))
    ncols = min(3, len(landscapes))
    nrows = math.ceil(len(landscapes) / ncols)
    fig = new_figure(3.2 * ncols + 0.8, 3.0 * nrows + 0.3)
    with styled(fig):
        axes = panel_grid(fig, len(landscapes), ncols)
        image = None
        for ax, ls, z in zip(axes, landscapes, zs):
            c = ls.coefficients
            half = (c[1] - c[0]) / 2 if len(c) > 1 else 0.02
            image = ax.imshow(z, origin="lower", cmap=SEQUENTIAL, norm=norm, aspect="equal",
                              extent=(c[0] - half, c[-1] + half, c[0] - half, c[-1] + half))
            cs = ax.contour(c, c, z, levels=8, colors="white", linewidths=0.6)
            ax.clabel(cs, fontsize=6, fmt="%.3f")
            ax.plot([0, 1], [1, 0], color="white", linestyle="--", linewidth=1.0)
            ax.plot([0, 1], [1, 0], color="black", linestyle=(0, (2, 4)), linewidth=1.0,
                    label="mixup: C_s + C_t = 1")
            if len(ls.path):
                lam = ls.path["lambda"].to_numpy(float)
                ax.plot(1 - lam, lam, color="black", marker="o", markersize=4,
                        markerfacecolor="white", linewidth=1.0, label="STEPH λ per epoch")
                ax.plot(1 - lam[-1:], lam[-1:], color="black", marker="o", markersize=6,
                        linestyle="none")
            s_min, t_min, _ = ls.minimum()
            ax.plot([s_min], [t_min], marker="*", markersize=12, color="white",
                    markeredgecolor="black", linestyle="none", label="lowest loss")
            lam_min, _ = ls.mixup_minimum()
            ax.plot([1 - lam_min], [lam_min], marker="s", markersize=7, color="white",
                    markeredgecolor="black", linestyle="none", label="lowest on mixup")
            ax.set_xlim(c[0] - half, c[-1] + half)
            ax.set_ylim(c[0] - half, c[-1] + half)
            ax.set_xlabel(f"C_s, coefficient of τ_s ({ls.source})")
            ax.set_ylabel(f"C_t, coefficient of τ_t ({ls.target})")
            ax.set_title(f"{ls.target} fold {ls.fold} × {ls.source} ({ls.n_patients} test patients)")
            ax.grid(False)
        axes[0].legend(loc="upper right", fontsize=6, framealpha=0.85)
        fig.colorbar(image, ax=axes, shrink=0.85,
                     label=f"test loss (survival NLL, Gaussian-smoothed, σ = {sigma:g} step)")
    return fig


def sar_figure(sar: pd.DataFrame) -> Figure:
    """SAR(tau_t, lambda tau_t + (1 - lambda) tau_s) over lambda, one panel per encoder matrix
    and STEPH run, a line per source and STEPH's final lambda as a large marker (Figure 5)."""
    _need(sar, "subspace alignment ratio")
    keys = list(dict.fromkeys(zip(sar["cohort"], sar["fold"], sar["layer"])))
    ncols = min(3, len(keys))
    fig = new_figure(3.0 * ncols + 0.3, 2.8 * math.ceil(len(keys) / ncols) + 0.4)
    with styled(fig):
        axes = panel_grid(fig, len(keys), ncols)
        for ax, (cohort, fold, layer) in zip(axes, keys):
            sub = sar[(sar["cohort"] == cohort) & (sar["fold"] == fold) & (sar["layer"] == layer)]
            for i, source in enumerate(dict.fromkeys(sub["source"])):
                st = series_style(i)
                curve = sub[(sub["source"] == source) & (sub["kind"] == "curve")]
                ax.plot(curve["lambda"], curve["sar"], linewidth=1.3, markersize=3,
                        label=source, markevery=4, **st)
                point = sub[(sub["source"] == source) & (sub["kind"] == "steph")]
                if len(point):
                    ax.plot(point["lambda"], point["sar"], marker=st["marker"], markersize=9,
                            color=st["color"], markeredgecolor="black", linestyle="none")
            ax.set_ylim(-0.02, 1.05)
            ax.set_xlim(-0.03, 1.03)
            ax.set_xlabel("λ, weight of τ_t in τ_mix")
            ax.set_ylabel("SAR(τ_t, τ_mix)")
            ax.set_title(f"{cohort} fold {fold}: {layer}")
        axes[0].legend(title="source (large: STEPH's λ)", fontsize=7, frameon=False)
    return fig


def attention_figure(table: pd.DataFrame) -> Figure:
    """The attention maps of one slide side by side, one panel per model (the
    ``attention_<method>`` columns of ``attention_table``), each as percentiles within the
    slide on one shared colour scale, at the patches' coordinates."""
    _need(table, "patches")
    models = [c for c in table.columns if c.startswith("attention_")]
    slide = str(table["slide_id"].iloc[0])
    x, y = table["x"].to_numpy(float), table["y"].to_numpy(float)
    span_x, span_y = np.ptp(x) or 1.0, np.ptp(y) or 1.0
    width = 3.2 * len(models)
    fig = new_figure(width + 0.9, min(7.0, 3.2 * span_y / span_x) + 0.6)
    with styled(fig):
        axes = panel_grid(fig, len(models), len(models))
        image = None
        for ax, col in zip(axes, models):
            a = table[col].to_numpy(float)
            pct = 100.0 * (np.argsort(np.argsort(a, kind="stable"), kind="stable") + 0.5) / len(a)
            image = _patch_map(ax, x, y, pct)
            ax.set_title(f"{col.removeprefix('attention_')}")
            ax.set_xlabel("x (pixels, level 0)")
            ax.set_ylabel("y (pixels, level 0)")
            ax.set_aspect("equal")
            ax.grid(False)
        fig.colorbar(image, ax=axes, shrink=0.85,
                     label="attention (percentile within the slide)")
        fig.suptitle(f"slide {slide}: {len(table)} patches")
    return fig


def _patch_map(ax, x: np.ndarray, y: np.ndarray, values: np.ndarray):
    """Patches as cells of their raster (step: the smallest spacing between coordinates), or
    as square markers when the coordinates lie on no reasonable raster."""
    def step(v: np.ndarray) -> float:
        d = np.diff(np.unique(v))
        d = d[d > 0]
        return float(d.min()) if len(d) else 1.0

    sx, sy = step(x), step(y)
    nx, ny = round(float(np.ptp(x)) / sx) + 1, round(float(np.ptp(y)) / sy) + 1
    if nx * ny <= 4_000_000:
        grid = np.full((ny, nx), np.nan)
        grid[np.round((y - y.min()) / sy).astype(int), np.round((x - x.min()) / sx).astype(int)] = values
        image = ax.imshow(grid, cmap=SEQUENTIAL, vmin=0, vmax=100, origin="upper",
                          interpolation="nearest",
                          extent=(x.min() - sx / 2, x.max() + sx / 2, y.max() + sy / 2,
                                  y.min() - sy / 2))
        ax.set_facecolor("#f2f2f2")
        return image
    image = ax.scatter(x, y, c=values, cmap=SEQUENTIAL, vmin=0, vmax=100, marker="s", s=4)
    ax.invert_yaxis()
    return image


# -- efficiency ---------------------------------------------------------------------------------

def efficiency_figure(table: pd.DataFrame) -> Figure:
    """Learnable parameters, inference GFLOPs and latency per method (``steph bench
    efficiency``'s table), one panel per quantity; bars hatched by method."""
    _need(table, "efficiency measurement")
    quantities = [(table["learnable_params"].to_numpy(float) / 1e6, "learnable parameters (millions)"),
                  (table["gflops_total"].to_numpy(float), "inference GFLOPs (all operations)"),
                  (table["latency_ms"].to_numpy(float), "latency of one bag (ms)")]
    methods = table["method"].astype(str).tolist()
    fig = new_figure(7.0, 0.28 * len(methods) + 1.4)
    with styled(fig):
        axes = panel_grid(fig, 3, 3)
        for p, (ax, (values, label)) in enumerate(zip(axes, quantities)):
            for i, v in enumerate(values):
                ax.barh(i, v, height=0.7, **bar_style(i))
            ax.set_yticks(range(len(methods)), methods if p == 0 else [""] * len(methods))
            ax.set_ylim(len(methods) - 0.5, -0.5)
            ax.set_xlabel(label)
            ax.set_xlim(left=0)
        axes[0].set_ylabel("method")
    return fig


def transferability_figure(matrix: pd.DataFrame) -> Figure:
    """The zero-shot transfer matrix (:func:`steph.analysis.transferability.transfer_matrix`):
    rows = source models, columns = targets, cells = mean test C-index over the target's folds
    (the diagonal: the target's own model, framed); a diverging scale centred at 0.5 (chance)."""
    from matplotlib import colors as mcolors
    from matplotlib.patches import Rectangle

    _need(matrix.dropna(how="all"), "transfer matrix")
    values = matrix.to_numpy(float)
    spread = max(0.05, float(np.nanmax(np.abs(values - 0.5))))
    n_rows, n_cols = values.shape
    fig = new_figure(1.0 + 0.55 * n_cols + 1.2, 0.8 + 0.45 * n_rows)
    with styled(fig):
        ax = fig.add_subplot(1, 1, 1)
        image = ax.imshow(values, cmap="RdBu_r", aspect="auto",
                          norm=mcolors.TwoSlopeNorm(0.5, 0.5 - spread, 0.5 + spread))
        for i in range(n_rows):
            for j in range(n_cols):
                if np.isfinite(values[i, j]):
                    dark = abs(values[i, j] - 0.5) > 0.6 * spread
                    ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if dark else "black")
                if matrix.index[i] == matrix.columns[j]:
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False,
                                           edgecolor="black", linewidth=1.2))
        ax.set_xticks(range(n_cols), matrix.columns, rotation=60, ha="right")
        ax.set_yticks(range(n_rows), matrix.index)
        ax.set_xlabel("target cohort (its test patients)")
        ax.set_ylabel("source model (fold 0), applied unchanged")
        ax.set_title("Zero-shot transfer: test C-index (framed: the target's own model)")
        ax.grid(False)
        fig.colorbar(image, ax=ax, shrink=0.85, label="C-index (0.5: chance)")
    return fig
