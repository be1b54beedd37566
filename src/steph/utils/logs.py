"""steph's log messages: one set-up for the command line and for worker processes (Ray tasks)."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(levelname)s %(name)s: %(message)s"


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (not the one current when it was created)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """steph's own messages at ``level`` on stderr (one handler, however often this is called);
    other libraries stay at their WARNING default."""
    logger = logging.getLogger("steph")
    if not any(isinstance(h, StderrHandler) for h in logger.handlers):
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
