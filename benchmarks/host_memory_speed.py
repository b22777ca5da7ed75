"""What keeping freed host memory buys our CPU training step: the same step with and without
``aimv2.train.host_memory.keep_freed_host_memory``, paired.

Two processes build the same model (ours at the sizes of ``l3m_compare.py``: 224 px, patch 14, encoder 384 x 12,
decoder 384 x 4, vocabulary 32000, 77 tokens, batch 8, AdamW, clipping at 1.0), one with glibc's malloc thresholds
raised as our trainer does on the CPU (``kept``), one with glibc's defaults (``default``), and take turns step by
step (benchmarks/turns.py); the thresholds are process-wide and cannot be undone, hence two processes. Printed per
precision: the median step of each, the paired speed-up of ``kept`` over ``default`` and the minor page faults per
step of each (the cost the setting removes: a page handed back to the kernel and faulted in again, zeroed).

    python benchmarks/host_memory_speed.py --compile --out benchmarks/results/host_memory_speed_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from l3m_compare import SIZES, contestant
from machine import PRECISIONS_HELP, machine_info, resolve_precisions, write_record
from turns import Turns, paired_speedup


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="timed rounds per precision (one step of each)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each (compilation, the heap's growth)")
    p.add_argument("--precisions", help=PRECISIONS_HELP)
    p.add_argument("--compile", action="store_true", help="compile as the trainer does on one process")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    contestants = {
        name: (contestant, ("ours", None, None, args.compile, keep, args.batch_size))
        for name, keep in (("kept", True), ("default", False))
    }
    results: dict = {}
    with Turns(contestants) as turns:
        print("host memory: " + ", ".join(f"{k} {v['host memory']}" for k, v in turns.setup.items()))
        for prec in resolve_precisions(args.precisions, "cpu"):
            times, faults = turns.rounds(prec, args.steps, args.warmup)
            res = {"times": times}
            for name in contestants:
                res[f"{name} step_s"] = statistics.median(times[name])
                res[f"{name} minor page faults per step"] = statistics.median(faults[name])
            res["kept/default speed, paired"] = paired_speedup(times["default"], times["kept"])
            results[prec] = res
            print(
                f"{prec}: kept {res['kept step_s']:.3f}s, default {res['default step_s']:.3f}s per step; "
                f"kept/default {res['kept/default speed, paired']:.2f}x paired; page faults per step: kept "
                f"{res['kept minor page faults per step']:.0f}, default {res['default minor page faults per step']:.0f}"
            )
    if args.out:
        info = dict(
            machine_info(("torch",)),
            threads=torch.get_num_threads(),
            command="python benchmarks/host_memory_speed.py " + " ".join(sys.argv[1:]),
            sizes=dict(SIZES, batch=args.batch_size),
            compiled=args.compile,
            host_memory={k: v["host memory"] for k, v in turns.setup.items()},
            results=results,
            ratios={f"kept/default {k} step, paired": v["kept/default speed, paired"] for k, v in results.items()},
        )
        write_record(args.out, info)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
