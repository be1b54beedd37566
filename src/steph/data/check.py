"""``steph data check``: every problem of a data root's cohorts, all at once.

Each cohort is read as training reads it (labels, every slide's feature file at the ``shape``
or ``full`` level, its own split files when it has some); a problem in one cohort never stops
the check of the others. Bad slides are listed one per line (training can leave them out with
``data.on_bad_slide=skip``); a cohort that cannot be read at all (its label table, no usable
slide, its split files) is one line; cohorts of different feature dimensions are one line too
(a runs folder's models start from one theta_0 per network).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from steph.config import DataConfig
from steph.data.cohort import Cohort, discover_cohorts
from steph.data.splits import has_split_files, read_splits
from steph.errors import ConfigError, StephError, one_line


@dataclass
class CheckReport:
    lines: list[str] = field(default_factory=list)
    cohort_problems: int = 0  # cohorts that cannot be used (and other data-root problems)
    slide_problems: int = 0  # slides training with on_bad_slide=skip would leave out


def check_data_root(data_root: str | Path, cohorts: Sequence[str] | None, data: DataConfig,
                    check: str = "shape") -> CheckReport:
    names = list(cohorts or discover_cohorts(data_root, data.labels))
    if not names:
        raise ConfigError(f"no cohort found under {data_root} (expected <cohort>/{data.labels})")
    report = CheckReport()
    dims: dict[int, list[str]] = {}
    bad_cohorts = 0
    quiet = logging.getLogger("steph.data.cohort")
    before = quiet.level
    quiet.setLevel(logging.ERROR)  # the skipped slides are listed below, not warned about
    try:
        for name in names:
            try:
                c = Cohort.from_config(Path(data_root) / name, data, on_bad_slide="skip",
                                       check=check, use_pack=False)
            except StephError as err:
                report.lines.append(f"{name}: {one_line(err, limit=2000)}")
                report.cohort_problems += 1
                bad_cohorts += 1
                continue
            problems = [str(r) for r in c.skipped["reason"]]
            if has_split_files(c.splits_dir):
                try:
                    read_splits(c.splits_dir, c.patient_ids)
                except StephError as err:
                    problems.append(f"splits: {one_line(err, limit=2000)}")
                    report.cohort_problems += 1
            report.slide_problems += len(c.skipped)
            dims.setdefault(c.feature_dim, []).append(name)
            report.lines.append(f"{name}: {len(c)} patients, {len(c.slides)} slides, dim "
                                f"{c.feature_dim}, {len(problems)} problem(s)")
            report.lines += [f"  - {p}" for p in problems]
            bad_cohorts += bool(problems)
    finally:
        quiet.setLevel(before)
    if len(dims) > 1:
        listing = "; ".join(f"{', '.join(have)}: {dim}" for dim, have in sorted(dims.items()))
        report.lines.append(f"feature dimensions differ between cohorts ({listing}): cohorts "
                            "merged with each other need one feature dimension")
        report.cohort_problems += 1
    total = report.cohort_problems + report.slide_problems
    report.lines.append(f"{total} problem(s) in {bad_cohorts} of {len(names)} cohort(s)"
                        if total else f"no problem found in {len(names)} cohort(s)")
    return report
