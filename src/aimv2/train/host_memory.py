"""Keep freed host memory in the process, so a CPU training step does not fault in its memory afresh every step.

A training step allocates and frees the same large tensors every step: the [B, T, 32000] text logits and their
gradient (79 MB each at batch 8), the gradients of the embedding and the text head, the activations saved for
backward. glibc's ``malloc`` serves blocks over its mmap threshold (which grows to at most 32 MB) with a fresh
``mmap`` and unmaps them on ``free``, and it hands the free top of the heap back to the kernel once it exceeds
the trim threshold (twice the mmap threshold). Every page of memory returned that way is a page fault, and a
page zeroed by the kernel, when the next step touches it again: 110,000-190,000 minor page faults per step at
the sizes of the l3m comparison (benchmarks/host_memory_speed.py, compiled fp32), 0.3-0.4 s of system CPU time.

:func:`keep_freed_host_memory` raises both thresholds (``mallopt``), so freed blocks stay in the heap and are
reused by the next step: no page faults after the first steps. On the 2-core machine the recorded paired run gained
1.03x in fp32 and 1.06x in bf16 (benchmarks/results/host_memory_speed_cpu.json; machines with many threads
faulting at once may gain more, which is not measured here). The price is that the process keeps the memory of its
peak step until it exits, which is what a training process does anyway (the CUDA caching allocator does the same).

It changes nothing where it cannot apply: a C library other than glibc (macOS, musl), another allocator preloaded
(jemalloc, tcmalloc), or thresholds the user set (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
``glibc.malloc.*`` in ``GLIBC_TUNABLES``). Setting ``MALLOC_TRIM_THRESHOLD_=131072`` (glibc's default) keeps
glibc's own behaviour.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt's parameter numbers (glibc's malloc.h) and the values set: blocks up to 1 GiB come from the heap, and the
# heap is trimmed only when more than 2 GiB at its top are free (mallopt takes a C int: 2**31 - 1 at most).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def glibc() -> ctypes.CDLL | None:
    """This process's C library where it is glibc on Linux (the one whose ``mallopt`` these thresholds are), else
    None. Also used by the benchmarks' memory measurement (benchmarks/peak_memory.py)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_host_memory() -> str | None:
    """Raise glibc's mmap and trim thresholds for the rest of this process (and the workers it forks).

    Returns None when they were set, else why nothing was changed (one short phrase, for the log)."""
    libc = glibc()
    if libc is None:
        return "not glibc"
    if "malloc" in os.environ.get("LD_PRELOAD", ""):  # jemalloc / tcmalloc replace malloc: mallopt is not theirs
        return "another malloc is preloaded"
    user = [name for name in USER_SETTINGS if name in os.environ]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        user.append("GLIBC_TUNABLES")
    if user:
        return f"{user[0]} is set"
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "mallopt refused the thresholds"
    return None
