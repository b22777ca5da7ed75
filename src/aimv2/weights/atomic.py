"""Atomic file replacement: a reader never sees half a file, and a failed write leaves no partial file.

Run folders are read while they are written (a probe on a run that is still training, a resume after a kill), so
everything in them is written to a temporary name in the same folder (``.tmp-PID-NAME``), fsynced and renamed over
the old file. A write that fails (a full disk, a permission error) removes its temporary file before the error goes
on; one killed outright leaves it behind, and the next run on the folder removes it (``remove_temp_files``: the run
lock guarantees that no live writer owns it).

``crash_point(name)`` lets the fault-injection tests kill a writer at a chosen moment, as ``kill -9`` would: with
``AIMV2_CRASH_AT=name`` in the environment the process exits at once at that point. It costs one dictionary look-up.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

TEMP_PREFIX = ".tmp-"
CRASH_ENV = "AIMV2_CRASH_AT"


def crash_point(name: str) -> None:
    """Exit immediately (no cleanup, no flush: like a kill) when ``AIMV2_CRASH_AT`` names this point."""
    if os.environ.get(CRASH_ENV) == name:
        os._exit(137)


def check_writable(path: str | os.PathLike, what: str = "OUT") -> Path:
    """Refuse, before any work, a file path that cannot be written: a part of it that is a file, a folder that
    cannot be created or written (permission, read-only file system). Creates the folder."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, f"{what} is a folder; give a file path", str(path))
    blocking = next((p for p in path.parents if p.is_file()), None)
    if blocking is not None:
        raise NotADirectoryError(20, f"{what}'s folder is a file; choose another path", str(blocking))
    path.parent.mkdir(parents=True, exist_ok=True)
    import tempfile

    with tempfile.TemporaryFile(dir=path.parent):
        pass
    return path


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], object]) -> None:
    """``write_fn(tmp_path)``, then fsync and rename onto ``path`` (and fsync the folder, so the rename lasts)."""
    path = Path(path)
    tmp = path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{path.name}")  # same suffix: writers may check it
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        crash_point(f"written:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk stays full with a partial file on it; the retry would fail too
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def remove_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed writers left in ``folder`` and its sub-folders; returns them.
    Call it only while holding the folder's run lock (train/run_lock.py), so that no live writer owns one."""
    found = [p for p in Path(folder).rglob(f"{TEMP_PREFIX}*") if p.is_file()]
    for p in found:
        p.unlink(missing_ok=True)
    return found
