"""Fixtures of the kill harness: one fork server and one undisturbed reference per grid, for
the whole session; the kill points run are counted and listed after the test summary."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import harness as H

VERDICTS = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def verdicts(pytestconfig) -> dict[str, list]:
    """scenario -> the kill points run in this session (harness.Verdict)."""
    return pytestconfig.stash.setdefault(VERDICTS, {})


@pytest.fixture(scope="session")
def fork_server(tmp_path_factory):
    server = H.ForkServer(tmp_path_factory.mktemp("fork-server-logs"))
    yield server
    server.close()


def _harness(grid, tiny_data, tmp_path_factory, fork_server) -> H.Harness:
    return H.Harness(grid, tiny_data, tmp_path_factory.mktemp(f"kill-{grid.name}"), fork_server,
                     reference_launcher=H.SubprocessLauncher())


@pytest.fixture(scope="session")
def main_grid(tiny_data, tmp_path_factory, fork_server) -> H.Harness:
    return _harness(H.MAIN, tiny_data, tmp_path_factory, fork_server)


@pytest.fixture(scope="session")
def guard_grid(tiny_data, tmp_path_factory, fork_server) -> H.Harness:
    return _harness(H.GUARD, tiny_data, tmp_path_factory, fork_server)


@pytest.fixture(scope="session")
def search_grid(tiny_data, tmp_path_factory, fork_server) -> H.Harness:
    return _harness(H.SEARCH, tiny_data, tmp_path_factory, fork_server)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    runs = config.stash.get(VERDICTS, None)
    if runs:
        terminalreporter.section("kill points")
        total = sum(len(v) for v in runs.values())
        passed = sum(x.passed for v in runs.values() for x in v)
        for name, found in runs.items():
            terminalreporter.write_line(H.report(name, found))
        terminalreporter.write_line(f"all scenarios: {total} kill point(s) run, {passed} passed")
