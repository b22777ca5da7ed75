"""``aimv2 ground train|eval|predict``: grounding (referring expression comprehension) on the encoder's features."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..errors import DataError, UserError
from .sub_actions import run_action

HELD_OUT_SEED = 12345  # built-in scenes of this seed are never a training config's default

DESCRIPTION = """Grounding: a phrase in, one box out (referring expression comprehension, as RefCOCO). OWL-ViT's
head on the encoder's last map: every patch proposes a box and is scored against the phrase's embedding from a
small text tower; Hungarian matching with L1 + GIoU losses; trained by the same trainer as pretraining.

actions:
  train CONFIG [key=value ...]   train a grounder (see configs/ground-tiny.yaml); writes out_dir/grounder.safetensors
  eval RUN                       accuracy (top box at IoU >= 0.5, RefCOCO's metric) on held-out built-in scenes or
                                 a RefCOCO-style file + image folder; the last line of stdout is JSON
  predict RUN IMAGE --phrase P   the box of each phrase in an image, as JSON and as a picture

examples:
  aimv2 ground train configs/ground-tiny.yaml ground.encoder=runs/tiny-synthetic out_dir=runs/ground
  aimv2 ground eval runs/ground --synthetic 200
  aimv2 ground eval runs/ground --annotations refs-val.parquet --images val2014/
  aimv2 ground predict runs/ground scene.png --phrase "the red square" --phrase "the blue circle" --out pred/"""

EVAL_DESCRIPTION = f"""RefCOCO's accuracy: the share of phrases whose top box overlaps theirs at IoU >= 0.5 (and
the mean IoU). Without --annotations: held-out built-in scenes (--synthetic N of --seed, default {HELD_OUT_SEED}).
With --annotations FILE --images DIR: referring expressions in JSON, JSON lines or parquet (file_name, bbox
[x, y, w, h], sentences), optionally one --split. The last line of stdout is JSON.

examples:
  aimv2 ground eval runs/ground --synthetic 500
  aimv2 ground eval runs/ground --annotations refcoco.json --images train2014/ --split val"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    fmt = argparse.RawDescriptionHelpFormatter

    t = sub.add_parser("train", help="train a grounder", description=DESCRIPTION, formatter_class=fmt)
    t.add_argument("config", help="YAML config file (see configs/ground-tiny.yaml)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. ground.train_blocks=0")
    t.add_argument("--quiet", action="store_true", help="only warnings and errors on stderr")
    t.set_defaults(_action=run_train)

    e = sub.add_parser("eval", help="accuracy at IoU 0.5", description=EVAL_DESCRIPTION, formatter_class=fmt)
    e.add_argument("run_dir", metavar="RUN", help="a grounding run folder (holds grounder.safetensors)")
    e.add_argument("--annotations", metavar="FILE", help="referring expressions (JSON, JSON lines or parquet)")
    e.add_argument("--images", metavar="DIR", help="the folder the file_name entries are in")
    e.add_argument("--split", help="keep only the records of this split")
    e.add_argument("--synthetic", type=int, default=200, metavar="N", help="else: N built-in scenes (default 200)")
    e.add_argument("--seed", type=int, default=HELD_OUT_SEED, help=f"their seed (default {HELD_OUT_SEED}: held out)")
    e.add_argument("--predictions", metavar="JSON", help="also write each phrase's box and score as JSON")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--device", default="cpu")
    e.set_defaults(_action=run_eval)

    p = sub.add_parser("predict", help="the box of each phrase in an image", description=DESCRIPTION,
                       formatter_class=fmt)  # fmt: skip
    p.add_argument("run_dir", metavar="RUN", help="a grounding run folder (holds grounder.safetensors)")
    p.add_argument("image", metavar="IMAGE", help="an image file")
    p.add_argument("--phrase", action="append", required=True, help="a referring expression (repeat for more)")
    p.add_argument("--out", required=True, metavar="DIR", help="writes boxes.json and IMAGE.phrases.png here")
    p.add_argument("--device", default="cpu")
    p.set_defaults(_action=run_predict)
    parser.set_defaults(_parser=parser)


run = run_action


def run_train(args) -> int:
    from ..config import load_config
    from ..config.grounding import GroundingConfig
    from ..train.grounding_task import train_grounding

    logging.getLogger().setLevel(logging.WARNING if args.quiet else logging.INFO)
    cfg = load_config(args.config, args.overrides, cls=GroundingConfig)
    if args.quiet:
        cfg.train.progress = False
    last = train_grounding(cfg)
    if last:
        print(f"done: step {last['step']} loss {last['loss']:.4f}; model at {cfg.out_dir}/grounder.safetensors")
    return 0


def run_eval(args) -> int:
    from ..data.sources.refcoco import RefCocoStyle
    from ..data.synthetic.referring import SyntheticGrounding
    from ..eval.grounding import evaluate_grounding, load_grounder
    from .detect import check_writable

    if bool(args.annotations) != bool(args.images):
        raise ValueError("--annotations and --images go together (a referring-expression file and its images)")
    if not args.annotations and args.synthetic < 1:
        raise ValueError(f"--synthetic {args.synthetic} scenes is nothing to evaluate; give at least 1")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be at least 1")
    if args.predictions:
        check_writable(args.predictions, "--predictions")
    model, meta = load_grounder(args.run_dir)
    size = meta["ground"].image_size
    if args.annotations:
        dataset = RefCocoStyle(args.annotations, args.images, size, args.split, max_fault_rate=1.0)
    else:
        dataset = SyntheticGrounding(args.seed, size, args.synthetic)
    stats, records = evaluate_grounding(model.to(args.device), dataset, args.batch_size, args.device, progress=True)
    if not stats["phrases"]:
        raise DataError(f"no readable image in {args.images}; check --images")
    if args.predictions:
        Path(args.predictions).write_text(json.dumps(records))
    print(f"accuracy@0.5 {stats['accuracy']:.3f}  mean IoU {stats['mean_iou']:.3f}  ({stats['phrases']} phrases)")
    print(json.dumps(stats))
    return 0


def run_predict(args) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from ..data.letterbox import letterbox
    from ..data.transforms import to_rgb
    from ..eval.grounding import draw_phrases, ground_phrases, load_grounder

    if not Path(args.image).is_file():
        raise FileNotFoundError(2, "image not found", args.image)
    if any(not p.strip() for p in args.phrase):
        raise ValueError("--phrase is empty; give a referring expression, e.g. --phrase 'the red square'")
    out = Path(args.out)
    if out.is_file():
        raise UserError(f"--out is a file ({out}); give a folder")
    model, meta = load_grounder(args.run_dir)
    try:
        with Image.open(args.image) as im:
            im.load()
            fitted = letterbox(im, meta["ground"].image_size)
            original = torch.from_numpy(np.array(to_rgb(im))).permute(2, 0, 1).contiguous()
    except OSError as e:
        raise DataError(f"image {args.image} cannot be read ({type(e).__name__}: {e}); give a readable image") from e
    boxes, scores = ground_phrases(model.to(args.device), fitted, args.phrase, args.device)
    out.mkdir(parents=True, exist_ok=True)
    records = [
        {"phrase": p, "bbox": [*b[:2].tolist(), *(b[2:] - b[:2]).tolist()], "score": float(s)}
        for p, b, s in zip(args.phrase, boxes, scores, strict=True)
    ]
    (out / "boxes.json").write_text(json.dumps(records, indent=1))
    picture = out / f"{Path(args.image).stem}.phrases.png"
    draw_phrases(original, boxes, args.phrase, scores).save(picture)
    for r in records:
        print(f"{r['phrase']!r}: box {[round(v, 1) for v in r['bbox']]} score {r['score']:.2f}")
    print(f"{out}/boxes.json and {picture}")
    return 0
