"""The figure functions on hand-made tables: a panel only where there is data, axes labelled,
series told apart without colour (line style / marker / hatch), nothing drawn from nothing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from steph.analysis.landscape import Landscape, coefficient_grid
from steph.analysis.survival import HIGH, LOW
from steph.report import figures as F


def _labelled(fig: Figure) -> None:
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            continue
        assert ax.get_xlabel() and ax.get_ylabel(), ax.get_title()


def _greyscale_distinct(lines) -> None:
    keys = [(str(line.get_linestyle()), str(line.get_marker())) for line in lines]
    assert len(set(keys)) == len(keys), f"series differ by colour only: {keys}"


def test_cindex_panels_only_where_methods_ran():
    rows = [("A", m, f, 0.6 + 0.01 * f) for m in ("abmil", "steph", "ta") for f in range(3)]
    rows += [("B", "abmil", f, 0.55) for f in range(3)]
    summary = pd.DataFrame(rows, columns=["cohort", "method", "fold", "c_index"])
    fig = F.cindex_figure(summary)
    assert len(fig.axes) == 2
    ticks = [[t.get_text() for t in ax.get_yticklabels()] for ax in fig.axes]
    assert ticks == [["abmil", "steph", "ta"], ["abmil"]]  # no empty row for B
    assert fig.axes[0].get_xlim() == fig.axes[1].get_xlim()
    _labelled(fig)


def test_forest():
    comp = pd.DataFrame({
        "cohort": ["A", "A", "B", "ALL", "ALL"], "method": ["steph", "ta", "steph", "steph", "ta"],
        "baseline": "abmil", "pooled_diff": [0.02, -0.01, 0.03, 0.025, -0.01],
        "ci_low": [0.0, -0.03, np.nan, np.nan, np.nan], "ci_high": [0.04, 0.01, np.nan, np.nan, np.nan],
        "mean_diff": [0.02, -0.01, 0.03, 0.025, -0.01]})
    fig = F.forest_figure(comp)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["A · steph", "A · ta", "B · steph", "mean over cohorts · steph",
                      "mean over cohorts · ta"]
    assert "abmil" in ax.get_xlabel()
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts[2:] == ["steph", "ta"] and "pooled" in texts[0] and "per-fold" in texts[1]


def test_km_one_panel_per_cohort_and_method_with_data():
    rng = np.random.default_rng(0)
    rows = []
    for cohort, methods in (("A", ("abmil", "steph")), ("B", ("abmil",))):
        for m in methods:
            for i in range(20):
                rows.append({"cohort": cohort, "method": m, "fold": i % 2,
                             "group": HIGH if i % 2 else LOW, "time": float(rng.integers(10, 900)),
                             "event": int(rng.random() < 0.6)})
    fig = F.km_figure(pd.DataFrame(rows), ["abmil", "steph"])
    assert len(fig.axes) == 3
    for ax in fig.axes:
        assert ax.get_xlabel() == "time (days)" and ax.get_ylabel() == "survival probability"
        assert "log-rank" in ax.get_title()
        styles = {str(line.get_linestyle()) for line in ax.get_lines() if line.get_linestyle() != "None"}
        assert len(styles) == 2  # high and low risk differ by line style


def test_dynamics_sar_selection_styles():
    rows = [{"cohort": "T", "method": "steph", "repeat": 0, "fold": f, "epoch": e, "source": s,
             "w": 0.1 * i + 0.01 * e, "lambda": 1 - 0.05 * i, "selected": 1.0}
            for f in (0, 1) for e in (1, 2, 3) for i, s in enumerate(["S1", "S2", "S3", "S4"])]
    fig = F.dynamics_figure(pd.DataFrame(rows))
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert len(ax.get_lines()) == 4
        _greyscale_distinct(ax.get_lines())
    _labelled(fig)
    assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == ["S1", "S2", "S3", "S4"]

    sar = pd.DataFrame([{"cohort": "T", "method": "steph", "repeat": 0, "fold": 0, "source": s,
                         "layer": layer, "lambda": lam, "sar": 0.5 + 0.4 * lam, "kind": "curve"}
                        for s in ("S1", "S2") for layer in ("L1", "L2") for lam in (0, 0.5, 1)])
    fig = F.sar_figure(sar)
    assert len(fig.axes) == 2
    for ax in fig.axes:
        _greyscale_distinct(ax.get_lines())
    _labelled(fig)

    freq = pd.DataFrame({"cohort": "T", "method": "steph", "source": ["S1", "S2", "S3"],
                         "selected_share": [1.0, 0.5, 0.0]})
    fig = F.selection_figure(freq)
    hatches = [p.get_hatch() for p in fig.axes[0].patches]
    assert len(hatches) == 3 and len(set(hatches)) == 3
    _labelled(fig)


def test_landscape_and_attention():
    c = coefficient_grid(0.25)
    z = np.add.outer((c - 0.5) ** 2, (c - 0.25) ** 2)
    path = pd.DataFrame({"epoch": [1, 2], "lambda": [0.9, 0.7]})
    lands = [Landscape("T", s, 0, 0, c, z, 10, path) for s in ("S1", "S2")]
    fig = F.landscape_figure(lands)
    assert len([ax for ax in fig.axes if ax.get_label() != "<colorbar>"]) == 2
    _labelled(fig)
    table = pd.DataFrame({"slide_id": "s", "patch": range(6), "x": [0, 256, 512] * 2,
                          "y": [0] * 3 + [256] * 3, "attention_abmil": np.linspace(0, 1, 6),
                          "attention_steph": np.linspace(1, 0, 6)})
    fig = F.attention_figure(table)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert [ax.get_title() for ax in panels] == ["abmil", "steph", "steph − abmil"]
    grid = panels[0].get_images()[0].get_array()
    # percentiles within the slide, on the patches' raster (row = y, column = x)
    assert grid.shape == (2, 3) and grid[0, 0] < grid[1, 2]
    _labelled(fig)


def test_nothing_to_draw():
    for fn in (F.forest_figure, F.km_figure, F.dynamics_figure, F.selection_figure,
               F.sar_figure, F.attention_figure, F.efficiency_figure):
        with pytest.raises(ValueError, match="nothing to draw"):
            fn(pd.DataFrame())
    with pytest.raises(ValueError):
        F.landscape_figure([])


# -- issue 19, items 9 and 10 ----------------------------------------------------------------


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _legends_outside_axes(fig: Figure) -> int:
    """Every legend of ``fig`` lies outside every panel (colour bars aside); returns how many
    legends there are."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + fig.legends
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in panels:
            assert not _overlap(box, ax.get_window_extent(renderer)), (
                f"legend {[t.get_text() for t in legend.get_texts()]} covers {ax.get_title()!r}")
    return len(legends)


def _comparison(mean_diff=(-0.003, 0.01, 0.02), pooled=(0.025, 0.012, -0.01)):
    from steph.experiments.compare import across_cohorts

    per = pd.DataFrame({"cohort": ["A", "B", "C"], "method": "steph", "baseline": "abmil",
                        "n_folds": 3, "n_repeats": 1, "n_patients": 90,
                        "mean_diff": mean_diff, "sd_diff": [0.01, 0.02, 0.015],
                        "pooled_c_method": 0.6, "pooled_c_baseline": 0.6,
                        "pooled_diff": pooled, "ci_low": [p - 0.03 for p in pooled],
                        "ci_high": [p + 0.03 for p in pooled]})
    return pd.concat([per, across_cohorts(per)], ignore_index=True)


def test_forest_shows_the_per_fold_mean_and_the_pooled_difference():
    comp = _comparison()
    fig = F.forest_figure(comp)
    ax = fig.axes[0]
    points = [(float(line.get_xdata()[0]), line.get_markerfacecolor()) for line in ax.get_lines()
              if len(line.get_xdata()) == 1 and line.get_marker() not in ("None", "")]
    xs = [round(x, 6) for x, _ in points]
    # cohort A: per-fold mean -0.003 and pooled +0.025 (opposite signs) are both drawn
    assert -0.003 in xs and 0.025 in xs
    assert {str(face) for x, face in points if round(x, 6) == 0.025} == {"black"}  # pooled: filled
    assert {str(face) for x, face in points if round(x, 6) == -0.003} == {"white"}  # per fold: open
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("pooled" in t and "bootstrap" in t for t in texts)
    assert any("per-fold" in t and "wins / ties / losses" in t for t in texts)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[-1] == "mean over cohorts · steph (W/T/L 2/0/1)"
    # the interval of the per-fold mean: ± its sd over folds
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert any(np.allclose(sorted(line.get_xdata()), [-0.013, 0.007]) for line in dashed)
    assert _legends_outside_axes(fig) == 1


def test_legends_do_not_cover_data():
    rows = [{"cohort": "T", "method": "steph", "repeat": 0, "fold": 0, "epoch": e, "source": s,
             "w": 0.9 - 0.1 * i, "lambda": 0.95 - 0.1 * i, "selected": 1.0}
            for e in range(1, 11) for i, s in enumerate(["S1", "S2", "S3"])]
    assert _legends_outside_axes(F.dynamics_figure(pd.DataFrame(rows))) == 1
    assert _legends_outside_axes(F.forest_figure(_comparison())) == 1
    sar = pd.DataFrame([{"cohort": "T", "method": "steph", "repeat": 0, "fold": 0, "source": s,
                         "layer": "L", "lambda": lam, "sar": 0.99 + 0.01 * lam, "kind": "curve"}
                        for s in ("S1", "S2") for lam in (0, 0.5, 1)])
    assert _legends_outside_axes(F.sar_figure(sar)) == 1
    c = coefficient_grid(0.25)
    path = pd.DataFrame({"epoch": [1, 2], "lambda": [0.9, 0.7]})
    land = Landscape("T", "S1", 0, 0, c, np.add.outer(c, c), 10, path)
    assert _legends_outside_axes(F.landscape_figure([land])) == 1
    rng = np.random.default_rng(0)
    km = pd.DataFrame([{"cohort": "A", "method": "abmil", "fold": 0, "group": HIGH if i % 2 else LOW,
                        "time": float(rng.integers(10, 900)), "event": 1} for i in range(20)])
    assert _legends_outside_axes(F.km_figure(km)) == 1


def test_a_source_has_one_colour_in_every_figure():
    from steph.utils.plotting import source_colours

    sources = ["UNRB", "RELA", "BETA", "ZETA"]
    dyn = pd.DataFrame([{"cohort": "T", "method": "steph", "repeat": 0, "fold": 0, "epoch": e,
                         "source": s, "w": 0.5, "lambda": 0.5, "selected": 1.0}
                        for e in (1, 2) for s in sources])
    fig = F.dynamics_figure(dyn)
    line_colour = {line.get_label(): line.get_color() for line in fig.axes[0].get_lines()}
    freq = pd.DataFrame({"cohort": "T", "method": "steph", "source": sources[::-1],
                         "selected_share": [0.1, 0.2, 0.3, 0.4]})
    fig = F.selection_figure(freq)
    ax = fig.axes[0]
    bar_colour = {t.get_text(): p.get_facecolor()
                  for t, p in zip(ax.get_xticklabels(), ax.patches)}
    from matplotlib.colors import to_rgba

    expected = source_colours(sources)
    assert len(set(expected.values())) == len(sources)
    for s in sources:
        assert to_rgba(line_colour[s]) == to_rgba(expected[s]) == to_rgba(bar_colour[s]), s
    sar = pd.DataFrame([{"cohort": "T", "method": "steph", "repeat": 0, "fold": 0, "source": s,
                         "layer": "L", "lambda": lam, "sar": 0.9, "kind": "curve"}
                        for s in sources for lam in (0, 1)])
    sar_colour = {line.get_label(): line.get_color() for line in F.sar_figure(sar).axes[0].get_lines()}
    assert all(to_rgba(sar_colour[s]) == to_rgba(expected[s]) for s in sources)


def test_a_method_has_one_marker_in_summary_and_report():
    from steph.utils.plotting import method_marker

    rows = [("A", m, f, 0.6 + 0.01 * f) for m in ("abmil", "steph", "model_avg") for f in range(3)]
    summary = pd.DataFrame(rows, columns=["cohort", "method", "fold", "c_index"])

    def markers(fig):
        ax = fig.axes[0]
        names = [t.get_text() for t in ax.get_yticklabels()]
        paths = [c.get_paths()[0].vertices.round(6).tobytes() for c in ax.collections
                 if len(c.get_offsets()) == 3]
        return dict(zip(names, paths))

    # summary.png: the order of the summary; the report: its own method order
    plain = markers(F.cindex_figure(summary))
    ordered = markers(F.cindex_figure(summary, ["steph", "model_avg", "abmil"]))
    assert plain == ordered and len(set(plain.values())) == 3
    comp = pd.DataFrame({"cohort": ["A", "A"], "method": ["steph", "model_avg"],
                         "baseline": "abmil", "pooled_diff": [0.01, 0.02], "ci_low": [0.0, 0.0],
                         "ci_high": [0.03, 0.04], "mean_diff": [0.01, 0.02]})
    forest = F.forest_figure(comp).axes[0]
    drawn = {line.get_marker() for line in forest.get_lines() if len(line.get_xdata()) == 1}
    assert drawn == {method_marker("steph"), method_marker("model_avg")}
    assert method_marker("steph") != method_marker("abmil")
    assert method_marker("steph_k3") == method_marker("steph_k3")  # unknown names: stable


def test_landscape_panels_have_their_own_colour_scale():
    c = coefficient_grid(0.25)
    steep = 3.0 + np.add.outer((c - 0.5) ** 2, c ** 2)
    flat = 1.0 + 0.001 * np.add.outer(c, c)
    lands = [Landscape("T", "S1", 0, 0, c, steep, 10), Landscape("T", "S2", 0, 0, c, flat, 10)]
    fig = F.landscape_figure(lands)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 2
    for ax, ls in zip(panels, lands):
        image = ax.get_images()[0]
        z = ls.smoothed()
        assert image.norm.vmin == pytest.approx(z.min()) and image.norm.vmax == pytest.approx(z.max())


def test_sar_axis_shows_differences_near_one():
    sar = pd.DataFrame([{"cohort": "T", "method": "steph", "repeat": 0, "fold": 0, "source": s,
                         "layer": "L", "lambda": lam, "sar": v, "kind": "curve"}
                        for s, v in (("S1", 0.999), ("S2", 0.9999), ("S3", 0.99))
                        for lam in (0.0, 0.5)])
    fig = F.sar_figure(sar)
    ax = fig.axes[0]
    fig.draw_without_rendering()
    height = ax.get_window_extent().height
    y = {line.get_label(): ax.transData.transform((0.0, line.get_ydata()[0]))[1]
         for line in ax.get_lines()}
    # 0.99, 0.999 and 0.9999 a sizeable part of the panel apart, in that order upwards
    assert y["S2"] - y["S1"] > 0.15 * height and y["S1"] - y["S3"] > 0.15 * height
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    assert "0.999" in ticks and "0.99" in ticks


def test_attention_has_a_difference_map_centred_at_zero():
    table = pd.DataFrame({"slide_id": "s", "patch": range(6), "x": [0, 256, 512] * 2,
                          "y": [0] * 3 + [256] * 3, "attention_abmil": np.linspace(0, 1, 6),
                          "attention_steph": [0.5, 0.1, 0.9, 0.3, 0.2, 0.0]})
    fig = F.attention_figure(table)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert [ax.get_title() for ax in panels] == ["abmil", "steph", "steph − abmil"]
    image = panels[2].get_images()[0]
    pct = {m: F.percentiles(table[f"attention_{m}"].to_numpy()) for m in ("abmil", "steph")}
    np.testing.assert_allclose(np.asarray(image.get_array()).reshape(-1),
                               (pct["steph"] - pct["abmil"]).reshape(-1))
    assert image.norm.vcenter == 0 and image.norm.vmin == -image.norm.vmax
    assert image.get_cmap().name in ("RdBu_r", "PuOr", "coolwarm")
    assert len([ax for ax in fig.axes if ax.get_label() == "<colorbar>"]) == 2
    _labelled(fig)
