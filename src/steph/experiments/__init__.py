"""The cohort x fold x method grid, its executors (local, Ray), run directories, summary tables
and plots, the demo."""

from steph.experiments.cv import Experiment, Job, parse_folds, run_cv
from steph.experiments.executors import GridError, LocalExecutor, RayExecutor
from steph.experiments.summary import collect, markdown_table, write_summary
from steph.methods import get_method, list_methods, register_method

__all__ = [
    "Experiment",
    "GridError",
    "Job",
    "LocalExecutor",
    "RayExecutor",
    "collect",
    "get_method",
    "list_methods",
    "markdown_table",
    "parse_folds",
    "register_method",
    "run_cv",
    "write_summary",
]
