"""What a runs folder is on disk: run references, run directories and their records
(:mod:`steph.runs.layout`), and the format versions of those records
(:mod:`steph.runs.migrations`)."""

from steph.runs.layout import RunDir, RunRef, RunsFolder, read_log_rows

__all__ = ["RunDir", "RunRef", "RunsFolder", "read_log_rows"]
