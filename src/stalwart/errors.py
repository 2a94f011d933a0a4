"""User-facing errors.

Anything the user can fix (a bad flag, an inconsistent config, a missing or corrupt file)
raises `UserError`; the CLI prints its message as one line and exits with code 2. Every
other exception is a bug in stalwart and keeps its traceback.
"""

EXIT_USAGE = 2
EXIT_STOPPED = 1


class UserError(Exception):
    """A problem with the user's input, reported as one line with exit code 2."""


class ConfigError(UserError):
    """A configuration value is unknown, of the wrong type, or inconsistent."""


class ModelFileError(UserError):
    """A model folder or checkpoint is missing, incomplete or corrupt."""


class TrainingStopped(Exception):
    """The run stopped itself for a reason it names (no commit for too long): one line,
    exit code 1."""


def first_line(error: BaseException | None, limit: int = 300) -> str | None:
    """What an event says of an error: its first line (its type's name if it has none)."""
    if error is None:
        return None
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]
