"""The report of a runs folder (``steph report``) and its figures.

- :mod:`steph.report.figures`: one function per figure, each returning a matplotlib figure;
- :mod:`steph.report.html`: the self-contained HTML page (:func:`build_report`);
- :mod:`steph.report.commands`: ``steph analyze landscape | sar | attention``.
"""

from steph.report.html import Report, ReportOptions, build_report

__all__ = ["Report", "ReportOptions", "build_report"]
