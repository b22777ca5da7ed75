"""One run at a time per run folder: an exclusive lock held for the life of a run.

The lock is ``fcntl.flock`` on ``out_dir/.lock``: the kernel releases it when the holder exits, however it exits
(kill -9 included), so a lock can never go stale; the file only records who holds it (pid, host, start time) for the
error a second run gets. A second ``aimv2 pretrain`` on the same folder, even with another seed, is refused instead
of interleaving two runs in one metrics.jsonl. Under torchrun only rank 0 takes it (the ranks of one run share the
folder by design). On file systems without flock (some network mounts) the lock is skipped with a warning.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from .guard import TrainingError

log = logging.getLogger("aimv2.train")
LOCK_FILE = ".lock"


class RunLock:
    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise TrainingError(
                f"{self.path.parent} is in use by another run ({holder}); two runs in one folder would mix their "
                "checkpoints and metrics: wait for it to finish, stop it, or use another out_dir"
            ) from None
        except OSError as e:  # no flock on this file system
            log.warning("cannot lock %s (%s); make sure no other run uses this folder", self.path, e)
            os.close(fd)
            return self
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            rec = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return f"pid {rec['pid']} on host {rec['host']}, started {rec['started']}"
        except (ValueError, KeyError, OSError):
            return "a process that has not written its pid yet"
