"""How many image-decoding processes a DataLoader gets.

A fixed default of 4 workers asks a 2-core laptop for twice the processes it can run (and torch warns about it on
every call), and one worker per batch beyond the number of batches is a process started for nothing: a folder of 3
images in batches of 64 is one batch. The commands' ``--workers`` default to :func:`default_workers`, and the
loaders start :func:`loader_workers` of what they are given.
"""

from __future__ import annotations

import math
import os


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one: a container's share, not the host's)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_workers(cap: int = 4) -> int:
    """``cap`` decoding processes, or fewer where fewer CPUs are usable."""
    return min(cap, usable_cpus())


def loader_workers(requested: int, samples: int, batch_size: int) -> int:
    """``requested`` workers, but no more than there are batches of ``samples`` (0 stays 0: decode inline)."""
    if requested < 0:
        raise ValueError(f"workers must be >= 0 (0 decodes in the main process), got {requested}")
    return min(requested, math.ceil(samples / max(1, batch_size)))
