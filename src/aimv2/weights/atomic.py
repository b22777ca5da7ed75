"""Atomic file replacement: a reader never sees half a file.

Run folders are read while they are written (a probe on a run that is still training, a resume after a kill), so
everything in them is written to a temporary name in the same folder, fsynced and renamed over the old file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], object]) -> None:
    """``write_fn(tmp_path)``, then fsync and rename onto ``path`` (and fsync the folder, so the rename lasts)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # same suffix: writers may check it
    write_fn(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
