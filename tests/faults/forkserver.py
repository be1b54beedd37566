"""A fork server for the kill harness: a process that imports steph, torch and everything a
grid run needs once, then forks a fresh child for each command it is sent. A child is a new
process that runs ``steph.cli.main(argv)`` (what ``steph <argv>`` runs) with its own
environment, working folder, stdout and stderr, and dies as such a process does (a fault's
SIGKILL kills the child only). The server has computed nothing with torch (no thread pool,
MKL not initialised), so each child starts as a fresh ``steph`` process would, without paying
the imports again (about 4 s each on 2 cores).

Protocol (JSON lines): the server writes ``{"ready": pid}``; then, for each request
``{"argv", "env", "cwd", "stdout", "stderr"}`` on stdin, it writes ``{"pid": child}`` when
the child started and ``{"status": <waitpid status>}`` when it ended.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

# what a grid run imports, steph first (it asks for MKL's reproducible mode before torch loads);
# torch.use_deterministic_algorithms imports torch._inductor.config (1.5 s)
PRELOAD = ("steph", "steph.cli", "steph.experiments.cv", "steph.experiments.summary",
           "steph.experiments.compare", "torch._inductor.config", "scipy.stats", "matplotlib",
           "matplotlib.pyplot")


def _preload() -> None:
    for name in PRELOAD:
        module = importlib.import_module(name)
        if name == "matplotlib":
            module.use("Agg")


def _child(req: dict) -> int:
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # the server's requests are not the child's input
    os.close(null)
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    sys.argv = ["steph", *req["argv"]]
    from steph.cli import main

    try:
        main(req["argv"])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported like an uncaught exception
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def serve() -> None:
    _preload()
    reply = sys.stdout
    print(json.dumps({"ready": os.getpid()}), file=reply, flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(req)
            finally:
                os._exit(code)
        print(json.dumps({"pid": pid}), file=reply, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": status}), file=reply, flush=True)


if __name__ == "__main__":
    serve()
