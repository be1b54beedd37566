"""Interleaved timing: candidates are run in rotation for several rounds so that machine noise
hits all of them alike; ratios are taken between medians of the same run."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved(fns: dict[str, Callable[[], object]], rounds: int = 7, warmup: int = 2,
                inner: int = 1) -> dict[str, float]:
    """Median seconds per call of each function."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        # rotate the order every round so no candidate always runs first (cache, clocks)
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - t) / inner)
    return {k: statistics.median(v) for k, v in samples.items()}
