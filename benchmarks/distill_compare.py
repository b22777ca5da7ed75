"""Is a small encoder better distilled from a trained one than pretrained with AIMv2 from scratch, at equal steps?

Given a trained tiny pretraining run (the teacher, e.g. ``make demo``'s configs/tiny-synthetic.yaml run), this trains
per seed

    distilled   configs/tiny-synthetic.yaml with model.objective=distill, model.distill.teacher=RUN (the teacher's
                final patch features, cosine + smooth-L1; no decoder)
    scratch     configs/tiny-synthetic.yaml as it is: the AIMv2 objective from a random init

with the same student, data, batch, steps, schedule and seed, then probes both frozen encoders and the teacher with
the demo's attentive probe on the built-in labelled scenes (``aimv2.data.synthetic.probes``: count, colour, shape),
and records top-1 per task (mean over seeds, and each seed's) with the wall time of every run. The distillation recipe
is ours: Apple released encoders distilled from AIMv2-3B without publishing how they did it.

    OMP_NUM_THREADS=2 python benchmarks/distill_compare.py --teacher runs/tiny-synthetic --steps 200 --seeds 0 1 \\
        --out benchmarks/results/distill_tiny_cpu.json

Running again with the same ``--work`` reuses finished runs (a finished run folder trains no further). A student
trained for fewer steps than its teacher is the usual setting of distillation; read the numbers against the
teacher's own row, and the probe's spread across seeds (the per-seed rows) before a difference of a point or two.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from machine import machine_info, write_record

from aimv2.config import load_config
from aimv2.data.synthetic.probes import write_probe_splits
from aimv2.eval.frozen_encoder import FeatureSettings, load_frozen_encoder
from aimv2.eval.probe_protocol import ProbeSettings, run_probe
from aimv2.models.registry import model_config
from aimv2.train import train

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-synthetic.yaml"
ARMS = {"distilled": ["model.objective=distill"], "scratch": []}


def top1(encoder, split: Path) -> float:
    """The demo's probe (attentive, features not cached) of ``encoder`` on ``split``: val top-1 in percent."""
    settings = ProbeSettings(features=FeatureSettings(num_workers=1), use_cache=False)
    result = run_probe(encoder, str(split / "train"), str(split / "val"), settings=settings, progress=False)
    return result.metrics["top1"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=Path, required=True, help="a trained pretraining run folder (the teacher)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--batch-size", type=int, help="train.batch_size of both runs (default: the config's)")
    p.add_argument("--tasks", default="count,colour,shape")
    p.add_argument("--probe-train", type=int, default=600, help="probe training images per task")
    p.add_argument("--probe-val", type=int, default=300, help="probe validation images per task")
    p.add_argument("--work", type=Path, help="folder for the runs and probe data (default: a temporary one)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "distill_tiny_cpu.json")
    args = p.parse_args()
    if not (args.teacher / "config.yaml").is_file():
        raise SystemExit(f"--teacher {args.teacher} is not a pretraining run folder (no config.yaml)")
    work = args.work or Path(tempfile.mkdtemp(prefix="distill-compare-"))
    common = [
        f"train.steps={args.steps}",
        f"train.checkpoint_every={args.steps}",
        f"optim.warmup_steps={max(1, min(50, args.steps // 8))}",
        "train.progress=false",
        "log.tensorboard=false",
        f"model.distill.teacher={args.teacher.resolve()}",  # read by the distilled arm only
        *([f"train.batch_size={args.batch_size}"] if args.batch_size else []),
    ]
    runs: dict[str, dict[int, dict]] = {arm: {} for arm in ARMS}
    for seed in args.seeds:
        for arm, extra in ARMS.items():
            out = work / f"{arm}-seed{seed}"
            t0 = time.perf_counter()
            cfg = load_config(CONFIG, [*common, *extra, f"seed={seed}", f"out_dir={out}"])
            train(cfg)
            last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
            runs[arm][seed] = {"out": out, "seconds": time.perf_counter() - t0, "last": last}
            print(f"{arm} seed {seed}: {time.perf_counter() - t0:.0f} s, last {last}", flush=True)

    cfg = load_config(CONFIG, [])
    size = max(model_config(cfg.model.encoder, **cfg.model.encoder_overrides).image_hw)
    table: dict[str, dict] = {}
    for task in args.tasks.split(","):
        split = work / f"probe-{task}"
        write_probe_splits(split, task=task, n_train=args.probe_train, n_val=args.probe_val, size=size,
                           seed=1000, overwrite=True)  # fmt: skip
        row = {"teacher": top1(load_frozen_encoder(args.teacher), split)}
        for arm in ARMS:
            per_seed = {s: top1(load_frozen_encoder(r["out"]), split) for s, r in runs[arm].items()}
            row[arm] = sum(per_seed.values()) / len(per_seed)
            row[f"{arm}_per_seed"] = per_seed
        table[task] = row
        print(task, {k: v for k, v in row.items() if not k.endswith("per_seed")}, flush=True)

    print(f"\n{'task':8} {'teacher':>8} {'distilled':>10} {'scratch':>8}   (probe top-1 %, mean over seeds)")
    for task, row in table.items():
        print(f"{task:8} {row['teacher']:8.1f} {row['distilled']:10.1f} {row['scratch']:8.1f}")
    record = {
        "what": "tiny student distilled from a trained tiny run vs the same student pretrained with AIMv2 from "
        "scratch, equal steps; frozen encoders probed (attentive) on the built-in labelled scenes",
        "config": "configs/tiny-synthetic.yaml",
        "overrides": [o for o in common if not o.startswith("model.distill.teacher")],
        "arms": {arm: extra for arm, extra in ARMS.items()},
        "teacher_steps": json.loads((args.teacher / "metrics.jsonl").read_text().splitlines()[-1])["step"],
        "seeds": args.seeds,
        "probe": {"method": "attentive", "n_train": args.probe_train, "n_val": args.probe_val, "seed": 1000},
        "top1": table,
        "train": {arm: {s: {"seconds": r["seconds"], **r["last"]} for s, r in rr.items()} for arm, rr in runs.items()},
        "machine": machine_info(),
    }
    write_record(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
