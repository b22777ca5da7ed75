"""`aimv2 demo`: pretrain on the built-in scenes, probe the result against a random init, plot the loss."""

from __future__ import annotations

import json
import logging
from pathlib import Path

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


def _probe(encoder, split_dir: Path, report: Path) -> dict:
    """The attentive probe of ``encoder`` on a split (features not cached: the splits are rewritten each run),
    its report written to ``report``; returns the metrics (top1, num_classes, ...)."""
    from ..eval.frozen_encoder import FeatureSettings
    from ..eval.probe_protocol import ProbeSettings, run_probe
    from ..eval.report import write_report

    settings = ProbeSettings(features=FeatureSettings(num_workers=1), use_cache=False)
    result = run_probe(encoder, str(split_dir / "train"), str(split_dir / "val"), settings=settings, progress=False)
    write_report(report, result.report(), result.classes)
    return result.metrics


def _captions(run_dir: Path, n: int, seed: int, size: int) -> list[dict]:
    """Caption ``n`` scenes never seen in training (another seed), beam 3; pair them with the true captions."""
    from ..data.synthetic.dataset import synthetic_sample
    from ..eval.caption_images import caption_images
    from ..eval.captioning import Captioner
    from ..eval.features import default_device

    folder = run_dir / "caption-scenes"
    folder.mkdir(parents=True, exist_ok=True)
    truth, paths = {}, []
    for i in range(n):
        image, text = synthetic_sample(i, seed, size)
        path = folder / f"scene-{i:02d}.png"
        image.save(path)
        truth[path.name] = text
        paths.append(path)
    captioner = Captioner.from_run(run_dir, device=default_device())
    done = caption_images(captioner, paths, beam=3, num_workers=0, progress=False)
    return [{"image": r.path.name, "true": truth[r.path.name], "decoded": r.caption.text} for r in done if r.caption]


def _zeroshot(run_dir: Path, args, seed: int, size: int) -> dict:
    """Train a tiny LiT against the frozen pretrained encoder, then classify the colour split zero-shot."""
    from ..config import LitConfig, load_config
    from ..data.synthetic.probes import write_probe_splits
    from ..eval.zeroshot import load_lit_classifier, zeroshot_classify
    from ..train import train_lit

    lit_dir = run_dir / "lit"
    split = run_dir / "probe-colour"
    if not (split / "val").is_dir():
        write_probe_splits(split, task="colour", n_train=0, n_val=args.probe_val, size=size, seed=seed, overwrite=True)
    overrides = [f"lit.encoder={run_dir}", f"out_dir={lit_dir}", "train.progress=false"]
    if args.lit_steps is not None:
        overrides.append(f"train.steps={args.lit_steps}")
    train_lit(load_config(args.lit_config, overrides, cls=LitConfig))
    lit = load_lit_classifier(lit_dir)
    result = zeroshot_classify(lit.model, lit.tokenizer, split / "val", num_workers=1, mean_std=lit.mean_std)
    return {"task": "colour", "top1": result["top1"], "top5": result.get("top5"), "chance": result["chance"]}


def run(args) -> int:
    from ..config import load_config
    from ..data.synthetic.probes import write_probe_splits
    from ..errors import UserError
    from ..eval.experiment_report import plot_losses, plot_probe_comparison, read_metrics
    from ..eval.frozen_encoder import load_frozen_encoder
    from ..models.registry import model_config
    from ..train import train

    for flag, value in (("--steps", args.steps), ("--lit-steps", args.lit_steps)):
        if value is not None and value < 1:  # 0 must not mean "the config's default": refuse it
            raise UserError(f"{flag} must be >= 1, got {value}; leave it out for the config's train.steps")
    for flag, value in (("--probe-train", args.probe_train), ("--probe-val", args.probe_val)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.captions < 0:
        raise UserError(f"--captions must be >= 0, got {args.captions}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = list(args.overrides)
    if args.out_dir:
        overrides.append(f"out_dir={args.out_dir}")
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    cfg = load_config(args.config, overrides)
    train(cfg)
    out = Path(cfg.out_dir)
    metrics = read_metrics(out)
    plot_losses(metrics, out / "loss_curve.png")

    img = max(model_config(cfg.model.encoder, **cfg.model.encoder_overrides).image_hw)
    pretrained = load_frozen_encoder(out)
    random_init = load_frozen_encoder(cfg.model.encoder, overrides=cfg.model.encoder_overrides)
    probes = {}
    for task in args.probe_tasks.split(","):
        split_dir = out / f"probe-{task}"
        write_probe_splits(split_dir, task=task, n_train=args.probe_train, n_val=args.probe_val, size=img,
                           seed=cfg.seed + 1000, overwrite=True)  # fmt: skip
        trained = _probe(pretrained, split_dir, split_dir / "report" / "pretrained.json")
        random = _probe(random_init, split_dir, split_dir / "report" / "random-init.json")
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
    plot_probe_comparison(probes, out / "probe_top1.png")
    if args.captions > 0:
        captions = _captions(out, args.captions, cfg.seed + 2000, img)
        (out / "captions.json").write_text(json.dumps(captions, indent=2) + "\n")
        result["captions"] = captions
    if not args.no_lit:
        result["zeroshot"] = _zeroshot(out, args, cfg.seed + 1000, img)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    _print_tables(result, out)
    return 0


def _print_tables(result: dict, out: Path) -> None:
    """The demo's summary on stdout: losses first and last, probe top-1, captions, zero-shot; the JSON last."""
    first, last = result["first_logged_step"], result["steps"]
    print()
    print(f"| {'':10} | step {first:>5} | step {last:>5} |")
    print(f"|{'-' * 12}|{'-' * 12}|{'-' * 12}|")
    for key in ("loss", "image_loss", "text_loss"):
        print(f"| {key:10} | {result[key + '_first']:10.4f} | {result[key + '_last']:10.4f} |")
    print()
    print(f"| attentive probe, top-1 | {'pretrained':>10} | {'random init':>11} | {'chance':>6} |")
    print(f"|{'-' * 24}|{'-' * 12}|{'-' * 13}|{'-' * 8}|")
    for task, r in result["probe_top1"].items():
        print(f"| {task:22} | {r['pretrained']:9.1f}% | {r['random_init']:10.1f}% | {r['chance']:5.1f}% |")
    if "captions" in result:
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
