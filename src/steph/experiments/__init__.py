"""The cohort x fold x method grid (plan, workspace, runner, writer, inner search), its
executors (local, Ray), leases, summary tables and plots, the demo."""

from steph.experiments.cv import Experiment, parse_folds, run_cv
from steph.experiments.executors import GridError, LocalExecutor, RayExecutor
from steph.experiments.summary import collect, markdown_table, write_summary
from steph.methods import get_method, list_methods, register_method
from steph.runs import RunRef

__all__ = [
    "Experiment",
    "GridError",
    "LocalExecutor",
    "RayExecutor",
    "RunRef",
    "collect",
    "get_method",
    "list_methods",
    "markdown_table",
    "parse_folds",
    "register_method",
    "run_cv",
    "write_summary",
]
