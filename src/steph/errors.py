"""Exceptions that carry a message meant for the user (the CLI prints them without a traceback)."""


class StephError(Exception):
    """Base class: anything the user can fix from the message alone."""


class DataError(StephError):
    """Bad input data: a label table, a feature file, a split file. The message names the file,
    the patient or the field."""


class ConfigError(StephError):
    """An invalid configuration file or option."""


class RunError(StephError):
    """A run directory is missing a prerequisite or is inconsistent."""


class CorruptFileError(RunError):
    """A file steph wrote is truncated or damaged (unreadable header, checksum mismatch)."""


def one_line(err: BaseException, limit: int = 400) -> str:
    """An error as one line (its lines joined, at most ``limit`` characters): the message of
    a steph error, else ``Type: message``."""
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    if not isinstance(err, StephError):
        text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
