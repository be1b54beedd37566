"""What a runs folder is on disk: run references, run directories and their records
(:mod:`steph.runs.layout`), which runs are results and which only inputs
(:mod:`steph.runs.requests`), and the format versions of those records
(:mod:`steph.runs.migrations`)."""

from steph.runs.layout import RunDir, RunRef, RunsFolder, read_log_rows
from steph.runs.requests import INPUT, RESULT, RunRoles

__all__ = ["INPUT", "RESULT", "RunDir", "RunRef", "RunRoles", "RunsFolder", "read_log_rows"]
