"""The kill-at-many-moments harness (issue 11).

A grid (``steph cv`` with a config file) runs once undisturbed as the reference, traced
(``STEPH_FAULT=trace:<file>``: every fault point it reaches, with its occurrence). Each kill
point ``<point>@<n>`` of that trace is then a moment of the command: the command runs from an
empty runs folder with ``STEPH_FAULT=<point>@<n>``, must die of SIGKILL, is rerun without the
fault until it exits 0, and its results must equal the reference's bit for bit.

Commands run in separate processes: the reference as ``python -m steph``, the kills and
reruns as children of a fork server (``forkserver.py``) that has imported everything once, so
that a kill point costs the grid's own work and not two torch imports.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from steph.utils.faults import read_trace

HERE = Path(__file__).resolve().parent
TIMEOUT = 600.0  # seconds one command may take

# -- results ------------------------------------------------------------------------------------

# files whose content is the result of a grid (compared bit for bit; logs without timings)
RESULTS = ("*/*/fold*/model.safetensors", "*/*/fold*/predictions.csv", "*/*/fold*/metrics.json",
           "*/*/fold*/log*.jsonl", "*/*/fold*/attempts.json", "*/*/fold*/search/*.json",
           "*/*/fold*/search/*/*/score.json", "*/*/fold*/search/*/target/model.safetensors",
           "summary.csv", "comparisons.csv", "theta0*.safetensors", "splits/*/*")
TIMINGS = {"seconds"}  # log fields that are wall-clock times


def results(out: Path) -> dict[str, Any]:
    """relative path -> what must be identical: the bytes, or a log's rows without timings."""
    found: dict[str, Any] = {}
    for pattern in RESULTS:
        for path in sorted(out.glob(pattern)):
            if path.name.startswith("."):  # an interrupted write's temporary file
                continue
            rel = str(path.relative_to(out))
            if path.suffix == ".jsonl":
                rows = [json.loads(line) for line in path.read_text().splitlines()]
                found[rel] = [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]
            else:
                found[rel] = path.read_bytes()
    return found


def differences(reference: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """The result files that differ, are missing or are extra."""
    out = [f"missing {p}" for p in sorted(set(reference) - set(got))]
    out += [f"extra {p}" for p in sorted(set(got) - set(reference))]
    out += [f"differs {p}" for p in sorted(set(reference) & set(got)) if reference[p] != got[p]]
    return out


def leftovers(out: Path) -> list[str]:
    """Temporary files of interrupted atomic writes left inside run directories (the runs
    folder's own files, e.g. the splits or a summary, may keep one: nothing reads them)."""
    return sorted(str(p.relative_to(out)) for p in out.glob("*/*/**/fold*/**/.*.tmp"))


# -- processes ----------------------------------------------------------------------------------

@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL

    def tail(self, n: int = 6) -> str:
        return " | ".join(self.stderr.strip().splitlines()[-n:])


def base_env() -> dict[str, str]:
    """This environment without fault settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("STEPH_FAULT")}


class SubprocessLauncher:
    """``python -m steph <argv>``."""

    def run(self, argv: Sequence[str], env: dict[str, str], cwd: Path,
            timeout: float = TIMEOUT) -> Outcome:
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "steph", *argv], env=env, cwd=cwd,
                           capture_output=True, text=True, timeout=timeout, check=False)
        return Outcome(p.returncode, p.stdout, p.stderr, time.perf_counter() - t0)

    def close(self) -> None:
        pass


class ForkServer:
    """A child of ``forkserver.py`` per command (see its docstring)."""

    def __init__(self, logs: Path):
        self.logs = Path(logs)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.n = 0
        self.proc = subprocess.Popen([sys.executable, str(HERE / "forkserver.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=base_env(), text=True, bufsize=1)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._next(300.0)  # {"ready": pid}

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")  # the server ended

    def _next(self, timeout: float) -> dict[str, Any]:
        line = self.lines.get(timeout=timeout)
        if not line:
            raise RuntimeError(f"the fork server ended (status {self.proc.wait()})")
        return json.loads(line)

    def run(self, argv: Sequence[str], env: dict[str, str], cwd: Path,
            timeout: float = TIMEOUT) -> Outcome:
        self.n += 1
        stdout, stderr = self.logs / f"{self.n}.out", self.logs / f"{self.n}.err"
        req = {"argv": list(argv), "env": env, "cwd": str(cwd), "stdout": str(stdout),
               "stderr": str(stderr)}
        t0 = time.perf_counter()
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        child = self._next(60.0)["pid"]
        try:
            status = self._next(timeout)["status"]
        except queue.Empty:
            os.kill(child, signal.SIGKILL)
            self._next(60.0)
            raise TimeoutError(f"steph {' '.join(argv)} ran for more than {timeout} s") from None
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return Outcome(code, stdout.read_text(), stderr.read_text(), time.perf_counter() - t0)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# -- grids --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Grid:
    """A ``steph cv`` command: methods on targets' folds with a config."""

    name: str
    methods: str
    config: dict[str, Any] = field(hash=False)
    targets: str = "TGT"
    folds: str = "0-1"
    sources: str | None = None

    def argv(self, data: Path, out: Path, config: Path) -> list[str]:
        argv = ["cv", "--data", str(data), "--out", str(out), "--methods", self.methods,
                "--targets", self.targets, "--folds", self.folds, "--config", str(config),
                "--quiet"]
        return argv + (["--sources", self.sources] if self.sources else [])


@dataclass(frozen=True)
class KillPoint:
    """``<point>@<nth>`` of the reference; ``then``: faults for the reruns that follow, one
    each, counted in that rerun's own process (a kill while resuming)."""

    point: str
    nth: int
    why: str = ""
    then: tuple[str, ...] = ()

    @property
    def spec(self) -> str:
        return f"{self.point}@{self.nth}"

    @property
    def label(self) -> str:
        return ", then ".join([self.spec, *self.then])


@dataclass
class Verdict:
    kill: KillPoint
    passed: bool
    detail: str
    reruns: int = 0
    seconds: float = 0.0


class Harness:
    """A grid, its undisturbed reference and kill points run against it."""

    def __init__(self, grid: Grid, data: Path, work: Path, launcher: Any,
                 reference_launcher: Any | None = None):
        self.grid, self.data, self.work, self.launcher = grid, Path(data), Path(work), launcher
        self.work.mkdir(parents=True, exist_ok=True)
        self.config = self.work / f"{grid.name}.yaml"
        self.config.write_text(yaml.safe_dump(grid.config, sort_keys=False))
        self.reference_dir = self.work / "reference"
        trace_file = self.work / "reference.trace"
        trace_file.unlink(missing_ok=True)
        shutil.rmtree(self.reference_dir, ignore_errors=True)
        env = {**base_env(), "STEPH_FAULT": f"trace:{trace_file}"}
        ran = (reference_launcher or launcher).run(self.argv(self.reference_dir), env, self.work)
        if ran.returncode != 0:
            raise AssertionError(f"{grid.name}: the undisturbed run failed: {ran.tail()}")
        self.trace = read_trace(trace_file)
        self.reference = results(self.reference_dir)
        self.seconds = ran.seconds
        self.verdicts: list[Verdict] = []

    def argv(self, out: Path) -> list[str]:
        return self.grid.argv(self.data, out, self.config)

    def occurrences(self) -> dict[str, int]:
        """point -> how many times the reference reached it, in order of first reach."""
        counts: dict[str, int] = {}
        for name, nth in self.trace:
            counts[name] = max(counts.get(name, 0), nth)
        return counts

    def at(self, point: str, which: str | int, why: str = "", then: Sequence[str] = ()
           ) -> KillPoint:
        """The ``which`` ("first", "middle", "last" or an occurrence) time ``point`` is
        reached (a point the reference never reached is an error); ``then``: see KillPoint."""
        total = self.occurrences().get(point)
        if not total:
            raise AssertionError(f"{self.grid.name}: the reference never reached {point!r}; "
                                 f"points: {sorted(self.occurrences())}")
        nth = {"first": 1, "middle": (total + 1) // 2, "last": total}.get(which, which)
        assert isinstance(nth, int) and 1 <= nth <= total, (point, which, total)
        return KillPoint(point, nth, why or f"{which} of {total}", tuple(then))

    def kill(self, kp: KillPoint, max_reruns: int = 3) -> Verdict:
        """Kill the command at ``kp`` in a fresh runs folder, rerun it until it finishes, and
        compare its results with the reference's."""
        out = self.work / f"kill-{len(self.verdicts)}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        first = self.launcher.run(self.argv(out), {**base_env(), "STEPH_FAULT": kp.spec},
                                  self.work)
        verdict = self._resume(kp, out, first, max_reruns)
        verdict.seconds = time.perf_counter() - t0
        self.verdicts.append(verdict)
        if verdict.passed:
            shutil.rmtree(out, ignore_errors=True)
        return verdict

    def _resume(self, kp: KillPoint, out: Path, first: Outcome, max_reruns: int) -> Verdict:
        if not first.killed:
            return Verdict(kp, False, f"not killed (exit {first.returncode}): {first.tail()}")
        for spec in kp.then:
            again = self.launcher.run(self.argv(out), {**base_env(), "STEPH_FAULT": spec},
                                      self.work)
            if not again.killed:
                return Verdict(kp, False, f"the rerun with {spec} was not killed (exit "
                                          f"{again.returncode}): {again.tail()}")
        for n in range(1, max_reruns + 1):
            again = self.launcher.run(self.argv(out), base_env(), self.work)
            if again.returncode == 0:
                diff = differences(self.reference, results(out)) + [
                    f"left behind {p}" for p in leftovers(out)]
                return Verdict(kp, not diff, "; ".join(diff[:6]) or "equal", n)
            if again.killed:
                return Verdict(kp, False, f"rerun {n} died: {again.tail()}", n)
        return Verdict(kp, False, f"rerun still failing after {max_reruns}: {again.tail()}",
                       max_reruns)

    def run_all(self, kills: Iterable[KillPoint]) -> list[Verdict]:
        return [self.kill(kp) for kp in kills]


def report(name: str, verdicts: Sequence[Verdict]) -> str:
    passed = sum(v.passed for v in verdicts)
    lines = [f"{name}: {len(verdicts)} kill point(s) run, {passed} passed"]
    for v in verdicts:
        mark = "ok  " if v.passed else "FAIL"
        lines.append(f"  {mark} {v.kill.label:<40} ({v.kill.why}; {v.reruns} rerun(s), "
                     f"{v.seconds:.1f} s){'' if v.passed else ': ' + v.detail}")
    return "\n".join(lines)


# kills of a process that is resuming: (point of the reference, which, faults of the reruns)
CHAINS = [
    ("train:bag", "middle", ("write:log.jsonl@1", "train:bag@5", "backup:checkpoint.safetensors@1")),
    ("train:epoch", "first", ("train:epoch@1", "train:epoch@2")),
    ("write:model.safetensors", "middle", ("write:model.safetensors@1",)),
    ("write:metrics.json", "first", ("write:checkpoint.safetensors@1", "write:metrics.json@1")),
]


def sweep(h: Harness, quantiles: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
          every: Sequence[str] = ("train:epoch", "write:checkpoint.safetensors",
                                  "write:log.jsonl")) -> list[KillPoint]:
    """Many distinct moments of ``h``'s reference: every point name at the given quantiles of
    its occurrences (first, quarter, middle, three quarters, last), every occurrence of the
    points in ``every``."""
    kills: dict[tuple[str, int], KillPoint] = {}
    for name, total in h.occurrences().items():
        picks = range(1, total + 1) if name in every else sorted(
            {1 + round(q * (total - 1)) for q in quantiles})
        for nth in picks:
            kills.setdefault((name, nth), KillPoint(name, nth, f"{nth} of {total}"))
    return list(kills.values())


# -- the grids of the tests ---------------------------------------------------------------------

def _config(train: dict[str, Any] | None = None, steph: dict[str, Any] | None = None
            ) -> dict[str, Any]:
    """The tiny settings of tests/conftest.py (tiny_experiment_config) with 2 folds, as a
    config file holds them; one thread (tiny tensors: faster, and the same on any machine)."""
    return {"data": {"n_folds": 2}, "model": {"hidden_dim": 16, "attn_dim": 8},
            "train": {"epochs": 2, "bags_per_step": 4, "eval_every": 1, "threads": 1,
                      **(train or {})},
            "steph": {"embed_dim": 16, **(steph or {})}}


# ABMIL, STEPH and an AdaMerging baseline on the target's 2 folds, with both sources
MAIN = Grid("main", "abmil,steph,adamerging", _config())
# a STEPH that collapses (huge gamma and learning rate): its guard restarts it with gamma 0
GUARD = Grid("guard", "abmil,steph", _config(train={"lr": 0.05, "head_init": "baseline"},
                                              steph={"gamma": 1000.0, "gamma_grid": [0.0, 1000.0],
                                                     "w_init": "complete"}),
             folds="0", sources="RELA")
# STEPH's gamma chosen by an inner 2-fold search over 2 values
SEARCH = Grid("search", "abmil,steph", _config(train={"epochs": 1},
                                                steph={"gamma": "search", "gamma_grid": [0.0, 0.05],
                                                       "search_folds": 2}),
              folds="0", sources="RELA")
