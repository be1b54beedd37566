"""The fuzzers count the cases they ran; the counts are printed after the test summary."""

from __future__ import annotations

from collections import Counter

import pytest

FUZZ_COUNTS = pytest.StashKey[Counter]()


@pytest.fixture(scope="session")
def fuzz_counts(pytestconfig) -> Counter:
    """reader -> number of generated cases it ran, in this session."""
    return pytestconfig.stash.setdefault(FUZZ_COUNTS, Counter())


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    counts = config.stash.get(FUZZ_COUNTS, None)
    if counts:
        terminalreporter.section("fuzzed readers")
        for name, n in sorted(counts.items()):
            terminalreporter.write_line(f"{name}: {n} generated cases")
