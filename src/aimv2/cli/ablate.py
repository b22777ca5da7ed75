"""`aimv2 ablate`: a grid of pretraining runs x seeds, each probed, summarized as mean +- std over seeds."""

from __future__ import annotations

import itertools
import json
import logging
import re
from pathlib import Path

DESCRIPTION = """Ablations in one command, in the same harness (encoder, data, optimizer) for every point:

  1. every grid point x seed is `aimv2 pretrain CONFIG OVERRIDES seed=K out_dir=OUT/POINT/seedK`
     (an interrupted run resumes; a finished point x seed with a result is skipped)
  2. `aimv2 probe --method attentive` of each run's encoder on built-in probe splits (synthetic scenes:
     count, colour, shape), the same splits for every run
  3. OUT/ablation.md and OUT/ablation.json (top-1 mean +- std over seeds, final losses), OUT/ablation.png

--grid KEY=V1,V2 adds an axis (the points are the product of the axes; a KEY without a dot is under model.,
values are YAML). --preset table9 is the paper's Table 9 shape: aimv1, cap (bidirectional), cap (prefix),
aimv2 with alpha 0.2/0.4/0.6, clip; --grid axes multiply it.

examples:
  aimv2 ablate configs/tiny-synthetic.yaml --preset table9 --seeds 0,1 --steps 300
  aimv2 ablate configs/tiny-synthetic.yaml --grid alpha=0.2,0.4,0.6 --grid decoder.depth=1,2 --seeds 0,1,2
  aimv2 ablate configs/tiny-synthetic.yaml --grid objective=aimv2,cap train.batch_size=32
"""

PRESETS: dict[str, list[tuple[str, list[str]]]] = {
    # the paper's Table 9 (objectives) plus its alpha sweep, all on the config's encoder
    "table9": [
        ("aimv1", ["model.objective=aimv1"]),
        ("cap-bidirectional", ["model.objective=cap", "model.encoder_attention=bidirectional"]),
        ("cap-prefix", ["model.objective=cap", "model.encoder_attention=prefix"]),
        ("aimv2-alpha0.2", ["model.alpha=0.2"]),
        ("aimv2-alpha0.4", ["model.alpha=0.4"]),
        ("aimv2-alpha0.6", ["model.alpha=0.6"]),
        ("clip", ["model.objective=clip"]),
    ],
    # captioning against CapPa's parallel prediction (big_vision: 75% of the rows from [MASK] inputs), both on a
    # bidirectional encoder as in CapPa
    "cappa": [
        ("cap-bidirectional", ["model.objective=cap", "model.encoder_attention=bidirectional"]),
        ("cappa-bidirectional", ["model.objective=cappa", "model.encoder_attention=bidirectional"]),
    ],
}


def add_arguments(p) -> None:
    p.add_argument("config", metavar="CONFIG", help="the pretraining config every point starts from")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="an axis of the grid (repeat)")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="named grid points (table9: the paper's Table 9; cappa: captioning against CapPa)",
    )
    p.add_argument("--seeds", default="0", help="comma-separated seeds per point (default: %(default)s)")
    p.add_argument("--steps", type=int, help="override train.steps of every run")
    p.add_argument("--out-dir", default="runs/ablate", help="where the runs and tables go (default: %(default)s)")
    p.add_argument("--probe-tasks", default="count,colour,shape", help="comma-separated (default: %(default)s)")
    p.add_argument("--probe-train", type=int, default=1000, help="probe training images (default: %(default)s)")
    p.add_argument("--probe-val", type=int, default=500, help="probe validation images (default: %(default)s)")
    p.add_argument("--probe-epochs", type=int, help="attentive probe epochs (default: the probe's)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every point")


TOP_LEVEL = ("model", "data", "optim", "train", "log", "seed", "out_dir")


def _key(key: str) -> str:
    """A key that does not start with a section of the config is under ``model.`` (alpha, decoder.depth ...)."""
    return key if key.split(".")[0] in TOP_LEVEL else f"model.{key}"


def grid_points(grids: list[str], preset: str | None = None) -> list[tuple[str, list[str]]]:
    """[(point name, config overrides)]: the preset's points (or one empty point) x the product of the axes."""
    axes, keys = [], set()
    for g in grids:
        if "=" not in g:
            raise ValueError(f"--grid {g!r} is not KEY=V1,V2")
        key, values = g.split("=", 1)
        if not key:
            raise ValueError(f"--grid {g!r} names no key; give KEY=V1,V2, e.g. --grid alpha=0.2,0.4")
        short = key.split(".")[-1]
        axis = [(f"{short}={v}", f"{_key(key)}={v}") for v in values.split(",") if v != ""]
        if not axis:
            raise ValueError(f"--grid {g!r} gives no values; give KEY=V1,V2, e.g. --grid {key}=0.2,0.4")
        if _key(key) in keys:
            raise ValueError(f"--grid sets {_key(key)} in two axes; give its values in one --grid {key}=V1,V2,...")
        keys.add(_key(key))
        axes.append(axis)
    points = []
    bases = PRESETS[preset] if preset else [("", [])]
    for (base_name, base), combo in itertools.product(bases, itertools.product(*axes)):
        name = ",".join([base_name] * bool(base_name) + [n for n, _ in combo]) or "base"
        name = re.sub(r"[^A-Za-z0-9_.=,+-]", "_", name)
        points.append((name, [*base, *(o for _, o in combo)]))
    names = [n for n, _ in points]
    if len(set(names)) != len(names):
        raise ValueError(f"grid points with the same name: {names}")
    return points


def parse_seeds(text: str) -> list[int]:
    """--seeds as a list of distinct integers, or ValueError naming the flag."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip() != ""]
    except ValueError:
        raise ValueError(f"--seeds {text!r} is not a comma-separated list of integers, e.g. --seeds 0,1,2") from None
    if not seeds:
        raise ValueError("--seeds is empty; give at least one seed, e.g. --seeds 0")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r} repeats a seed; each seed is one run per point")
    return seeds


def check_probe_args(args) -> list[str]:
    """The probe tasks of --probe-tasks, after checking them and the probe sizes (before any run starts)."""
    from ..data.synthetic.probes import PROBE_TASKS

    tasks = [t for t in args.probe_tasks.split(",") if t]
    if not tasks or (bad := [t for t in tasks if t not in PROBE_TASKS]):
        given = ", ".join(bad) if tasks else "nothing"
        raise ValueError(f"--probe-tasks {given}: choose from {', '.join(PROBE_TASKS)} (comma-separated)")
    for flag, value in (("--probe-train", args.probe_train), ("--probe-val", args.probe_val),
                        ("--probe-epochs", args.probe_epochs)):  # fmt: skip
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value} must be at least 1")
    return tasks


def _probe_top1(run_dir: Path, split: Path, epochs: int | None) -> float:
    """Attentive probe top-1 of a run's encoder on a split (features not cached: one probe per run)."""
    from ..eval.frozen_encoder import FeatureSettings, load_frozen_encoder
    from ..eval.probe import ProbeConfig
    from ..eval.probe_protocol import ProbeSettings, run_probe

    cfg = ProbeConfig() if epochs is None else ProbeConfig(epochs=epochs)
    settings = ProbeSettings(features=FeatureSettings(num_workers=1), use_cache=False)
    encoder = load_frozen_encoder(run_dir)
    return run_probe(encoder, str(split / "train"), str(split / "val"), cfg, settings, progress=False).top1


def run(args) -> int:
    from ..config import ConfigError, load_config
    from ..data.synthetic.probes import write_probe_splits
    from ..errors import UserError
    from ..eval.experiment_report import plot_ablation, read_metrics, summarize, to_markdown
    from ..models.registry import model_config
    from ..train import TrainingError, train

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("aimv2.ablate")
    points = grid_points(args.grid, args.preset)
    seeds = parse_seeds(args.seeds)
    tasks = check_probe_args(args)
    out = Path(args.out_dir)
    common = list(args.overrides) + ([f"train.steps={args.steps}"] if args.steps is not None else [])
    runs = []
    for (name, overrides), seed in itertools.product(points, seeds):  # every point checked before any run starts
        run_dir = out / name / f"seed{seed}"
        these = [*common, *overrides, f"seed={seed}", f"out_dir={run_dir}"]
        try:
            runs.append((name, seed, run_dir, these, load_config(args.config, these)))
        except ConfigError as e:
            raise ConfigError(f"point {name}: {e}") from e
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for name, seed, run_dir, these, cfg in runs:
        done = run_dir / "ablate.json"
        if done.exists() and json.loads(done.read_text()).get("overrides") == these:
            log.info("%s seed %d: done already", name, seed)
            results.setdefault(name, []).append(json.loads(done.read_text()))
            continue
        log.info("%s seed %d: aimv2 pretrain %s", name, seed, " ".join(these))
        cfg.train.progress = False
        try:
            train(cfg)  # resumes an interrupted run
        except TrainingError as e:
            raise UserError(f"point {name} seed {seed}: {e}") from e
        size = max(model_config(cfg.model.encoder, **cfg.model.encoder_overrides).image_hw)
        top1 = {}
        for task in tasks:
            split = out / f"probe-{task}-{size}px"
            if not (split / "val").is_dir():  # the same splits for every run (seed 1000, as the demo)
                write_probe_splits(
                    split, task=task, n_train=args.probe_train, n_val=args.probe_val, size=size, seed=1000
                )
            top1[task] = _probe_top1(run_dir, split, args.probe_epochs)
        result = {
            "point": name,
            "seed": seed,
            "overrides": these,
            "top1": top1,
            "loss": read_metrics(run_dir)[-1]["loss"],
        }
        done.write_text(json.dumps(result, indent=2) + "\n")
        log.info("%s seed %d: %s", name, seed, top1)
        results.setdefault(name, []).append(result)

    table = summarize(results, tasks)
    md = to_markdown(table, tasks)
    (out / "ablation.md").write_text(md)
    (out / "ablation.json").write_text(json.dumps({"tasks": tasks, "points": table}, indent=2) + "\n")
    plot_ablation(table, tasks, out / "ablation.png")
    print(md)
    print(f"table: {out / 'ablation.md'}, {out / 'ablation.json'}; plot: {out / 'ablation.png'}")
    return 0
