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
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["steph", "ta"]


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
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["S1", "S2", "S3", "S4"]

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
    assert [ax.get_title() for ax in panels] == ["abmil", "steph"]
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
