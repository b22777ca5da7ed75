"""The one base class of the errors a user can cause and fix: a wrong path, a bad value, unreadable data.

The ``aimv2`` command prints such an error as one line, ``aimv2 COMMAND: error: MESSAGE``, and exits with status 2
(aimv2.cli.errors); anything else that escapes a command is a bug and keeps its traceback. So a message is written
to be that whole line: what went wrong, where (the file, the key), and what to do, in the form
``<what> (<where>); <what to do>``. The library's own error types (ConfigError, CheckpointError, RunError,
FaultRateError, ...) derive from :class:`UserError` and from the builtin type callers already catch.

This module imports nothing, so every layer of the package can raise these errors.
"""


class UserError(Exception):
    """An anticipated failure caused by the input; its message is the one line the user reads."""


class MissingPackageError(UserError, ImportError):
    """An optional package a feature needs is not installed; the message names the ``pip install``."""


class DataError(UserError, ValueError):
    """Input data that cannot be used at all (no readable image, no class folders, a missing file)."""
