"""Kill a small grid with SIGKILL at many moments, rerun it, and get the undisturbed results.

Each kill point is a moment of the undisturbed run's trace (``<point>@<n>``): the command is
killed there in a fresh runs folder, rerun without the fault until it exits 0, and must end
with the reference's weights, predictions, metrics, logs (without timings), splits and
summary bit for bit, with no temporary file left in a run directory. The default run kills a
representative subset (``DEFAULT``); ``-m slow`` sweeps every point name of each grid at its
first, quarter, middle, three-quarter and last occurrence and every epoch and checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import harness as H

# (point, which occurrence, what moment it is[, faults of the reruns that follow])
DEFAULT = [
    ("train:bag", "middle", "between the bags of an optimiser step"),
    ("train:epoch", "middle", "after an epoch; killed again twice while resuming",
     ("write:log.jsonl@1", "train:step@2")),
    ("backup:checkpoint.safetensors", "last", "between a checkpoint's two renames"),
]
# more moments, each a kill and a rerun of the grid (about 10-20 s each): with -m slow
MORE = [
    ("write:theta0.safetensors", "first", "theta_0 being written"),
    ("write:metrics.json", "last", "the last run's metrics being written"),
    ("write:fold_1.csv", "first", "the splits half written"),
    ("train:step", "last", "after the last optimiser step of the grid"),
    ("write:checkpoint.safetensors", "middle", "a checkpoint being written"),
    ("write:log.jsonl", "last", "the last epoch's log being written"),
    ("write:predictions.csv", "middle", "predictions being written"),
    ("write:summary.csv", "first", "the summary being written"),
]


def _run(h: H.Harness, kills: list[H.KillPoint], verdicts: dict, scenario: str) -> None:
    found = h.run_all(kills)
    verdicts.setdefault(scenario, []).extend(found)
    text = H.report(scenario, found)
    print(text)
    assert all(v.passed for v in found), text


def test_kill_points_of_the_grid(main_grid, verdicts):
    kills = [main_grid.at(*spec) for spec in DEFAULT]
    _run(main_grid, kills, verdicts, "ABMIL + STEPH + AdaMerging grid")


@pytest.mark.slow
def test_more_kill_points_of_the_grid(main_grid, verdicts):
    kills = [main_grid.at(*spec) for spec in MORE]
    _run(main_grid, kills, verdicts, "ABMIL + STEPH + AdaMerging grid, more moments")


def test_kill_during_a_collapse_guard_restart(guard_grid, verdicts):
    # the guard fired in the undisturbed run: STEPH restarted once, with gamma 0
    assert guard_grid.occurrences().get("restart:log") == 1
    kills = [guard_grid.at("restart:checkpoint", "first", "restart: a checkpoint removed"),
             guard_grid.at("restart:log", "first", "restart: before attempts.json")]
    _run(guard_grid, kills, verdicts, "STEPH collapse-guard restart")


@pytest.mark.slow  # a search grid of its own (about 80 s on 2 cores)
def test_kill_inside_a_gamma_search(search_grid, verdicts):
    kills = [search_grid.at("search:candidate", "middle", "between two candidates"),
             search_grid.at("search:target", "last", "an inner target model written")]
    _run(search_grid, kills, verdicts, "STEPH gamma search")


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["main", "guard", "search"])
def test_kill_sweep(scenario, request, verdicts):
    h = request.getfixturevalue(f"{scenario}_grid")
    kills = H.sweep(h)
    if scenario == "main":
        kills += [h.at(point, which, "killed again while resuming", then)
                  for point, which, then in H.CHAINS]
    assert len(kills) >= {"main": 100, "guard": 40, "search": 40}[scenario]
    _run(h, kills, verdicts, f"sweep of the {scenario} grid")
