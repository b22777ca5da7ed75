"""What machine a benchmark ran on, and the writing of its recorded result (shared by the scripts; no torch import)."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
from pathlib import Path


def cpuinfo_line(key: str) -> str | None:
    """The value of the first ``key`` line of /proc/cpuinfo (Linux), None where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    return cpuinfo_line("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU's vector-ISA flags that decide int8 and fp32 GEMM speed (from /proc/cpuinfo; empty elsewhere)."""
    flags = (cpuinfo_line("flags") or "").split()
    return sorted(f for f in flags if f.startswith(("avx", "fma", "amx")) or "vnni" in f)


def machine_info(packages: tuple[str, ...] = ("torch", "torchvision", "timm", "transformers", "pillow")) -> dict:
    """Date, platform, CPU, cores, load average and the installed versions of ``packages`` (None if absent)."""
    info = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    for pkg in packages:
        try:
            info[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            info[pkg] = None
    return info


PRECISIONS_HELP = "fp32,bf16 (autocast); default both, or fp32 on a CPU without fast bf16"  # --precisions


def resolve_precisions(asked: str | None, device_type: str) -> list[str]:
    """The benchmarks' ``--precisions`` as a list: what was asked, else ``fp32`` and ``bf16``, or ``fp32`` alone on
    a CPU without fast bf16 matmuls, where bf16 would time PyTorch's slow generic fallback
    (``aimv2.train.precision``); a line says so."""
    if asked is None:
        asked = "fp32,bf16"
        if device_type == "cpu":
            from aimv2.train.precision import cpu_bf16_is_fast  # imports torch: only when asked

            if not cpu_bf16_is_fast():
                print(
                    "bf16 left out: this CPU has no fast bf16 matmuls (no AVX-512), so bf16 would time PyTorch's "
                    "generic fallback, many times slower than fp32; pass --precisions fp32,bf16 to time it anyway"
                )
                asked = "fp32"
    return [p.strip() for p in asked.split(",") if p.strip()]


def write_record(path: Path, record: dict) -> None:
    """``record`` as indented JSON at ``path`` (its folder made if missing), as most benchmarks record theirs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
