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
  4. aimv2 caption RUN                 captions of held-out scenes by the pretraining decoder (beam 3), shown
                                      next to the true captions
  5. aimv2 lit configs/lit-tiny.yaml   a tiny LiT text tower trained against the frozen pretrained encoder, then
     aimv2 zeroshot                   zero-shot classification of the colour probe split from class names
  6. tables on stdout; in the run folder results.json, loss_curve.png, probe_top1.png, captions.json and, per
     task, probe-TASK/report/{pretrained,random-init}.{json,png} (per-class accuracy, confusion matrix)

examples:
  aimv2 demo
  aimv2 demo --steps 100 --probe-tasks count --lit-steps 50
  aimv2 demo --no-lit --captions 0
"""


def add_arguments(p) -> None:
    p.add_argument("--config", default="configs/tiny-synthetic.yaml", help="pretraining config (default: %(default)s)")
    p.add_argument("--out-dir", help="run folder (default: the config's out_dir)")
    p.add_argument("--steps", type=int, help="override train.steps")
    p.add_argument("--probe-tasks", default="count,colour,shape", help="comma-separated (default: %(default)s)")
    p.add_argument("--probe-train", type=int, default=1000, help="probe training images (default: %(default)s)")
    p.add_argument("--probe-val", type=int, default=500, help="probe validation images (default: %(default)s)")
    p.add_argument(
        "--captions", type=int, default=6, help="held-out scenes to caption, 0 for none (default: %(default)s)"
    )
    p.add_argument("--no-lit", action="store_true", help="skip the LiT zero-shot step")
    p.add_argument("--lit-config", default="configs/lit-tiny.yaml", help="LiT config (default: %(default)s)")
    p.add_argument("--lit-steps", type=int, help="override the LiT config's train.steps")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="more config overrides")


def _aimv2(*args: str) -> str:
    """``aimv2 ARGS`` in a fresh process, as a user would run it; returns its stdout (raises with its output)."""
    r = subprocess.run([sys.executable, "-m", "aimv2", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"aimv2 {' '.join(args)} failed:\n{r.stdout}{r.stderr}")
    return r.stdout


def _captions(run_dir: Path, n: int, seed: int, size: int) -> list[dict]:
    """Caption ``n`` scenes never seen in training (another seed) with `aimv2 caption`; pair them with the truth."""
    from ..data.synthetic.dataset import synthetic_sample

    folder = run_dir / "caption-scenes"
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for i in range(n):
        image, text = synthetic_sample(i, seed, size)
        path = folder / f"scene-{i:02d}.png"
        image.save(path)
        truth[path.name] = text
    lines = _aimv2("caption", str(run_dir), str(folder), "--beam", "3", "--json", "--no-progress", "--workers", "0")
    rows = [json.loads(x) for x in lines.splitlines() if x.startswith("{")]
    return [{"image": Path(r["path"]).name, "true": truth[Path(r["path"]).name], "decoded": r["caption"]} for r in rows]


def _zeroshot(run_dir: Path, args, seed: int, size: int) -> dict:
    """Train a tiny LiT against the frozen pretrained encoder, then classify the colour split zero-shot."""
    from ..data.synthetic.probes import write_probe_splits

    lit_dir = run_dir / "lit"
    split = run_dir / "probe-colour"
    if not (split / "val").is_dir():
        write_probe_splits(split, task="colour", n_train=0, n_val=args.probe_val, size=size, seed=seed, overwrite=True)
    overrides = [f"lit.encoder={run_dir}", f"out_dir={lit_dir}"]
    if args.lit_steps:
        overrides.append(f"train.steps={args.lit_steps}")
    _aimv2("lit", args.lit_config, *overrides, "--quiet")
    out = _aimv2("zeroshot", str(lit_dir), "--images", str(split / "val"), "--workers", "1")
    result = json.loads(out.strip().splitlines()[-1])
    return {"task": "colour", "top1": result["top1"], "top5": result.get("top5"), "chance": result["chance"]}


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
    from ..config import ConfigError, load_config
    from ..data.synthetic.probes import write_probe_splits
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
    if args.captions > 0:
        captions = _captions(out, args.captions, cfg.seed + 2000, img)
        (out / "captions.json").write_text(json.dumps(captions, indent=2) + "\n")
        result["captions"] = captions
    if not args.no_lit:
        result["zeroshot"] = _zeroshot(out, args, cfg.seed + 1000, img)
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
    if args.captions > 0:
        print("\ncaptions of held-out scenes by the pretraining decoder (aimv2 caption --beam 3):")
        for c in result["captions"]:
            print(f"  {c['image']}\n    true:    {c['true']}\n    decoded: {c['decoded']}")
    if "zeroshot" in result:
        z = result["zeroshot"]
        print(f"\nLiT zero-shot on the {z['task']} split: top-1 {z['top1']:.1f}% (chance {z['chance']:.1f}%)")
    print(
        f"\nloss curve: {out / 'loss_curve.png'}; probe accuracy: {out / 'probe_top1.png'}; confusion matrices: "
        f"{out}/probe-TASK/report/*.png; results: {out / 'results.json'}"
    )
    print(json.dumps(result))
    return 0
