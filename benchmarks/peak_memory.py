"""Peak working memory of a block of code: how far above what was held when the block started memory rose.

    with PeakMemory(device) as m:
        step()
    m.mib  # MiB, or None where this platform cannot say

That is the number that decides whether a batch fits: weights, optimizer state or a cached dataset that exist
before the block are not counted, the activations, gradients and temporaries the block creates are, at their
highest point, even when the block frees them again before it ends.

- CUDA: the caching allocator's counters: ``max_memory_allocated()`` after the block minus ``memory_allocated()``
  at its start (tensors only; the allocator's cache and the CUDA context are not counted).
- CPU (Linux): the kernel's peak resident set size of the process. Writing "5" to ``/proc/self/clear_refs`` resets
  the peak (``VmHWM`` in ``/proc/self/status``) to the current RSS; the block's peak is ``VmHWM`` after it minus
  ``VmRSS`` at the reset. This is the whole process, so other threads' allocations during the block count too.
  Where ``clear_refs`` cannot be written (not Linux, a restricted container) the result is None, never a number
  that would include everything the process ever held.

Why a measuring process changes glibc's malloc: RSS only measures working memory if freed memory leaves the
process. By default glibc serves allocations under its mmap threshold from the heap, and raises that threshold to
the size of each mmap-ed block that is freed (up to 32 MiB). After a few steps nearly every tensor therefore lives
in the heap, and freed heap memory mostly stays resident for reuse: a block would then reuse pages it did not pay
for and report a peak near zero, or more depending on what ran before it. ``release_freed_memory()`` sets
``M_MMAP_THRESHOLD`` explicitly (64 KiB), which both lowers it and turns the adjustment off, so every allocation
of 64 KiB or more is its own mapping, returned to the kernel when freed, and RSS follows the live tensors. Called
first thing in a process, it makes the CPU numbers exact: a training step of the demo model measured 706 MiB, the
same as the profiler's count of its tensor allocations (705 MiB). Called late, the heap's free chunks (returned
with ``malloc_trim`` at each block, but still reused) fragment, and the same step read 753-903 MiB.

Why the benchmarks measure memory in a separate process (``measure_in_fresh_process``): returning memory is not
free. Every page of a new tensor then costs a page fault and zeroing, and with the setting the data pipeline ran
25-30% slower on the 2-core benchmark machine, and more for the plain pipeline, which allocates more (its ratio
moved from 1.22x to 1.34x); another fixed setting moved it too (1.12-1.16x with glibc's 32 MiB maximum). So
the timed process keeps glibc's default behaviour untouched, and a fresh interpreter running the same script with
``--memory-only`` applies the setting at its start and measures. On other platforms, or another C library, the
malloc calls are skipped silently.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from aimv2.train.host_memory import M_MMAP_THRESHOLD, glibc  # (M_MMAP_THRESHOLD: mallopt's parameter number)

MMAP_THRESHOLD_BYTES = 64 * 1024
CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


_LIBC: ctypes.CDLL | None = None
MALLOC_TUNED = False  # True once glibc accepted the 64 KiB mmap threshold


def release_freed_memory() -> None:
    """Linux with glibc: on the first call fix the mmap threshold (call it first thing in a measuring process),
    on every call return the free heap pages to the kernel. Every CPU ``PeakMemory`` block calls it too."""
    global _LIBC, MALLOC_TUNED
    if _LIBC is None:
        _LIBC = glibc()
        if _LIBC is None:
            return
        try:
            MALLOC_TUNED = bool(_LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
        except AttributeError:
            return
    try:
        _LIBC.malloc_trim(0)
    except AttributeError:
        pass


def _status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes."""
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_cpu_peak() -> int | None:
    """Reset the process's peak RSS to its current RSS and return that RSS in bytes; None where not possible."""
    try:
        CLEAR_REFS.write_text("5")
        return _status_bytes("VmRSS")
    except (OSError, KeyError, ValueError):
        return None


class PeakMemory:
    """Context manager: ``.bytes`` / ``.mib`` after the block, the peak above the start (None: not measurable)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.bytes: int | None = None
        self._start: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif self.device.type == "cpu":
            release_freed_memory()
            self._start = reset_cpu_peak()
        return self

    def __exit__(self, *exc) -> bool:
        if self._start is None:
            return False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            try:
                peak = _status_bytes("VmHWM")
            except (OSError, KeyError, ValueError):
                return False
        self.bytes = max(0, peak - self._start)
        return False

    @property
    def mib(self) -> float | None:
        return None if self.bytes is None else self.bytes / 2**20


def max_mib(values: list[float | None]) -> float | None:
    """The largest of several measurements of one variant, None when none could be taken."""
    known = [v for v in values if v is not None]
    return max(known) if known else None


def fmt_mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} MiB"


def measure_in_fresh_process(script: str, argv: list[str]) -> dict | None:
    """``peak_memory_mib`` from ``python script *argv --memory-only --out TMP``, run in a new interpreter (its
    output streamed); None, with the reason printed, when that run fails."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "memory.json"
        cmd = [sys.executable, script, *argv, "--memory-only", "--out", str(out)]
        print("peak memory, measured in a fresh process:", flush=True)
        rc = subprocess.run(cmd).returncode
        if rc != 0 or not out.exists():
            print(f"  peak memory not measured: the --memory-only run exited with status {rc}", flush=True)
            return None
        return json.loads(out.read_text()).get("peak_memory_mib")
