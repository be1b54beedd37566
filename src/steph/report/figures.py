"""The report's figures, each a function of tables (from :mod:`steph.analysis` and
:mod:`steph.experiments`) returning a :class:`matplotlib.figure.Figure` in steph's one style
(:mod:`steph.utils.plotting`): axes labelled with units, legends naming cohorts and methods,
series told apart by line style, marker or hatch (readable in greyscale), a source cohort in the
same colour and style and a method with the same marker in every figure, legends beside the
axes (never over data), and a panel only where there is data. Every function raises ``NothingToDraw`` (a ``ValueError``) when given nothing
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
    NothingToDraw,
    bar_style,
    legend_outside,
    method_marker,
    new_figure,
    panel_grid,
    source_bar_style,
    source_line_style,
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
DIVERGING = "RdBu_r"  # differences: white at 0, red above, blue below (colour-blind safe)


def _need(frame, what: str) -> None:
    if frame is None or len(frame) == 0:
        raise NothingToDraw(f"nothing to draw: no {what}")


def _fmt_p(p: float) -> str:
    if not np.isfinite(p):
        return "p = n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


# -- results ------------------------------------------------------------------------------------

def forest_figure(comparisons: pd.DataFrame) -> Figure:
    """Each method's difference of the test C-index to the baseline, per cohort, two ways
    (``compare_methods``), which can disagree in sign on few folds:

    * the **pooled** out-of-fold difference with its 95 % patient-bootstrap interval (filled
      marker, solid line);
    * the **mean of the per-fold differences** ± their sd over folds (open marker, dashed
      line): what wins / ties / losses count;

    and, with more than one cohort, per method the mean of its per-cohort per-fold means ± sd
    over cohorts, with its wins / ties / losses. Methods keep their marker of every figure
    (:func:`~steph.utils.plotting.method_marker`); the legend is beside the axes."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    from steph.experiments.compare import ALL

    _need(comparisons, "comparison with the baseline")
    per = comparisons[comparisons["cohort"] != ALL]
    across = comparisons[comparisons["cohort"] == ALL]
    _need(per, "comparison with the baseline")
    baseline = str(comparisons["baseline"].iloc[0])
    methods = list(dict.fromkeys(per["method"]))
    cohorts = list(dict.fromkeys(per["cohort"]))

    def get(r, col: str) -> float:
        return float(r[col]) if col in r and pd.notna(r[col]) else float("nan")

    # (label, method, pooled, low, high, per-fold mean, its sd)
    rows: list[tuple[str, str, float, float, float, float, float]] = []
    for cohort in cohorts:
        for m in methods:
            hit = per[(per["cohort"] == cohort) & (per["method"] == m)]
            if len(hit):
                r = hit.iloc[0]
                n = int(r["n_folds"]) if "n_folds" in r and pd.notna(r["n_folds"]) else 0
                folds = f" ({n} fold{'' if n == 1 else 's'})" if n else ""
                rows.append((f"{cohort} · {m}{folds}", m, get(r, "pooled_diff"), get(r, "ci_low"),
                             get(r, "ci_high"), get(r, "mean_diff"), get(r, "sd_diff")))
    if len(cohorts) > 1:
        for m in methods:
            hit = across[across["method"] == m]
            if len(hit):
                r = hit.iloc[0]
                wtl = ""
                if all(c in r and pd.notna(r[c]) for c in ("wins", "ties", "losses")):
                    wtl = f" (W/T/L {int(r['wins'])}/{int(r['ties'])}/{int(r['losses'])})"
                rows.append((f"mean over cohorts · {m}{wtl}", m, float("nan"), float("nan"),
                             float("nan"), get(r, "mean_diff"), get(r, "sd_diff")))
    fig = new_figure(8.0, 0.42 * len(rows) + 1.5)
    with styled(fig):
        ax = fig.add_subplot(1, 1, 1)
        off = 0.17
        for y, (_, m, pooled, lo, hi, mean, sd) in enumerate(rows):
            marker = method_marker(m)
            if np.isfinite(pooled):
                if np.isfinite(lo) and np.isfinite(hi):
                    ax.plot([lo, hi], [y - off, y - off], color="black", linewidth=1.6,
                            linestyle="-")
                ax.plot([pooled], [y - off], marker=marker, markersize=6, color="black",
                        markeredgecolor="black", linestyle="none")
            if np.isfinite(mean):
                if np.isfinite(sd) and sd > 0:
                    ax.plot([mean - sd, mean + sd], [y + off, y + off], color="dimgrey",
                            linewidth=1.2, linestyle="--")
                ax.plot([mean], [y + off], marker=marker, markersize=6, color="white",
                        markeredgecolor="black", linestyle="none")
        ax.axvline(0.0, color="grey", linewidth=1.0, linestyle=":")
        ax.set_yticks(range(len(rows)), [r[0] for r in rows])
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_ylabel("cohort · method")
        ax.set_xlabel(f"difference of test C-index to {baseline}")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6))
        handles = [
            Line2D([], [], color="black", linewidth=1.6, marker="o", markerfacecolor="black",
                   label="pooled out-of-fold\ndifference, 95 % CI\n(patient bootstrap)"),
            Line2D([], [], color="dimgrey", linewidth=1.2, linestyle="--", marker="o",
                   markerfacecolor="white", markeredgecolor="black",
                   label="mean of per-fold\ndifferences ± sd\n(wins / ties / losses\ncount these)"),
            *(Line2D([], [], color="black", marker=method_marker(m), markerfacecolor="lightgrey",
                     linestyle="none", label=m) for m in methods),
        ]
        legend_outside(ax, handles=handles, fontsize=7)
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
            legend_outside(ax, where="below", fontsize=7)
    return fig


# -- STEPH --------------------------------------------------------------------------------------

def dynamics_figure(dynamics: pd.DataFrame) -> Figure:
    """Mean merge weight w and mixup coefficient lambda of every source per training epoch
    (appendix D.1, Figures S1 and S2), averaged over folds: two panels per STEPH run group."""
    _need(dynamics, "STEPH training log")
    groups = list(dynamics.groupby(["cohort", "method"], sort=False))
    names = list(dynamics["source"].astype(str))  # one style per source in every figure
    fig = new_figure(8.2, 2.8 * len(groups) + 0.3)
    with styled(fig):
        axes = panel_grid(fig, 2 * len(groups), 2)
        for g, ((cohort, method), sub) in enumerate(groups):
            mean = sub.groupby(["source", "epoch"], sort=False)[["w", "lambda"]].mean()
            folds = sub["fold"].nunique()
            for p, (col, label) in enumerate((("w", "mean merge weight w"),
                                              ("lambda", "mean mixup coefficient λ"))):
                ax = axes[2 * g + p]
                for source in sorted(dict.fromkeys(sub["source"]), key=str):
                    series = mean.loc[source][col]
                    ax.plot(series.index, series.to_numpy(), markersize=4, linewidth=1.3,
                            label=source, **source_line_style(source, names))
                ax.set_xlabel("epoch")
                ax.set_ylabel(f"{label} (training bags)")
                ax.set_title(f"target {cohort} · {method}: {label.split()[-1]} "
                             f"({folds} fold(s), mean)")
                if col == "lambda":
                    ax.set_ylim(-0.02, 1.02)
                else:
                    ax.set_ylim(bottom=0)
            legend_outside(axes[2 * g + 1], title="source cohort", fontsize=7)
    return fig


def selection_figure(frequency: pd.DataFrame, on: str = "test patients") -> Figure:
    """How often each source was among STEPH's K selected ones (``selection_frequency`` or the
    training log's last epoch), one panel per target and method; bars are hatched by source."""
    _need(frequency, "selections")
    col = "selected_share" if "selected_share" in frequency else "selected"
    groups = list(frequency.groupby(["cohort", "method"], sort=False))
    names = list(frequency["source"].astype(str))  # one style per source in every figure
    fig = new_figure(min(7.0, 3.5 * len(groups)) if len(groups) > 1 else 4.5,
                     2.9 * math.ceil(len(groups) / 2))
    with styled(fig):
        axes = panel_grid(fig, len(groups), 2)
        for ax, ((cohort, method), sub) in zip(axes, groups):
            sub = sub.sort_values("source", key=lambda v: v.astype(str), kind="stable")
            sources = list(sub["source"])
            for i, (source, share) in enumerate(zip(sources, sub[col].to_numpy(float))):
                ax.bar(i, 100.0 * share, width=0.7, **source_bar_style(source, names))
                ax.text(i, 100.0 * share + 1.5, f"{100 * share:.0f}", ha="center", fontsize=7)
            ax.set_xticks(range(len(sources)), sources, rotation=30, ha="right")
            ax.set_ylim(0, 110)
            ax.set_xlabel("source cohort")
            ax.set_ylabel(f"selected (% of {on})")
            ax.set_title(f"target {cohort} · {method}")
    return fig


def landscape_figure(landscapes: Sequence, sigma: float = 1.0) -> Figure:
    """The smoothed test loss of theta_0 + C_s tau_s + C_t tau_t (appendix C.2.3), one panel per
    source, each on its own colour scale (its colour bar beside it: losses of two sources can
    differ by more than either varies): contours, the mixup segment C_s + C_t = 1, the path of
    STEPH's mean lambda over the epochs (circles, the last one filled), the lowest point (star)
    and the lowest point on the mixup segment (square); one legend below the panels."""
    from matplotlib import colors as mcolors
    from matplotlib.lines import Line2D

    _need(landscapes, "loss landscape")
    zs = [ls.smoothed(sigma) for ls in landscapes]
    ncols = min(3, len(landscapes))
    nrows = math.ceil(len(landscapes) / ncols)
    fig = new_figure(3.9 * ncols + 0.2, 3.0 * nrows + 0.9)
    with styled(fig):
        axes = panel_grid(fig, len(landscapes), ncols)
        has_path = False
        for ax, ls, z in zip(axes, landscapes, zs):
            c = ls.coefficients
            half = (c[1] - c[0]) / 2 if len(c) > 1 else 0.02
            lo, hi = float(z.min()), float(z.max())
            norm = mcolors.Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-12)
            image = ax.imshow(z, origin="lower", cmap=SEQUENTIAL, norm=norm, aspect="equal",
                              extent=(c[0] - half, c[-1] + half, c[0] - half, c[-1] + half))
            if hi > lo:
                cs = ax.contour(c, c, z, levels=8, colors="white", linewidths=0.6)
                ax.clabel(cs, fontsize=6, fmt="%.3f")
            ax.plot([0, 1], [1, 0], color="white", linestyle="--", linewidth=1.0)
            ax.plot([0, 1], [1, 0], color="black", linestyle=(0, (2, 4)), linewidth=1.0)
            if len(ls.path):
                has_path = True
                lam = ls.path["lambda"].to_numpy(float)
                ax.plot(1 - lam, lam, color="black", marker="o", markersize=4,
                        markerfacecolor="white", linewidth=1.0)
                ax.plot(1 - lam[-1:], lam[-1:], color="black", marker="o", markersize=6,
                        linestyle="none")
            s_min, t_min, _ = ls.minimum()
            ax.plot([s_min], [t_min], marker="*", markersize=12, color="white",
                    markeredgecolor="black", linestyle="none")
            lam_min, _ = ls.mixup_minimum()
            ax.plot([1 - lam_min], [lam_min], marker="s", markersize=7, color="white",
                    markeredgecolor="black", linestyle="none")
            ax.set_xlim(c[0] - half, c[-1] + half)
            ax.set_ylim(c[0] - half, c[-1] + half)
            ax.set_xlabel(f"C_s, coefficient of τ_s ({ls.source})")
            ax.set_ylabel(f"C_t, coefficient of τ_t ({ls.target})")
            ax.set_title(f"{ls.target} fold {ls.fold} × {ls.source} ({ls.n_patients} test patients)")
            ax.grid(False)
            fig.colorbar(image, ax=ax, shrink=0.85, format="%.3f",
                         label=f"test loss (survival NLL, smoothed σ = {sigma:g} step)")
        handles = [Line2D([], [], color="black", linestyle=(0, (2, 4)), linewidth=1.0,
                          label="mixup: C_s + C_t = 1")]
        if has_path:
            handles.append(Line2D([], [], color="black", marker="o", markersize=4,
                                  markerfacecolor="white", linewidth=1.0,
                                  label="STEPH λ per epoch (filled: last)"))
        handles += [Line2D([], [], marker="*", markersize=10, color="white",
                           markeredgecolor="black", linestyle="none", label="lowest loss"),
                    Line2D([], [], marker="s", markersize=7, color="white",
                           markeredgecolor="black", linestyle="none", label="lowest on mixup")]
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles),
                   frameon=False, fontsize=7)
    return fig


def sar_figure(sar: pd.DataFrame) -> Figure:
    """SAR(tau_t, lambda tau_t + (1 - lambda) tau_s) over lambda, one panel per encoder matrix
    and STEPH run, a line per source (its style of every figure) and STEPH's final lambda as a
    large marker (Figure 5). The axis is 1 - SAR on a log scale, upside down and labelled in
    SAR (0.9, 0.99, 0.999, ...), so that the differences near 1 the ratio mostly lives in are
    visible; a SAR within the axis' floor of 1 is drawn on the floor."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    _need(sar, "subspace alignment ratio")
    keys = list(dict.fromkeys(zip(sar["cohort"], sar["fold"], sar["layer"])))
    names = list(sar["source"].astype(str))
    gap = 1.0 - sar["sar"].to_numpy(float)
    positive = gap[np.isfinite(gap) & (gap > 1e-12)]
    floor = 10.0 ** (math.floor(math.log10(positive.min())) - 1) if len(positive) else 1e-6
    floor = min(max(floor, 1e-12), 1e-2)
    top = 1.0 if not len(positive) else 10.0 ** math.ceil(math.log10(max(positive.max(), floor * 10)))

    def label(v: float, _pos=None) -> str:
        if v >= 1.0:
            return "0"
        if v <= floor * 1.0001:
            return f"≥ 1 − {floor:.0e}".replace("e-0", "e-")
        digits = max(1, -math.floor(math.log10(v) + 1e-9))
        return f"{1.0 - v:.{digits}f}"

    ncols = min(3, len(keys))
    fig = new_figure(3.1 * ncols + 1.4, 2.9 * math.ceil(len(keys) / ncols) + 0.4)
    with styled(fig):
        axes = panel_grid(fig, len(keys), ncols)
        for ax, (cohort, fold, layer) in zip(axes, keys):
            sub = sar[(sar["cohort"] == cohort) & (sar["fold"] == fold) & (sar["layer"] == layer)]
            for source in sorted(dict.fromkeys(sub["source"]), key=str):
                st = source_line_style(source, names)
                curve = sub[(sub["source"] == source) & (sub["kind"] == "curve")]
                ax.plot(curve["lambda"], np.clip(1.0 - curve["sar"].to_numpy(float), floor, None),
                        linewidth=1.3, markersize=3, label=source, markevery=4, **st)
                point = sub[(sub["source"] == source) & (sub["kind"] == "steph")]
                if len(point):
                    ax.plot(point["lambda"], np.clip(1.0 - point["sar"].to_numpy(float), floor, None),
                            marker=st["marker"], markersize=9, color=st["color"],
                            markeredgecolor="black", linestyle="none")
            ax.set_ylim(top * 1.3, floor / 1.3)  # upside down: SAR grows upwards
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10.0))
            ax.yaxis.set_major_formatter(FuncFormatter(label))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlim(-0.03, 1.03)
            ax.set_xlabel("λ, weight of τ_t in τ_mix")
            ax.set_ylabel("SAR(τ_t, τ_mix) (log scale of 1 − SAR)")
            ax.set_title(f"{cohort} fold {fold}: {layer}")
        legend_outside(axes[min(ncols, len(axes)) - 1], title="source\n(large: STEPH's λ)",
                       fontsize=7)
    return fig


def attention_figure(table: pd.DataFrame) -> Figure:
    """The attention maps of one slide side by side, one panel per model (the
    ``attention_<method>`` columns of ``attention_table``: the target's model first, STEPH
    last), each as percentiles within the slide on one shared colour scale, at the patches'
    coordinates; with two or more models a last panel maps the difference of the last model's
    percentile to the first's (STEPH minus the target model) on a diverging colour map
    centred at 0, with its own colour bar."""
    from matplotlib import colors as mcolors

    _need(table, "patches")
    models = [c for c in table.columns if c.startswith("attention_")]
    slide = str(table["slide_id"].iloc[0])
    x, y = table["x"].to_numpy(float), table["y"].to_numpy(float)
    span_x, span_y = np.ptp(x) or 1.0, np.ptp(y) or 1.0
    pct = {col: percentiles(table[col].to_numpy(float)) for col in models}
    panels = len(models) + (1 if len(models) >= 2 else 0)
    width = 3.2 * panels
    fig = new_figure(width + 1.6, min(7.0, 3.2 * span_y / span_x) + 0.8)
    with styled(fig):
        axes = panel_grid(fig, panels, panels)
        image = None
        for ax, col in zip(axes, models):
            image = _patch_map(ax, x, y, pct[col])
            ax.set_title(f"{col.removeprefix('attention_')}")
        fig.colorbar(image, ax=axes[:len(models)], shrink=0.85,
                     label="attention (percentile within the slide)")
        if len(models) >= 2:
            first, last = models[0], models[-1]
            diff = pct[last] - pct[first]
            bound = max(float(np.abs(diff).max()), 1e-9)
            ax = axes[-1]
            image = _patch_map(ax, x, y, diff, cmap=DIVERGING,
                               norm=mcolors.TwoSlopeNorm(0.0, -bound, bound))
            ax.set_title(f"{last.removeprefix('attention_')} − {first.removeprefix('attention_')}")
            # no patch: hatched, so that it is not read as a difference near 0 (white)
            ax.set_facecolor("white")
            ax.patch.set_hatch("////")
            ax.patch.set_edgecolor("#c8c8c8")
            fig.colorbar(image, ax=ax, shrink=0.85,
                         label="difference (percentile points; 0 = same rank)")
        for ax in axes:
            ax.set_xlabel("x (pixels, level 0)")
            ax.set_ylabel("y (pixels, level 0)")
            ax.set_aspect("equal")
            ax.grid(False)
        fig.suptitle(f"slide {slide}: {len(table)} patches")
    return fig


def percentiles(values: np.ndarray) -> np.ndarray:
    """Each value's percentile within ``values`` (0-100, ties broken by position)."""
    a = np.asarray(values, dtype=float)
    return 100.0 * (np.argsort(np.argsort(a, kind="stable"), kind="stable") + 0.5) / len(a)


def _patch_map(ax, x: np.ndarray, y: np.ndarray, values: np.ndarray, cmap: str = SEQUENTIAL,
               norm=None):
    """Patches as cells of their raster (step: the smallest spacing between coordinates), or
    as square markers when the coordinates lie on no reasonable raster; ``values`` on
    ``cmap`` (percentiles 0-100 unless ``norm`` says otherwise)."""
    from matplotlib import colors as mcolors

    norm = norm if norm is not None else mcolors.Normalize(vmin=0, vmax=100)

    def step(v: np.ndarray) -> float:
        d = np.diff(np.unique(v))
        d = d[d > 0]
        return float(d.min()) if len(d) else 1.0

    sx, sy = step(x), step(y)
    nx, ny = round(float(np.ptp(x)) / sx) + 1, round(float(np.ptp(y)) / sy) + 1
    if nx * ny <= 4_000_000:
        grid = np.full((ny, nx), np.nan)
        grid[np.round((y - y.min()) / sy).astype(int), np.round((x - x.min()) / sx).astype(int)] = values
        image = ax.imshow(grid, cmap=cmap, norm=norm, origin="upper",
                          interpolation="nearest",
                          extent=(x.min() - sx / 2, x.max() + sx / 2, y.max() + sy / 2,
                                  y.min() - sy / 2))
        ax.set_facecolor("#f2f2f2")
        return image
    image = ax.scatter(x, y, c=values, cmap=cmap, norm=norm, marker="s", s=4)
    ax.invert_yaxis()
    return image


# -- efficiency ---------------------------------------------------------------------------------

def efficiency_figure(table: pd.DataFrame) -> Figure:
    """Learnable parameters, inference GFLOPs and latency per method (``steph bench
    efficiency``'s table), one panel per quantity; bars hatched by method."""
    _need(table, "efficiency measurement")
    quantities = [(table["learnable_params"].to_numpy(float) / 1e6, "learnable parameters\n(millions)"),
                  (table["gflops_total"].to_numpy(float), "inference GFLOPs\n(all operations)"),
                  (table["latency_ms"].to_numpy(float), "latency of one bag\n(ms)")]
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
