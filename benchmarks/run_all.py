"""The benchmark suite: every speed benchmark in benchmarks/, sized for the device, and one summary of all ratios.

    python benchmarks/run_all.py                         # all four on CPU: about 6-8 minutes on 2 cores
    python benchmarks/run_all.py --only train,data       # some of them
    python benchmarks/run_all.py --device cuda --out-dir benchmarks/results/suite_cuda
    python benchmarks/run_all.py --dry-run               # print the commands only

Each benchmark runs as its own process (``python benchmarks/<script> ... --out <out-dir>/<name>.json``) with its
output streamed as it comes, so one that crashes or runs out of memory is reported and the others still run; the
suite then exits non-zero. The per-benchmark settings below are chosen so that the whole suite stays well under 15
minutes on a 2-core CPU; each script's docstring says what it measures and how to read it, and running a script
alone with more repetitions gives tighter numbers.

At the end the suite prints one table, from each benchmark's JSON:

- ``ratios``: every ratio the benchmark computes, named so that above 1 means ours (or the new way: native
  resolution) is better: faster (``ours/timm fp32 img/s``) or lighter (``baseline/ours fp32 peak memory``);
- ``peak_memory_mib``: per variant, the most one step / forward / pass needed above what was held before it
  (``peak_memory.py``);
- ``headline``: absolute numbers worth seeing next to the ratios (samples/s, MFU), where a benchmark has them;
- the benchmark's own peak resident memory (``ru_maxrss`` of the child from ``os.wait4``, which also covers the
  ``--memory-only`` process the child runs: weights, data and every model built, not one variant's working
  memory), its wall time and exit status.

A benchmark whose JSON has no ``ratios`` prints "(no ratios recorded)". ``<out-dir>/suite.json`` records the same
summary with the machine (CPU, core count, load average at start and end), library versions and the date.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from machine import machine_info

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


@dataclass
class Benchmark:
    name: str
    script: str  # file name in benchmarks/, or a path
    what: str
    cpu_args: list[str] = field(default_factory=list)
    cuda_args: list[str] = field(default_factory=list)
    devices: tuple[str, ...] = ("cpu", "cuda")  # where it takes --device; elsewhere it runs on CPU

    def command(self, device: str, out: Path) -> list[str]:
        """The command line, run from the repository root (paths inside it relative, as the JSONs record them)."""
        args = self.cuda_args if device == "cuda" else self.cpu_args
        dev = ["--device", device] if device in self.devices else []
        out_arg = rel(out) if out.is_absolute() else str(out)
        return [sys.executable, rel(HERE / self.script), *args, *dev, "--out", out_arg]


def rel(path: Path) -> str:
    """``path`` relative to the repository root when inside it, else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


BENCHMARKS = [
    Benchmark(
        "encoder",
        "encoder_speed.py",
        "AIMv2-L inference, ours vs timm vs transformers, fp32 / bf16, batch 4",
        cpu_args=["--reps", "3", "--warmup", "1"],
        cuda_args=["--reps", "20", "--warmup", "3", "--batch-size", "64"],
    ),
    Benchmark(
        "train",
        "train_speed.py",
        "training steps of the demo model, ours vs the plain baseline, fp32 / bf16, samples/s and MFU",
        cpu_args=["--steps", "4", "--warmup", "1"],
        cuda_args=["--steps", "20", "--warmup", "3"],
    ),
    Benchmark(
        "data",
        "data_speed.py",
        "one data worker: our shard reader + transform vs plain torchvision, on the CC12M sample shard",
        cpu_args=["--reps", "5"],
        cuda_args=["--reps", "5"],
        devices=(),
    ),
    Benchmark(
        "native",
        "native_speed.py",
        "training at native resolution vs fixed resolution, same image-token budget",
        cpu_args=["--steps", "8"],
        cuda_args=["--steps", "16"],
    ),
]


# ------------------------------------------------------------------------------------------ running
def run(cmd: list[str]) -> tuple[int, float, float | None]:
    """Run ``cmd`` with inherited output: (exit status, wall seconds, the child's peak RSS in MiB or None)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO)
    if not hasattr(os, "wait4"):  # not POSIX: no per-child rusage
        return proc.wait(), time.perf_counter() - t0, None
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except KeyboardInterrupt:
        proc.wait()  # the child got the interrupt too
        raise
    proc.returncode = rc = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    rss_unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return rc, time.perf_counter() - t0, usage.ru_maxrss * rss_unit / 2**20


def run_one(bench: Benchmark, device: str, out_dir: Path) -> dict:
    out = out_dir / f"{bench.name}.json"
    out.unlink(missing_ok=True)  # a JSON left by an earlier run must not pass for this one's
    cmd = bench.command(device, out)
    print(f"\n{'=' * 100}\n[{bench.name}] {bench.what}\n$ {shown(cmd)}\n{'=' * 100}", flush=True)
    rc, wall, rss = run(cmd)
    entry = {"command": shown(cmd), "exit_status": rc, "wall_s": wall, "process_peak_rss_mib": rss}
    entry["json"] = out.name if out.exists() else None
    if rc == 0 and not out.exists():
        entry["exit_status"], entry["error"] = 1, "exited 0 but wrote no JSON"
    elif rc != 0:
        entry["error"] = f"exit status {rc}" + (" (killed by a signal)" if rc < 0 else "")
    if out.exists():
        try:
            data = json.loads(out.read_text())
        except json.JSONDecodeError as e:
            entry["exit_status"], entry["error"], data = entry["exit_status"] or 1, f"unreadable JSON: {e}", {}
        for key in ("ratios", "peak_memory_mib", "headline"):
            if isinstance(data.get(key), dict):
                entry[key] = data[key]
    return entry


def shown(cmd: list[str]) -> str:
    """The command as one would type it from the repository root."""
    return " ".join(["python" if cmd[0] == sys.executable else cmd[0], *cmd[1:]])


# ------------------------------------------------------------------------------------------ summary
def fmt_value(key: str, value) -> str:
    """Ratios with two decimals and an x, MiB with none (one below 10), other numbers with three digits."""
    if value is None:
        return "n/a"
    if not isinstance(value, (int, float)):
        return str(value)
    if key == "ratios":
        return f"{value:.2f}x"
    if key == "peak_memory_mib":
        return f"{value:.1f} MiB" if value < 10 else f"{value:.0f} MiB"
    return f"{value:.3g}"


def summary_rows(name: str, entry: dict) -> list[tuple[str, str, str]]:
    """(benchmark, metric, value) rows of one benchmark."""
    rows: list[tuple[str, str, str]] = []
    status = "ok" if entry["exit_status"] == 0 else f"FAILED: {entry.get('error', 'failed')}"
    rows.append((name, "status", status))
    ratios = entry.get("ratios")
    if ratios:
        rows += [(name, k, fmt_value("ratios", v)) for k, v in ratios.items()]
    elif entry["exit_status"] == 0:
        rows.append((name, "(no ratios recorded)", ""))
    for k, v in (entry.get("peak_memory_mib") or {}).items():
        rows.append((name, f"peak memory {k}", fmt_value("peak_memory_mib", v)))
    for k, v in (entry.get("headline") or {}).items():
        rows.append((name, k, fmt_value("headline", v)))
    rss = entry.get("process_peak_rss_mib")
    rows.append((name, "process peak RSS", fmt_value("peak_memory_mib", rss)))
    rows.append((name, "wall time", f"{entry['wall_s']:.0f} s"))
    return rows


def print_summary(results: dict[str, dict], total_s: float) -> None:
    rows = [r for name, entry in results.items() for r in summary_rows(name, entry)]
    w0 = max([len("benchmark")] + [len(r[0]) for r in rows])
    w1 = max([len("metric")] + [len(r[1]) for r in rows])
    print(f"\n{'=' * 100}\nSummary (ratios: above 1 means ours / the new way is better; peak memory: above what each")
    print("variant held before its step / forward / pass; process peak RSS: the whole benchmark process)\n")
    print(f"{'benchmark':<{w0}}  {'metric':<{w1}}  value")
    print(f"{'-' * w0}  {'-' * w1}  {'-' * 12}")
    last = None
    for bench, metric, value in rows:
        if last is not None and bench != last:
            print()
        print(f"{bench if bench != last else '':<{w0}}  {metric:<{w1}}  {value}".rstrip())
        last = bench
    failed = [n for n, e in results.items() if e["exit_status"] != 0]
    print(f"\ntotal wall time {total_s / 60:.1f} min ({total_s:.0f} s)", end="")
    print(f"; FAILED: {', '.join(failed)}" if failed else "")


def load(avg) -> str:
    return "n/a" if avg is None else ", ".join(f"{x:.2f}" for x in avg)


# ------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None, benchmarks: list[Benchmark]) -> argparse.Namespace:
    lines = ["benchmarks (in this order) and their CPU commands:"]
    for b in benchmarks:
        lines.append(f"  {b.name:<8} {b.what}")
        lines.append(f"           {shown(b.command('cpu', Path('OUT-DIR') / (b.name + '.json')))}")
    ap = argparse.ArgumentParser(
        description=__doc__, epilog="\n".join(lines), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--out-dir",
        type=Path,
        default=HERE / "results" / "suite_cpu",
        help="where each benchmark's JSON and suite.json go (default: benchmarks/results/suite_cpu)",
    )
    ap.add_argument("--only", help="comma-separated benchmark names to run: " + ", ".join(b.name for b in benchmarks))
    ap.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="cpu (default): the CPU-sized settings; cuda: larger settings on the GPU (data stays on CPU)",
    )
    ap.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None, benchmarks: list[Benchmark] | None = None) -> int:
    benchmarks = BENCHMARKS if benchmarks is None else benchmarks
    args = parse_args(argv, benchmarks)
    chosen = benchmarks
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in {b.name for b in benchmarks}]
        if unknown:
            raise SystemExit(f"--only: unknown {unknown}; choose from {[b.name for b in benchmarks]}")
        chosen = [b for b in benchmarks if b.name in names]
    out_dir = args.out_dir.resolve()
    if args.dry_run:
        for b in chosen:
            print(shown(b.command(args.device, out_dir / f"{b.name}.json")))
        return 0

    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    print(
        f"benchmark suite on {args.device}: {', '.join(b.name for b in chosen)}; {info['cpu_model']}, "
        f"{info['nproc']} cores, load average {load(info['loadavg_at_start'])}; results in {rel(out_dir)}",
        flush=True,
    )
    t0 = time.perf_counter()
    results = {b.name: run_one(b, args.device, out_dir) for b in chosen}
    total = time.perf_counter() - t0
    if hasattr(os, "getloadavg"):
        info["loadavg_at_end"] = os.getloadavg()
    print_summary(results, total)
    start, end = load(info["loadavg_at_start"]), load(info.get("loadavg_at_end"))
    print(f"load average (1, 5, 15 min) at start {start}, at end {end}")
    suite = {"device": args.device, "machine": info, "total_wall_s": total, "benchmarks": results}
    (out_dir / "suite.json").write_text(json.dumps(suite, indent=2) + "\n")
    print(f"wrote {rel(out_dir / 'suite.json')}")
    return 0 if all(e["exit_status"] == 0 for e in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
