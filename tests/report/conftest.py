"""A report built once on a copy of the tiny finished grid (with an efficiency measurement)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def copy_grid(tiny_grid: Path, dest: Path) -> Path:
    """A private copy of the shared grid (the report writes caches into its runs folder)."""
    shutil.copytree(tiny_grid, dest)
    return dest


@pytest.fixture
def grid_copy(tiny_grid, tmp_path) -> Path:
    """A copy of the tiny grid for a test that changes it."""
    return copy_grid(tiny_grid, tmp_path / "runs")


@pytest.fixture(scope="session")
def report_grid(tiny_grid, tmp_path_factory) -> Path:
    runs = copy_grid(tiny_grid, tmp_path_factory.mktemp("report-grid") / "runs")
    from steph.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", "efficiency", "--methods", "abmil,steph,adamerging", "--instances", "50",
              "--dim", "16", "--bins", "4", "--sources", "2", "--repeats", "1", "--warmup", "0",
              "--out", str(runs / "efficiency.csv")])
        raise SystemExit(0)
    assert exc.value.code in (0, None)
    return runs


@pytest.fixture(scope="session")
def built_report(report_grid, tiny_data):
    """The report of ``report_grid`` with the data root: every section has its inputs."""
    from steph.report import ReportOptions, build_report

    return build_report(report_grid, tiny_data, report_grid.parent / "out" / "report.html",
                        ReportOptions(progress=False))
