"""One style for every figure steph draws (the summary plot, the report's figures).

The rules: labelled axes with units, legends that name cohorts and methods, readable in
greyscale (series differ by line style, marker or hatch, never by colour alone), no empty
panels (a panel only where there is data: :func:`panel_grid` makes exactly ``n`` axes).

Figures are built with the object API on a headless backend (``Agg``), never ``pyplot``'s global
state, so that drawing one figure does not change another and nothing needs a display.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

class NothingToDraw(ValueError):
    """A figure was asked for with no data (a figure never draws an empty panel)."""


# series styles, in order: cycle through them together (colour is redundant, never alone)
LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 2)), (0, (8, 2)))
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
HATCHES = ("", "//", "..", "xx", "\\\\", "oo", "--", "++", "**", "||")
# Okabe-Ito, colour-blind safe; series also differ by line style / marker / hatch
COLOURS = ("#000000", "#E69F00", "#0072B2", "#009E73", "#D55E00", "#CC79A7", "#56B4E9",
           "#F0E442")

# one colour (and line style, marker, hatch) per source cohort, from its rank among the sorted
# source names of a figure: the dynamics, selection and SAR charts of one STEPH run (the same
# sources) show a source alike. Black comes last, so that the first bars keep a visible hatch.
SOURCE_COLOURS = COLOURS[1:] + COLOURS[:1]

# one marker per method name, the same in summary.png and in the report (rows in a figure are
# labelled by name too; other names get a marker derived from the name)
METHOD_MARKERS = {
    "abmil": "o", "steph": "D", "model_avg": "s", "task_arithmetic": "^", "adamerging": "v",
    "ties_am": "<", "isoc_am": ">", "isocts_am": "p", "surgery_am": "h", "roupkt": "P",
    "zero_shot": "X", "linear_probe": "*", "fusion_mean": "8", "oracle": "H", "transmil": "d",
}
FILLED_MARKERS = ("o", "s", "^", "v", "<", ">", "D", "d", "p", "h", "H", "8", "*", "P", "X")

RC = {
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "svg.fonttype": "path",  # SVG text as outlines: the same on every machine, no fonts needed
    "svg.hashsalt": "steph",  # stable ids inside SVG files
    "savefig.bbox": "tight",
}


def series_style(i: int) -> dict:
    """Line style, marker and colour of the ``i``-th series (matplotlib keyword arguments)."""
    return {"linestyle": LINESTYLES[i % len(LINESTYLES)], "marker": MARKERS[i % len(MARKERS)],
            "color": COLOURS[i % len(COLOURS)]}


def source_index(names: Sequence[str]) -> dict[str, int]:
    """Each source name -> its rank among the sorted distinct ``names``."""
    return {name: i for i, name in enumerate(sorted(set(map(str, names))))}


def source_colours(names: Sequence[str]) -> dict[str, str]:
    """Each source name -> its colour: the colour of its rank among the sorted distinct
    ``names`` (the same sources give the same colours in every figure)."""
    return {name: SOURCE_COLOURS[i % len(SOURCE_COLOURS)] for name, i in source_index(names).items()}


def source_line_style(name: str, names: Sequence[str]) -> dict:
    """Colour, line style and marker of source ``name`` among ``names`` (matplotlib keyword
    arguments of a line)."""
    i = source_index(names)[str(name)]
    return {"color": source_colours(names)[str(name)], "linestyle": LINESTYLES[i % len(LINESTYLES)],
            "marker": MARKERS[i % len(MARKERS)]}


def source_bar_style(name: str, names: Sequence[str]) -> dict:
    """Face colour, hatch and edge of the bar of source ``name`` among ``names``."""
    i = source_index(names)[str(name)]
    colour = source_colours(names)[str(name)]
    return {"facecolor": colour, "hatch": HATCHES[i % len(HATCHES)],
            "edgecolor": "grey" if colour == "#000000" else "black", "linewidth": 0.6}


def method_marker(name: str) -> str:
    """The marker of method ``name`` in every figure (:data:`METHOD_MARKERS`; another name gets
    one of :data:`FILLED_MARKERS` chosen by a checksum of the name, the same in every run)."""
    import zlib

    name = str(name)
    if name in METHOD_MARKERS:
        return METHOD_MARKERS[name]
    return FILLED_MARKERS[zlib.crc32(name.encode()) % len(FILLED_MARKERS)]


def legend_outside(ax: Axes, where: str = "right", **kw):
    """A legend of ``ax`` beside the axes (``where``: right, or below), never over the data;
    the constrained layout makes room for it."""
    if where == "below":
        place = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.25)}
    else:
        place = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0)}
    return ax.legend(**{"frameon": False, "borderaxespad": 0.0, **place, **kw})


def bar_style(i: int) -> dict:
    """Face colour, hatch and edge of the ``i``-th bar series."""
    return {"facecolor": COLOURS[(i + 1) % len(COLOURS)], "hatch": HATCHES[i % len(HATCHES)],
            "edgecolor": "black", "linewidth": 0.6}


def new_figure(width: float, height: float) -> Figure:
    """A figure detached from pyplot (no global state, no display), in steph's style."""
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(width, height), layout="constrained")
    fig._steph_rc = dict(RC)  # applied again while drawing (see save_figure)
    return fig


def panel_grid(fig: Figure, n: int, ncols: int, **subplot_kw) -> list[Axes]:
    """Exactly ``n`` axes on a grid of ``ncols`` columns (the last row may be shorter: no empty
    panel is drawn)."""
    import matplotlib

    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    with matplotlib.rc_context(RC):
        return [fig.add_subplot(nrows, ncols, i + 1, **subplot_kw) for i in range(n)]


def figure_bytes(fig: Figure, fmt: str, dpi: int = 150) -> bytes:
    """The figure rendered as ``fmt`` (png, svg, pdf)."""
    import matplotlib

    buf = io.BytesIO()
    with matplotlib.rc_context(getattr(fig, "_steph_rc", RC)):
        fig.savefig(buf, format=fmt, dpi=dpi, metadata=_metadata(fmt))
    return buf.getvalue()


def _metadata(fmt: str) -> dict | None:
    """No creation date or software version in the files: the same figure gives the same
    bytes."""
    if fmt == "svg":
        return {"Date": None, "Creator": None}
    if fmt == "png":
        return {"Software": None}
    if fmt == "pdf":
        return {"CreationDate": None, "Creator": None, "Producer": None}
    return None


def save_figure(fig: Figure, stem: str | Path, formats: Sequence[str] = ("png", "svg"),
                dpi: int = 150) -> dict[str, Path]:
    """Write ``stem.<fmt>`` for each format (atomically); returns format -> path."""
    from steph.utils.io import atomic_path

    stem = Path(stem)
    out = {}
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        data = figure_bytes(fig, fmt, dpi)
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        out[fmt] = path
    return out


def styled(fig: Figure):
    """Context in which further artists of ``fig`` are made in steph's style."""
    import matplotlib

    return matplotlib.rc_context(getattr(fig, "_steph_rc", RC))
