"""Interleaved timing: candidates are run in rotation for several rounds so that machine noise
hits all of them alike; ratios are taken between medians of the same run (used by
``steph bench efficiency`` and the scripts under ``benchmarks/``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(fns: dict[str, Callable[[], object]], rounds: int = 7, warmup: int = 2,
                inner: int = 1, before: Callable[[str], object] | None = None
                ) -> dict[str, float]:
    """Median seconds per call of each function. ``before(name)``, when given, runs untimed
    before every timed call of candidate ``name`` (e.g. to drop its files from the page cache).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        # rotate the order every round so no candidate always runs first (cache, clocks)
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            if before is not None:
                before(name)
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - t) / inner)
    return {k: statistics.median(v) for k, v in samples.items()}
