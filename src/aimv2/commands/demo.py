"""`aimv2 demo`: pretrain on the built-in scenes, probe the result against a random init, plot the loss."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

HELP = "tiny end-to-end run: pretrain on built-in data, probe vs random init, loss curve"
DESCRIPTION = """The whole method at laptop scale, on the built-in synthetic scenes (no download):

  1. aimv2 pretrain CONFIG            (default configs/tiny-synthetic.yaml; resumes if interrupted)
  2. labelled probe splits from the same scene generator: number of objects (count), colour and shape
     of the single large object among smaller distractors (colour, shape)
  3. aimv2 probe --method attentive   on the pretrained encoder and on the same encoder at random init
  4. tables on stdout; in the run folder results.json, loss_curve.png, probe_top1.png and, per task,
     probe-TASK/report/{pretrained,random-init}.{json,png} (per-class accuracy, confusion matrix)

examples:
  aimv2 demo
  aimv2 demo --steps 100 --probe-tasks count
"""


def add_arguments(p) -> None:
    p.add_argument("--config", default="configs/tiny-synthetic.yaml", help="pretraining config (default: %(default)s)")
    p.add_argument("--out-dir", help="run folder (default: the config's out_dir)")
    p.add_argument("--steps", type=int, help="override train.steps")
    p.add_argument("--probe-tasks", default="count,colour,shape", help="comma-separated (default: %(default)s)")
    p.add_argument("--probe-train", type=int, default=1000, help="probe training images (default: %(default)s)")
    p.add_argument("--probe-val", type=int, default=500, help="probe validation images (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="more config overrides")


def _probe(encoder_spec: str, split_dir: Path, extra: list[str]) -> dict:
    """`aimv2 probe` in a fresh process, as a user would run it; returns its JSON result line."""
    cmd = [
        sys.executable,
        "-m",
        "aimv2",
        "probe",
        encoder_spec,
        "--train",
        str(split_dir / "train"),
        "--val",
        str(split_dir / "val"),
        "--method",
        "attentive",
        "--no-cache",
        "--no-progress",
        *extra,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"probe of {encoder_spec} failed:\n{r.stdout}{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def plot_probes(probes: dict[str, dict], png: Path) -> None:
    """Grouped bars: top-1 of the pretrained and the random-init encoder per task, chance as a tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(probes)
    x = range(len(tasks))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(tasks), 3.2))
    ax.bar([i - 0.2 for i in x], [probes[t]["pretrained"] for t in tasks], 0.4, label="pretrained")
    ax.bar([i + 0.2 for i in x], [probes[t]["random_init"] for t in tasks], 0.4, label="random init")
    ax.scatter(list(x), [probes[t]["chance"] for t in tasks], marker="_", s=600, color="k", label="chance", zorder=3)
    ax.set_xticks(list(x), tasks)
    ax.set_ylabel("attentive probe top-1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot_losses(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.2))
    for a, key in zip(ax, ("loss", "image_loss", "text_loss"), strict=True):
        a.plot(steps, [r[key] for r in rows])
        a.set_title(key)
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def run(args) -> int:
    from ..data.synthetic import write_probe_splits
    from ..train.config import ConfigError, load_config
    from ..train.loop import TrainingError, train

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = list(args.overrides)
    if args.out_dir:
        overrides.append(f"out_dir={args.out_dir}")
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    try:
        cfg = load_config(args.config, overrides)
        train(cfg)
    except (ConfigError, TrainingError) as e:
        logging.getLogger("aimv2").error("error: %s", e)
        return 2
    out = Path(cfg.out_dir)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    plot_losses(metrics, out / "loss_curve.png")

    from ..models.registry import model_config

    img = max(model_config(cfg.model.encoder, **cfg.model.encoder_overrides).image_hw)
    random_init = [f"--set={k}={v}" for k, v in cfg.model.encoder_overrides.items()]
    probes = {}
    for task in args.probe_tasks.split(","):
        split_dir = out / f"probe-{task}"
        write_probe_splits(
            split_dir,
            task=task,
            n_train=args.probe_train,
            n_val=args.probe_val,
            size=img,
            seed=cfg.seed + 1000,
            overwrite=True,
        )
        report = f"--out={split_dir / 'report'}"
        trained = _probe(str(out), split_dir, ["--workers=1", f"{report}/pretrained.json"])
        random = _probe(cfg.model.encoder, split_dir, ["--workers=1", f"{report}/random-init.json", *random_init])
        probes[task] = {
            "pretrained": trained["top1"],
            "random_init": random["top1"],
            "chance": 100.0 / trained["num_classes"],
        }

    first, last = metrics[0], metrics[-1]
    result = {"steps": last["step"], "first_logged_step": first["step"]}
    for key in ("loss", "image_loss", "text_loss"):
        result[f"{key}_first"], result[f"{key}_last"] = first[key], last[key]
    result["probe_top1"] = probes
    plot_probes(probes, out / "probe_top1.png")
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(f"| {'':10} | step {first['step']:>5} | step {last['step']:>5} |")
    print(f"|{'-' * 12}|{'-' * 12}|{'-' * 12}|")
    for key in ("loss", "image_loss", "text_loss"):
        print(f"| {key:10} | {first[key]:10.4f} | {last[key]:10.4f} |")
    print()
    print(f"| attentive probe, top-1 | {'pretrained':>10} | {'random init':>11} | {'chance':>6} |")
    print(f"|{'-' * 24}|{'-' * 12}|{'-' * 13}|{'-' * 8}|")
    for task, r in probes.items():
        print(f"| {task:22} | {r['pretrained']:9.1f}% | {r['random_init']:10.1f}% | {r['chance']:5.1f}% |")
    print(
        f"\nloss curve: {out / 'loss_curve.png'}; probe accuracy: {out / 'probe_top1.png'}; confusion matrices: "
        f"{out}/probe-TASK/report/*.png; results: {out / 'results.json'}"
    )
    print(json.dumps(result))
    return 0
