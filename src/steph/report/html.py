"""``steph report``: the runs folder as one self-contained HTML page.

Everything the page shows is inside the file: figures are embedded as ``data:`` URIs (SVG for
line and bar charts, PNG for maps), the style sheet is inline, there is no script and no
reference to anything outside the file, so it opens offline and prints as it reads (a print
style sheet: no interactive-only content, figures and tables not cut across pages). Every
figure is also written as PNG and SVG into ``<report>-figures/`` beside the page, with the
per-patch attention CSVs.

Sections: the state of the runs (which are unfinished or missing), results (the C-index table,
paired comparisons with the baseline, a forest plot), survival by predicted risk (Kaplan-Meier,
log-rank), STEPH's dynamics and selections, the loss landscape of task-vector mixup, the
subspace alignment ratio, attention maps, efficiency, and the settings and software of the runs.
A section whose inputs are missing (no STEPH run, no ``--data``, no efficiency measurement) says
what is missing and how to get it instead of failing.
"""

from __future__ import annotations

import base64
import datetime
import html
import logging
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from steph.analysis import runs as R
from steph.errors import StephError
from steph.runs import INPUT, RESULT, RunsFolder
from steph.utils.plotting import NothingToDraw, figure_bytes, save_figure

log = logging.getLogger("steph.report")

SECTIONS = [("runs", "Runs"), ("results", "Results"), ("survival", "Survival by predicted risk"),
            ("transferability", "Which cohorts can help which: zero-shot transfer"),
            ("dynamics", "STEPH: how it used the sources"),
            ("landscape", "Loss landscape of task-vector mixup"),
            ("sar", "Subspace alignment ratio"), ("attention", "Attention maps"),
            ("efficiency", "Efficiency"), ("settings", "Settings and software")]

CSS = """
body { font-family: "DejaVu Sans", "Helvetica Neue", Arial, sans-serif; color: #111;
       max-width: 62rem; margin: 0 auto; padding: 1rem 1.5rem 3rem; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { border-bottom: 1px solid #999;
     padding-bottom: .15rem; margin-top: 2.2rem; } h3 { margin-top: 1.4rem; }
table { border-collapse: collapse; font-size: .82rem; margin: .6rem 0; }
th, td { border: 1px solid #aaa; padding: .2rem .45rem; text-align: left; vertical-align: top; }
th { background: #eee; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: .85rem; color: #333; margin-top: .3rem; }
.note { background: #f4f4f4; border-left: 4px solid #777; padding: .45rem .7rem; margin: .6rem 0; }
.meta { color: #444; font-size: .9rem; } code { font-size: .9em; }
nav ol { columns: 2; font-size: .92rem; }
@media print {
  body { max-width: none; padding: 0; font-size: 10pt; }
  h2 { break-before: page; } h2#runs-title { break-before: avoid; }
  figure, table, .note { break-inside: avoid; }
  a { color: inherit; text-decoration: none; }
  th { background: #eee !important; -webkit-print-color-adjust: exact; print-color-adjust: exact; }
}
"""


@dataclass
class ReportOptions:
    baseline: str = "abmil"  # the method every other is compared with (paired)
    steph: str = "steph"  # the STEPH method (or a variant) whose analyses the report shows
    top_sources: int = 2  # landscapes per target: the sources with the largest final w
    slides: Sequence[str] | None = None  # attention maps of these slides (None: chosen)
    n_slides: int = 2  # chosen slides per target: the highest- and lowest-risk test patients
    step: float = 0.04  # the landscape's grid step (appendix C.2.3)
    device: str = "cpu"  # where the landscape's merged models are evaluated
    progress: bool = True


@dataclass
class Report:
    path: Path  # the HTML file
    figures: dict[str, dict[str, Path]] = field(default_factory=dict)  # name -> fmt -> path
    files: list[Path] = field(default_factory=list)  # other files written (CSV)
    notes: dict[str, list[str]] = field(default_factory=dict)  # section -> notes shown
    inventory: pd.DataFrame | None = None


# -- small HTML helpers -------------------------------------------------------------------------

def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def table_html(df: pd.DataFrame, numeric: Sequence[str] = (), index: bool = False,
               caption: str | None = None) -> str:
    """A table of already formatted values (escaped here)."""
    frame = df.reset_index() if index else df
    head = "".join(f"<th>{esc(c)}</th>" for c in frame.columns)
    body = []
    for row in frame.itertuples(index=False):
        cells = []
        for col, v in zip(frame.columns, row):
            cls = ' class="num"' if col in numeric else ""
            cells.append(f"<td{cls}>{esc(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def note(text: str) -> str:
    return f'<p class="note">{text}</p>'


def _num(v: Any, fmt: str = ".4f") -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "–" if not np.isfinite(f) else format(f, fmt)


class _Page:
    """Collects the sections and writes every figure beside the page."""

    def __init__(self, fig_dir: Path, report: Report):
        self.fig_dir, self.report = fig_dir, report
        self.parts: dict[str, list[str]] = {key: [] for key, _ in SECTIONS}

    def add(self, section: str, text: str) -> None:
        self.parts[section].append(text)

    def note(self, section: str, text: str) -> None:
        self.report.notes.setdefault(section, []).append(text)
        self.add(section, note(text))

    def figure(self, section: str, fig, name: str, caption: str, raster: bool = False) -> None:
        """Write ``name``.png / .svg and embed one of them (SVG, or PNG for maps)."""
        paths = save_figure(fig, self.fig_dir / name)
        self.report.figures[name] = paths
        fmt = "png" if raster else "svg"
        data = paths[fmt].read_bytes() if paths[fmt].exists() else figure_bytes(fig, fmt)
        mime = "image/png" if raster else "image/svg+xml"
        uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
        alt = caption.split(". ")[0]
        files = f"{self.fig_dir.name}/{name}.png, .svg"
        self.add(section, f'<figure id="fig-{esc(name)}"><img src="{uri}" alt="{esc(alt)}">'
                          f"<figcaption>{esc(caption)} <span class=\"meta\">({esc(files)})"
                          "</span></figcaption></figure>")


def _guard(page: _Page, section: str, fn: Callable[[], None]) -> None:
    """Run one part of a section; an input problem (a StephError: a missing file, run or
    feature) or a figure without data becomes a note in that section instead of stopping the
    report."""
    try:
        fn()
    except (StephError, NothingToDraw) as err:
        log.warning("report, %s: %s", section, err)
        page.note(section, f"Could not be shown: {esc(err)}")


# -- the report ---------------------------------------------------------------------------------

def build_report(runs_root: str | Path, data_root: str | Path | None = None,
                 html_path: str | Path | None = None,
                 options: ReportOptions | None = None) -> Report:
    """Write the report of ``runs_root`` (default ``RUNS/report.html``) and its figures; the
    analyses that need features (selections on the test patients, landscapes, attention maps)
    run only with ``data_root``, resuming from their caches."""
    from steph.experiments.summary import collect

    opts = options or ReportOptions()
    root = Path(runs_root)
    if data_root is not None:  # before anything is written: a report never gets weaker by a typo
        from steph.data.cohort import require_data_root

        require_data_root(data_root)
    inventory = R.run_inventory(root)
    out = Path(html_path) if html_path is not None else root / "report.html"
    fig_dir = out.with_name(f"{out.stem}-figures")
    report = Report(path=out, inventory=inventory)
    page = _Page(fig_dir, report)
    summary = collect(root)
    data = Path(data_root) if data_root is not None else None

    _runs_section(page, root, inventory)
    _guard(page, "results", lambda: _results_section(page, root, data, summary, opts))
    _guard(page, "survival", lambda: _survival_section(page, root, inventory, opts))
    _guard(page, "transferability",
           lambda: _transferability_section(page, root, data, inventory, opts))
    steph_runs = R.finished_runs(inventory, method=opts.steph, role=RESULT)
    if not steph_runs:
        for key in ("dynamics", "landscape", "sar", "attention"):
            page.note(key, f"No finished run of <code>{esc(opts.steph)}</code> in this runs "
                      "folder: nothing to show (choose the STEPH method with "
                      "<code>--method</code>).")
    else:
        _guard(page, "dynamics", lambda: _dynamics_section(page, root, data, steph_runs, opts))
        _guard(page, "landscape", lambda: _landscape_section(page, root, data, steph_runs, opts))
        _guard(page, "sar", lambda: _sar_section(page, root, steph_runs))
        _guard(page, "attention", lambda: _attention_section(page, root, data, steph_runs, opts))
    _guard(page, "efficiency", lambda: _efficiency_section(page, root, inventory))
    _guard(page, "settings", lambda: _settings_section(page, root, inventory))

    from steph.utils.io import write_text

    write_text(out, _page_html(page, root, data, inventory))
    _remove_stale_figures(fig_dir, report)
    return report


def _remove_stale_figures(fig_dir: Path, report: Report) -> None:
    """Figures and tables of an earlier report in ``fig_dir`` that this one did not write (a
    section that has nothing to show now): removed, so the folder matches the page."""
    if not fig_dir.is_dir():
        return
    written = {p.resolve() for paths in report.figures.values() for p in paths.values()}
    written |= {p.resolve() for p in report.files}
    for path in fig_dir.iterdir():
        if path.suffix in (".png", ".svg", ".csv") and path.is_file() \
                and path.resolve() not in written:
            path.unlink()
            log.info("report: removed %s, which an earlier report wrote", path)


def _page_html(page: _Page, root: Path, data: Path | None, inventory: pd.DataFrame) -> str:
    import steph

    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    finished = int((inventory["state"] == R.FINISHED).sum())
    toc = "".join(f'<li><a href="#{key}">{esc(title)}</a></li>' for key, title in SECTIONS)
    body = []
    for key, title in SECTIONS:
        content = "\n".join(page.parts[key]) or note("Nothing to show.")
        body.append(f'<section id="{key}"><h2 id="{key}-title">{esc(title)}</h2>\n{content}'
                    "</section>")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>steph report: {esc(root.name)}</title>
<style>{CSS}</style>
</head>
<body>
<header>
<h1>steph report: {esc(root.name)}</h1>
<p class="meta">Runs folder <code>{esc(root.resolve())}</code>; data root
{f'<code>{esc(data.resolve())}</code>' if data else '(none given: the analyses that need features are left out)'};
{finished} finished run(s). Made {esc(now)} by steph {esc(getattr(steph, '__version__', '?'))}.</p>
</header>
<nav><h2 id="contents">Contents</h2><ol>{toc}</ol></nav>
{''.join(body)}
</body>
</html>
"""


# -- sections -----------------------------------------------------------------------------------

def _runs_section(page: _Page, root: Path, inventory: pd.DataFrame) -> None:
    s = "runs"
    counts = inventory.groupby("state").size()
    n_fin = int(counts.get(R.FINISHED, 0))
    page.add(s, f"<p>{n_fin} finished run(s), {int(counts.get(R.UNFINISHED, 0))} unfinished, "
                f"{int(counts.get(R.MISSING, 0))} missing (a fold other methods of the same "
                "cohort have). Every section uses the finished runs only.</p>")
    def folds_table(rows: pd.DataFrame) -> pd.DataFrame:
        return (rows.groupby(["cohort", "method"], sort=False)["fold"]
                .agg(lambda f: ", ".join(str(int(x)) for x in sorted(set(f)))).reset_index()
                .rename(columns={"fold": "finished folds"}))

    fin = inventory[inventory["state"] == R.FINISHED]
    grid = folds_table(fin[fin["role"] == RESULT])
    if len(grid):
        page.add(s, "<h3>Results</h3>")
        page.add(s, table_html(grid))
    inputs = folds_table(fin[fin["role"] == INPUT])
    if len(inputs):
        page.add(s, "<h3>Input runs</h3><p>Models of source cohorts that the transfer runs "
                    "merged (fold 0 of each source, method.md section 4). They are inputs, not "
                    "results: no table or figure of this report includes them.</p>")
        page.add(s, table_html(inputs))
    roles = RunsFolder(root).roles()
    if roles.inferred:
        page.note(s, esc(roles.describe()) + ".")
    todo = inventory[inventory["state"] != R.FINISHED].copy()
    if len(todo):
        todo["note"] = np.where(todo["state"] == R.MISSING, "no run directory",
                                np.where(todo["lease"], "lease file present: may be training now",
                                         "no metrics.json: interrupted or failed"))
        page.note(s, f"{len(todo)} run(s) not finished: the report shows what is finished. "
                  "Resume them with the same <code>steph cv</code> command.")
        page.add(s, table_html(todo[["cohort", "method", "repeat", "fold", "state", "note"]]
                               .astype(str)))
    elif n_fin == 0:
        page.note(s, "No run directory in this folder.")


def _method_order(summary: pd.DataFrame, opts: ReportOptions) -> list[str]:
    names = list(dict.fromkeys(summary["method"]))
    first = [m for m in (opts.baseline, opts.steph) if m in names]
    return first + [m for m in names if m not in first]


def _results_section(page: _Page, root: Path, data: Path | None, summary: pd.DataFrame,
                     opts: ReportOptions) -> None:
    from steph.experiments.compare import ALL, compare_methods, comparison_cells
    from steph.experiments.summary import mean_sd_table, oracle_rows, with_paired_difference
    from steph.report.figures import cindex_figure, forest_figure

    s = "results"
    if summary.empty:
        page.note(s, "No finished run yet.")
        return
    if data is not None:
        oracle = oracle_rows(root, data, summary)
        if not oracle.empty:
            summary = pd.concat([summary, oracle], ignore_index=True)
    methods = _method_order(summary, opts)
    page.add(s, "<h3>Test C-index</h3><p>Mean ± sd over folds (n: folds); <em>Avg.</em>: the "
                "mean of the per-cohort means, for methods run on every cohort"
                + ("; <em>oracle</em>: the C-index of the true risk of the synthetic cohorts, "
                   "the ceiling." if (summary["method"] == "oracle").any() else ".") + "</p>")
    page.add(s, table_html(mean_sd_table(summary, methods), index=True))
    page.figure(s, cindex_figure(summary, methods), "results-cindex",
                "Test C-index of every fold, one panel per cohort with the methods run on it.")
    comp = compare_methods(with_paired_difference(summary, opts.baseline), root,
                           baseline=opts.baseline)
    page.add(s, f"<h3>Paired comparison with {esc(opts.baseline)}</h3>")
    if comp.empty:
        page.note(s, f"No method shares test folds with <code>{esc(opts.baseline)}</code>: no "
                  "paired comparison (choose the baseline with <code>--baseline</code>).")
        return
    per, across = comparison_cells(comp)
    page.add(s, "<p>On the same test folds: the per-fold difference of the test C-index "
                "(mean ± sd) and a patient-bootstrap 95 % interval of the difference of the "
                "pooled out-of-fold C-indices (1,000 resamples).</p>")
    page.add(s, table_html(per))
    if len(across) and (comp["cohort"] != ALL).groupby(comp["method"]).sum().max() > 1:
        page.add(s, "<p>Across cohorts: mean of the per-cohort differences; wins / ties / "
                    "losses by the per-cohort mean; Wilcoxon signed-rank p.</p>")
        page.add(s, table_html(across))
    page.figure(s, forest_figure(comp), "results-forest",
                f"Difference of each method's test C-index to {opts.baseline}, per cohort: "
                "pooled out-of-fold with its 95 % bootstrap interval (filled), and the mean of "
                "the per-fold differences ± sd (open), which wins / ties / losses count.")


def _survival_section(page: _Page, root: Path, inventory: pd.DataFrame,
                      opts: ReportOptions) -> None:
    from steph.analysis.survival import group_summary, risk_groups
    from steph.report.figures import km_figure

    s = "survival"
    fin = inventory[(inventory["state"] == R.FINISHED) & (inventory["repeat"] == 0)
                    & (inventory["role"] == RESULT)]
    targets = list(dict.fromkeys(fin.loc[fin["method"] == opts.steph, "cohort"]))
    if not targets:
        targets = list(dict.fromkeys(fin.loc[fin["method"] == opts.baseline, "cohort"]))
    runs = [r for c in targets for m in (opts.baseline, opts.steph)
            for r in R.finished_runs(fin, method=m, cohort=c)]
    groups = risk_groups(root, runs)
    if groups.empty:
        page.note(s, f"No finished run of <code>{esc(opts.baseline)}</code> or "
                  f"<code>{esc(opts.steph)}</code>.")
        return
    page.add(s, "<p>The test patients of every fold, split at the median of that fold's "
                "<em>training</em> risks (the test patients never decide the cut), pooled over "
                "the folds of the first repeat; Kaplan-Meier curves with 95 % intervals (shaded), "
                "censored patients as ticks, two-sided log-rank test (lifelines).</p>")
    page.figure(s, km_figure(groups, [opts.baseline, opts.steph]), "km",
                "Kaplan-Meier curves of the test patients by predicted risk.")
    table = group_summary(groups)
    table["logrank_p"] = table["logrank_p"].map(lambda p: _num(p, ".3g"))
    page.add(s, table_html(table.astype(str), numeric=["n_high", "events_high", "n_low",
                                                       "events_low", "logrank_p"]))


def _transferability_section(page: _Page, root: Path, data: Path | None,
                             inventory: pd.DataFrame, opts: ReportOptions) -> None:
    from steph.analysis import transferability as T
    from steph.report.figures import transferability_figure

    s = "transferability"
    arch = opts.baseline
    page.add(s, f"<p>Each cohort's own <code>{esc(arch)}</code> model of fold 0 applied "
                "unchanged to every other cohort: the mean test C-index over the target's folds "
                "(rows: source models; columns: targets; framed: the target's own model). It "
                "answers a first question about a study: which cohorts carry prognostic "
                "knowledge another can use. Choices (e.g. of sources) may only use the "
                "training patients' column of <code>transferability.csv</code>.</p>")
    cohorts = set(inventory.loc[(inventory["state"] == R.FINISHED)
                                & (inventory["method"] == arch), "cohort"])
    if len(cohorts) < 2:
        page.note(s, f"Needs finished <code>{esc(arch)}</code> runs of at least two cohorts "
                     f"(<code>steph cv --methods {esc(arch)}</code> over every cohort).")
        return
    if _lacks_features(page, s, data, "transferability --out RUNS --data DATA"):
        return
    table = T.zero_shot_table(root, data, arch, progress=opts.progress)
    matrix = T.transfer_matrix(table)
    page.figure(s, transferability_figure(matrix), "transferability",
                "Zero-shot transfer matrix (test C-index).")
    stats = T.statistics_table(T.transfer_statistics(matrix))
    stats["value"] = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in stats["value"]]
    page.add(s, table_html(stats[["statistic", "value"]]))


def _dynamics_section(page: _Page, root: Path, data: Path | None, steph_runs: list[R.RunRef],
                      opts: ReportOptions) -> None:
    from steph.analysis.dynamics import (
        last_epoch,
        selection_frequency,
        steph_dynamics,
        test_selections,
    )
    from steph.report.figures import dynamics_figure, selection_figure

    s = "dynamics"
    dyn = steph_dynamics(root, steph_runs)
    if dyn.empty:
        page.note(s, "The STEPH runs' logs have no per-source statistics.")
        return
    page.add(s, "<p>Mean merge weight w and mixup coefficient λ of every source over the "
                "training bags of each epoch (appendix D.1, Figures S1 and S2), averaged over "
                "the folds. λ = 1 keeps the target's own task vector; a source contributes "
                "through w (1 − λ).</p>")
    page.figure(s, dynamics_figure(dyn), "steph-dynamics",
                "STEPH's w and λ per source and epoch.")
    facts = []
    for run in steph_runs:
        m = R.read_metrics(run.path(root))
        facts.append({"run": str(run), "gamma": _num(m.get("gamma"), "g"),
                      "w alive in last epoch": _num(m.get("merge_alive_last_epoch"), ".2f"),
                      "restarts": str(len(m.get("restarts", []) or [])),
                      "test C-index": _num(m.get("c_index"))})
    page.add(s, table_html(pd.DataFrame(facts)))
    page.add(s, "<h3>Selected sources</h3>")
    if data is None:
        freq = last_epoch(dyn)
        page.note(s, "Without <code>--data</code>: the share of <em>training</em> bags on which "
                  "each source was among the K selected, in the last epoch (from the log). "
                  "With <code>--data</code> the report runs STEPH's <code>explain</code> on "
                  "every test patient instead (cached).")
        page.figure(s, selection_figure(freq, on="training bags, last epoch"),
                    "steph-selection", "How often STEPH selected each source (training bags).")
        return
    sel = pd.concat([test_selections(root, data, run, opts.progress) for run in steph_runs],
                    ignore_index=True)
    freq = selection_frequency(sel)
    page.add(s, "<p>STEPH's <code>explain</code> on every test patient of every fold: the share "
                "of test patients for which each source was among the K selected, with the mean "
                "w and λ it gave them (cached in <code>.cache/analysis/selection</code>).</p>")
    page.figure(s, selection_figure(freq), "steph-selection",
                "How often STEPH selected each source on the test patients.")
    shown = freq.copy()
    for col, fmt in (("selected_share", ".2f"), ("mean_w", ".3f"), ("mean_lambda", ".3f")):
        shown[col] = shown[col].map(lambda v, f=fmt: _num(v, f))
    page.add(s, table_html(shown.astype(str), numeric=["patients", "selected_share", "mean_w",
                                                       "mean_lambda"]))


def _lacks_features(page: _Page, section: str, data: Path | None, analyze_args: str) -> bool:
    """Without a data root, note in ``section`` how to get its figures; True if so."""
    if data is None:
        page.note(section, "Needs the features: run <code>steph report --data DATA</code> or "
                  f"<code>steph analyze {analyze_args}</code>.")
    return data is None


def _first_fold_runs(steph_runs: list[R.RunRef]) -> list[R.RunRef]:
    """Per target cohort, the STEPH run of the lowest repeat and fold."""
    out: dict[str, R.RunRef] = {}
    for run in sorted(steph_runs, key=lambda r: (r.cohort, r.repeat, r.fold)):
        out.setdefault(run.cohort, run)
    return list(out.values())


def _landscape_section(page: _Page, root: Path, data: Path | None, steph_runs: list[R.RunRef],
                       opts: ReportOptions) -> None:
    from steph.analysis.dynamics import top_sources
    from steph.analysis.landscape import landscape_summary, steph_landscapes
    from steph.report.figures import landscape_figure

    s = "landscape"
    page.add(s, "<p>Test loss of θ<sub>0</sub> + C<sub>s</sub> τ<sub>s</sub> + C<sub>t</sub> "
                "τ<sub>t</sub> on the grid C ∈ {0, 0.04, …, 1} (26 × 26 merged models, every "
                "tensor of the network), smoothed by a Gaussian of σ = 1 grid step (appendix "
                "C.2.3), on the test patients of the first fold, for the sources with the "
                "largest final w. The dashed segment is task-vector mixup (C<sub>t</sub> = λ, "
                "C<sub>s</sub> = 1 − λ); circles: STEPH's mean λ per epoch.</p>")
    if _lacks_features(page, s, data, "landscape --out RUNS --data DATA --target T"):
        return
    for run in _first_fold_runs(steph_runs):
        sources = top_sources(root, run, opts.top_sources)
        lands = steph_landscapes(root, data, run, sources, step=opts.step, device=opts.device,
                                 progress=opts.progress)
        name = f"landscape-{run.cohort}-fold{run.fold}"
        page.figure(s, landscape_figure(lands), name,
                    f"Loss landscape of task-vector mixup, target {run.cohort}, fold {run.fold}.",
                    raster=True)
        rows = [{"source": r.source, "lowest loss at (C_s, C_t)": f"({r.c_s:.2f}, {r.c_t:.2f})",
                 "lowest loss": _num(r.loss), "lowest on mixup at λ": f"{r.mixup_lambda:.2f}",
                 "its loss": _num(r.mixup_loss), "STEPH's final λ": _num(r.steph_lambda, ".3f"),
                 "target model's loss (0, 1), not smoothed": _num(r.target_loss)}
                for r in landscape_summary(lands).itertuples(index=False)]
        page.add(s, table_html(pd.DataFrame(rows)))


def _sar_section(page: _Page, root: Path, steph_runs: list[R.RunRef]) -> None:
    from steph.analysis.sar import ALPHA, sar_at_steph, steph_sar
    from steph.report.figures import sar_figure

    s = "sar"
    page.add(s, f"<p>SAR(τ<sub>t</sub>, τ<sub>mix</sub>): the share of τ<sub>t</sub> (Frobenius) "
                f"inside the dominant ({ALPHA:.0%}) left subspace of τ<sub>mix</sub> = λ "
                "τ<sub>t</sub> + (1 − λ) τ<sub>s</sub> (appendix A, Figure 5), for the encoder's "
                "weight matrices, over λ and at STEPH's final λ (large markers). λ = 0 is the "
                "source's own task vector, λ = 1 τ<sub>t</sub> itself (SAR ≥ 0.9987 at "
                "α = 0.95).</p>")
    frames = [steph_sar(root, run) for run in _first_fold_runs(steph_runs)]
    sar = pd.concat(frames, ignore_index=True)
    page.figure(s, sar_figure(sar), "sar", "Subspace alignment ratio of τ_mix with τ_t.")
    at = sar_at_steph(sar)
    if len(at):
        rows = [{"target": r.cohort, "fold": str(r.fold), "source": r.source, "matrix": r.layer,
                 "STEPH's λ": _num(r.lam, ".3f"),
                 "SAR at STEPH's λ": _num(r.sar, ".3f"),
                 "SAR of τ_s (λ = 0)": _num(r.sar_own, ".3f")}
                for r in at.rename(columns={"lambda": "lam"}).itertuples(index=False)]
        page.add(s, table_html(pd.DataFrame(rows), numeric=["STEPH's λ", "SAR at STEPH's λ",
                                                            "SAR of τ_s (λ = 0)"]))


def _attention_section(page: _Page, root: Path, data: Path | None, steph_runs: list[R.RunRef],
                       opts: ReportOptions) -> None:
    from steph.analysis.attention import attention_table, default_slides, locate_slide
    from steph.report.figures import attention_figure
    from steph.utils.io import write_csv

    s = "attention"
    page.add(s, "<p>Attention of the target's own model and of STEPH's merged model over the "
                "patches of test slides (Figure S4), as percentiles within the slide; the "
                "per-patch values (x, y and each model's attention weight) are written as CSV "
                "beside the figures for viewers such as QuPath.</p>")
    if _lacks_features(page, s, data, "attention --out RUNS --data DATA --slide SLIDE"):
        return
    chosen: list[tuple[R.RunRef, str]] = []
    if opts.slides:
        first = [r for r in steph_runs if r.repeat == 0]
        for slide in opts.slides:
            _guard(page, s, lambda sl=slide: chosen.append((locate_slide(root, data, first, sl),
                                                            sl)))
    else:
        for run in _first_fold_runs(steph_runs):
            chosen += [(run, sl) for sl in default_slides(root, data, run, opts.n_slides)]
        page.add(s, "<p>Slides: the first slide of the test patients of the first fold with the "
                    "highest and the lowest STEPH risk (choose others with "
                    "<code>--slide</code>).</p>")
    def one(run: R.RunRef, slide: str) -> None:
        table = attention_table(root, data, run, slide)
        csv = page.fig_dir / f"attention-{slide}.csv"
        write_csv(csv, table)
        page.report.files.append(csv)
        page.figure(s, attention_figure(table), f"attention-{slide}",
                    f"Attention maps of slide {slide} ({run.cohort}, test patient of fold "
                    f"{run.fold}); per-patch CSV: {page.fig_dir.name}/{csv.name}.", raster=True)

    for run, slide in chosen:
        _guard(page, s, lambda r=run, sl=slide: one(r, sl))


def _efficiency_section(page: _Page, root: Path, inventory: pd.DataFrame) -> None:
    from steph.report.figures import efficiency_figure

    s = "efficiency"
    found = sorted(root.glob("efficiency*.csv"))
    if found:
        table = pd.read_csv(found[0])
        setting = ""
        if {"instances", "dim", "n_sources", "device"} <= set(table.columns):
            r = table.iloc[0]
            setting = (f" on one bag of {int(r['instances']):,} × {int(r['dim'])} features, "
                       f"m = {int(r['n_sources'])} sources, {r['device']}")
        page.add(s, f"<p>From <code>{esc(found[0].name)}</code> (<code>steph bench "
                    f"efficiency</code>){esc(setting)}: learnable parameters, inference GFLOPs "
                    "and the median latency of one forward pass (Table S4).</p>")
        page.figure(s, efficiency_figure(table), "efficiency",
                    "Learnable parameters, GFLOPs and latency per method.")
        shown = pd.DataFrame({
            "method": table["method"], "arch": table.get("arch", ""),
            "learnable params (M)": (table["learnable_params"] / 1e6).map(lambda v: _num(v, ".3f")),
            "GFLOPs": table["gflops_total"].map(lambda v: _num(v, ".2f")),
            "latency (ms)": table["latency_ms"].map(lambda v: _num(v, ".1f"))})
        page.add(s, table_html(shown.astype(str), numeric=list(shown.columns[2:])))
    else:
        page.note(s, "No efficiency measurement in this runs folder. Make one with "
                  f"<code>steph bench efficiency --out {esc(root / 'efficiency.csv')}</code> "
                  "(add <code>--dim</code>, <code>--instances</code>, <code>--sources</code> "
                  "for your setting) and build the report again.")
    times = R.epoch_seconds(root, inventory)
    if len(times):
        page.add(s, "<h3>Training time per epoch</h3><p>As recorded in the runs' "
                    "<code>run.json</code> (Table S6 measures this on one machine; runs of "
                    "different hosts or thread counts are not comparable).</p>")
        shown = times.assign(mean_seconds=times["mean_seconds"].map(lambda v: _num(v, ".2f")),
                             sd_seconds=times["sd_seconds"].map(lambda v: _num(v, ".2f")))
        page.add(s, table_html(shown.astype(str), numeric=["runs", "epochs", "mean_seconds",
                                                          "sd_seconds"]))


def _settings_section(page: _Page, root: Path, inventory: pd.DataFrame) -> None:
    s = "settings"
    differing, common = R.settings_table(root, inventory)
    if len(differing):
        page.add(s, "<h3>Settings that differ</h3><p>Between methods, or between runs of one "
                    "method (values separated by |); – where a method has no such setting.</p>")
        page.add(s, table_html(differing))
    if common:
        page.add(s, "<h3>Settings shared by every method that has them</h3>")
        page.add(s, table_html(_grouped_settings(common, _section_users(root, inventory))))
    prov = R.provenance(root, inventory)
    if len(prov):
        page.add(s, "<h3>Software of the runs</h3><p>From each run's <code>run.json</code>.</p>")
        page.add(s, table_html(prov.astype(str), numeric=["runs"]))
    page.add(s, "<h3>Software of this report</h3>")
    page.add(s, table_html(pd.DataFrame(_versions().items(), columns=["package", "version"])))


def _section_users(root: Path, inventory: pd.DataFrame) -> dict[str, list[str]]:
    """Config section -> the methods whose runs have that section."""
    out: dict[str, list[str]] = {}
    for run in R.finished_runs(inventory):
        for section in R.read_settings(run.path(root)):
            if section != "run" and run.method not in out.setdefault(section, []):
                out[section].append(run.method)
    return out


def _grouped_settings(common: dict[str, str], sections: dict[str, list[str]]) -> pd.DataFrame:
    """The shared settings as one row per config section: who uses it and its key = value
    pairs."""
    every = {m for ms in sections.values() for m in ms}
    rows = []
    for section in dict.fromkeys(k.split(".", 1)[0] for k in common):
        users = sections.get(section, [])
        pairs = [f"{k.split('.', 1)[1]} = {v}" for k, v in common.items()
                 if k.split(".", 1)[0] == section]
        rows.append({"section": section,
                     "used by": "every method" if set(users) == every else ", ".join(users),
                     "settings": "; ".join(pairs)})
    return pd.DataFrame(rows, columns=["section", "used by", "settings"])


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("steph", "torch", "numpy", "pandas", "scipy", "matplotlib", "lifelines"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
