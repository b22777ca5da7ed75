"""The two errors of reading weights. Each message says what was found and what was expected, so a command
can print it as its one line on stderr."""

from ..errors import UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read or does not fit the model asked for. The message says why."""


class RunError(UserError, ValueError):
    """A folder that is not the training run a caller needs (no config, tokenizer, checkpoint or decoder)."""
