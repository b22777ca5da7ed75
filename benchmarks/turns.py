"""Contestants in their own processes, taking turns: the paired timing of benchmarks whose contestants must not
share a process (each keeps its own process set-up, such as the malloc thresholds of ``aimv2.train.host_memory``).

Each contestant is a function ``target(*args, conn)`` run in a spawned process: it builds what it times, sends one
dict describing itself, then for every precision it receives ("fp32" / "bf16") runs one step and sends back
``(seconds, minor page faults)``, until it receives None. Only one contestant steps at a time (the others wait in
``recv``), and the order swaps every round, so the machine's drift and other jobs' load hit all alike.
"""

from __future__ import annotations

import multiprocessing
import statistics


class Turns:
    """The contestants' processes, started one at a time (each builds alone), closed on exit."""

    def __init__(self, contestants: dict[str, tuple]):
        ctx = multiprocessing.get_context("spawn")
        self.conns, self.procs, self.setup = {}, {}, {}
        try:
            for name, (target, args) in contestants.items():
                here, there = ctx.Pipe()
                proc = ctx.Process(target=target, args=(*args, there))
                proc.start()
                there.close()  # the child's end lives in the child only: its exit ends our recv with EOFError
                self.procs[name] = proc
                self.conns[name] = here
                self.setup[name] = self.answer(name)
        except BaseException:
            self.close()
            raise

    def answer(self, name: str):
        """The next message of contestant ``name``; a contestant that died ends the run, naming it."""
        try:
            return self.conns[name].recv()
        except EOFError:
            proc = self.procs[name]
            proc.join(timeout=10)
            raise SystemExit(
                f"contestant {name!r} exited (code {proc.exitcode}) before answering; its error is printed above"
            ) from None

    def step(self, name: str, precision: str) -> tuple[float, int]:
        self.conns[name].send(precision)
        return self.answer(name)

    def rounds(self, precision: str, steps: int, warmup: int, show=print) -> tuple[dict, dict]:
        """``warmup`` untimed steps of each, then ``steps`` rounds of one step each in a swapping order:
        ({name: [seconds]}, {name: [minor page faults]})."""
        names = list(self.conns)
        for _ in range(warmup):
            for name in names:
                self.step(name, precision)
        times: dict[str, list[float]] = {n: [] for n in names}
        faults: dict[str, list[int]] = {n: [] for n in names}
        for r in range(steps):
            for name in names if r % 2 == 0 else names[::-1]:
                seconds, minflt = self.step(name, precision)
                times[name].append(seconds)
                faults[name].append(minflt)
            show(f"  {precision} round {r + 1}/{steps}: " + "  ".join(f"{n} {times[n][-1]:.2f}s" for n in names))
        return times, faults

    def close(self) -> None:
        for name, proc in self.procs.items():
            if proc.is_alive():
                self.conns[name].send(None)
        for proc in self.procs.values():
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()

    def __enter__(self) -> Turns:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def paired_speedup(slow: list[float], fast: list[float]) -> float:
    """The median over rounds of one step time over the other's in the same round."""
    return statistics.median(s / f for s, f in zip(slow, fast, strict=True))
