"""The one error path of the ``aimv2`` command: every anticipated failure ends as one line on stderr,

    aimv2 COMMAND: error: <what> (<where>); <what to do>

and exit status 2; the traceback is shown only with ``aimv2 --debug COMMAND ...`` or ``AIMV2_DEBUG=1``.

Anticipated means caused by the input or the machine, not by the code: a :class:`~aimv2.errors.UserError` (the
library's ConfigError, CheckpointError, RunError, FaultRateError, ... derive from it), a ``ValueError`` (a value the
library refused, by Python's convention), an ``OSError`` (a missing file, a permission, a full or read-only disk),
and a training run that stopped itself (``TrainingError``, a UserError too). Everything else (``TypeError``,
``KeyError``, ...) is a bug: it keeps its traceback, so that it is reported rather than read as the user's mistake.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback

from ..errors import UserError

DEBUG_ENV = "AIMV2_DEBUG"

# errno -> (what, what to do) for the OSErrors a command meets on the user's files
_OS_HINTS: dict[int, tuple[str, str]] = {
    errno.ENOENT: ("no such file or directory", "check the path"),
    errno.EACCES: ("permission denied", "check the permissions or choose another path"),
    errno.EPERM: ("operation not permitted", "check the permissions or choose another path"),
    errno.EROFS: ("read-only file system", "choose a writable folder"),
    errno.ENOSPC: ("no space left on device", "free disk space or write to another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free disk space or write to another disk"),
    errno.EISDIR: ("is a directory", "give a file path, not a folder"),
    errno.ENOTDIR: ("not a directory", "a part of the path is a file; check the path"),
    errno.EEXIST: ("already exists", "remove it or choose another path"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter path"),
}


def debug_requested(flag: bool) -> bool:
    """``--debug`` on the command line, or AIMV2_DEBUG set to anything but '', '0' or 'false'."""
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def is_anticipated(e: BaseException) -> bool:
    return isinstance(e, UserError | ValueError | OSError)


def describe(e: BaseException) -> str:
    """The error as one line: an OSError as '<what> (<file>); <what to do>', any other its message."""
    if isinstance(e, OSError) and e.errno in _OS_HINTS and not isinstance(e, UserError):
        what, todo = _OS_HINTS[e.errno]
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        return f"{what} ({where}); {todo}" if where else f"{what}; {todo}"
    text = str(e)
    original = text.find("\nOriginal Traceback")
    if text.startswith("Caught ") and original >= 0:  # a DataLoader worker's error with the worker's traceback
        last = text.rfind(f"{type(e).__name__}: ", original)  # its last line: "module.Name: message"
        text = text[last + len(type(e).__name__) + 2 :] if last >= 0 else text.split("\n", 1)[0]
    if isinstance(e, KeyError) and text.startswith(("'", '"')):
        text = text[1:-1]  # KeyError quotes its message
    text = " ".join(text.split())  # one line, whatever the message held
    return text or type(e).__name__


def report(e: BaseException, command: str, debug: bool) -> int | None:
    """Print ``e`` the way the command ends and return the exit status: one line and 2 when anticipated (the
    traceback first under --debug), 130 for Ctrl-C; None for a bug, which the caller raises again, traceback and
    all."""
    if isinstance(e, KeyboardInterrupt):
        if debug:
            traceback.print_exc()
        print(f"aimv2 {command}: interrupted", file=sys.stderr)
        return 130
    if not is_anticipated(e):
        return None
    if debug:
        traceback.print_exc()
    sys.stdout.flush()
    print(f"aimv2 {command}: error: {describe(e)}", file=sys.stderr, flush=True)
    return 2
