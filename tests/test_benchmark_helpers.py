"""The benchmark suite's helpers: peak-memory measurement (benchmarks/peak_memory.py), paired turns of
contestants in their own processes (benchmarks/turns.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

# Run in a fresh interpreter: measuring on CPU changes glibc's malloc for the whole process, which the rest of the
# test session should not inherit, and the heap left by earlier tests must not decide the result.
PROBE = """
import json, platform, sys
sys.path.insert(0, sys.argv[1])
import torch
import peak_memory as pm

out = {}
with pm.PeakMemory("cpu") as m:
    pass
out["empty"] = m.mib
with pm.PeakMemory("cpu") as m:
    x = torch.ones(200 * 2**18)  # 200 MiB of float32, freed before the block ends
    del x
out["alloc_200"] = m.mib
held = torch.ones(200 * 2**18)  # held before the block: not the block's working memory
with pm.PeakMemory("cpu") as m:
    pass
out["held_200_empty"] = m.mib
del held
# churn: 1 MiB tensors freed again below one that stays, the case where glibc keeps the freed pages for reuse
for _ in range(3):
    xs = [torch.ones(2**18) for _ in range(100)]
    top = xs[-1]
    del xs
with pm.PeakMemory("cpu") as m:
    xs = [torch.ones(2**18) for _ in range(50)]  # 50 MiB in 1 MiB tensors
    del xs
out["alloc_50_after_churn"] = m.mib
out["glibc"] = platform.libc_ver()[0] == "glibc"
pm.CLEAR_REFS = pm.Path("/nonexistent/clear_refs")
with pm.PeakMemory("cpu") as m:
    x = torch.ones(2**18)
out["no_clear_refs"] = m.mib
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe() -> dict:
    if not sys.platform.startswith("linux"):
        pytest.skip("CPU peak memory is measured through /proc (Linux)")
    res = subprocess.run([sys.executable, "-c", PROBE, str(BENCH)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if out["empty"] is None:
        pytest.skip("/proc/self/clear_refs is not writable here")
    return out


def test_peak_counts_memory_allocated_and_freed_inside_the_block(probe):
    assert 190 <= probe["alloc_200"] <= 260


def test_empty_block_and_memory_held_before_it_count_as_nothing(probe):
    assert probe["empty"] < 8
    assert probe["held_200_empty"] < 8


def test_freed_heap_memory_is_not_reused_silently(probe):
    """Unless the free heap pages are returned first, the block reuses the churned pages and reports ~0, not ~50 MiB."""
    if not probe["glibc"]:
        pytest.skip("not glibc: freed memory is not returned")
    assert 45 <= probe["alloc_50_after_churn"] <= 80


def test_unmeasurable_is_none_not_a_wrong_number(probe):
    assert probe["no_clear_refs"] is None


# ------------------------------------------------------------------------------------------ run_all.py
GOOD = """
import argparse, json
ap = argparse.ArgumentParser()
ap.add_argument("--out")
a = ap.parse_args()
data = {"ratios": {"ours/plain img/s (median)": 1.25}, "peak_memory_mib": {"ours": 12.0, "plain": None}}
open(a.out, "w").write(json.dumps(data))
"""
NO_RATIOS = GOOD.replace('data = {"ratios"', 'data = {"other"')
FAILING = "import sys; print('boom'); sys.exit(3)"


@pytest.fixture()
def run_all(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import run_all

    return run_all


def test_suite_reports_ratios_memory_and_failures_and_exits_nonzero(run_all, tmp_path, capsys):
    scripts = {}
    for name, code in (("good", GOOD), ("failing", FAILING), ("noratios", NO_RATIOS)):
        scripts[name] = tmp_path / f"{name}.py"
        scripts[name].write_text(code)
    benches = [run_all.Benchmark(n, str(p), n, devices=()) for n, p in scripts.items()]
    rc = run_all.main(["--out-dir", str(tmp_path / "out")], benchmarks=benches)
    out = capsys.readouterr().out
    assert rc == 1  # one failed, and the ones after it still ran
    assert re.search(r"ours/plain img/s \(median\) +1\.25x", out)
    assert "peak memory ours" in out and "12 MiB" in out and "peak memory plain" in out
    assert "FAILED: exit status 3" in out
    assert "(no ratios recorded)" in out
    assert "total wall time" in out
    suite = json.loads((tmp_path / "out" / "suite.json").read_text())
    assert suite["benchmarks"]["good"]["ratios"] == {"ours/plain img/s (median)": 1.25}
    assert suite["benchmarks"]["failing"]["exit_status"] == 3
    if hasattr(__import__("os"), "wait4"):
        assert suite["benchmarks"]["good"]["process_peak_rss_mib"] > 1


def test_suite_only_selects_and_rejects_unknown_names(run_all, tmp_path, capsys):
    (tmp_path / "good.py").write_text(GOOD)
    benches = [run_all.Benchmark("good", str(tmp_path / "good.py"), "g", devices=()), run_all.Benchmark("x", "x", "x")]
    assert run_all.main(["--out-dir", str(tmp_path), "--only", "good"], benchmarks=benches) == 0
    assert "good" in json.loads((tmp_path / "suite.json").read_text())["benchmarks"]
    with pytest.raises(SystemExit, match="unknown"):
        run_all.main(["--only", "nope"], benchmarks=benches)


MEMORY_ONLY = """
import argparse, json
ap = argparse.ArgumentParser()
ap.add_argument("--memory-only", action="store_true")
ap.add_argument("--out")
a = ap.parse_args()
assert a.memory_only
open(a.out, "w").write(json.dumps({"peak_memory_mib": {"x": 1.5}}))
"""


def test_measure_in_fresh_process_reads_the_memory_only_run(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    import peak_memory

    script = tmp_path / "s.py"
    script.write_text(MEMORY_ONLY)
    assert peak_memory.measure_in_fresh_process(str(script), []) == {"x": 1.5}
    script.write_text("import sys; sys.exit(2)")
    assert peak_memory.measure_in_fresh_process(str(script), []) is None


def _sleeper(delay: float, conn) -> None:
    """A contestant for Turns: steps by sleeping ``delay`` s; in the page-fault slot it sends the step's start (us)."""
    import time

    conn.send({"delay": delay})
    while conn.recv() is not None:
        start = time.time()
        time.sleep(delay)
        conn.send((time.time() - start, round(start * 1e6)))


def test_turns_run_one_contestant_at_a_time_in_a_swapping_order(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from turns import Turns, paired_speedup

    with Turns({"a": (_sleeper, (0.05,)), "b": (_sleeper, (0.1,))}) as turns:
        assert turns.setup == {"a": {"delay": 0.05}, "b": {"delay": 0.1}}
        times, starts = turns.rounds("fp32", steps=4, warmup=1, show=lambda line: None)
    steps = sorted(
        (start / 1e6, seconds, name) for name in times for start, seconds in zip(starts[name], times[name], strict=True)
    )
    assert [name for *_, name in steps] == ["a", "b", "b", "a", "a", "b", "b", "a"]  # the order swaps every round
    assert all(s0 + d0 <= s1 for (s0, d0, _), (s1, _, _) in zip(steps, steps[1:], strict=False))  # one at a time
    assert paired_speedup(times["b"], times["a"]) == pytest.approx(2.0, rel=0.3)


def _dies(when: str, conn) -> None:
    """A contestant for Turns that exits with code 3 before its set-up message or at its first step."""
    import os

    if when == "step":
        conn.send({})
        conn.recv()
    os._exit(3)


@pytest.mark.parametrize("when", ["setup", "step"])
def test_a_contestant_that_dies_ends_the_run_naming_it_instead_of_hanging(monkeypatch, when):
    monkeypatch.syspath_prepend(str(BENCH))
    from turns import Turns

    with pytest.raises(SystemExit, match=r"contestant 'b' exited \(code 3\) before answering"):
        with Turns({"a": (_sleeper, (0.01,)), "b": (_dies, (when,))}) as turns:
            turns.rounds("fp32", steps=1, warmup=1, show=lambda line: None)
